"""The baseline: the least an aiohttp+uvloop webhook endpoint can do (parse the JSON, answer 200)."""

from __future__ import annotations

import argparse

import orjson
import uvloop
from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    """Read and parse the body like a real receiver would, store nothing, answer 200."""
    data = orjson.loads(await request.read())
    return web.json_response({"accepted": 1 if data else 0, "duplicates": 0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/hooks/{source}", handle)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
