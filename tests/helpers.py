"""Test helpers: a config in tmp_path, an in-process daemon on free ports, waiting with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from integrand import signing
from integrand.app import Daemon, run
from integrand.config import Settings, load_config

DEMO_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

BASE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "debug"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:0"
"""

DEMO = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "demo"
to = ["out"]
"""


def write_config(tmp_path: Path, body: str = DEMO, base: str = BASE) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(base + body)
    return path


def settings_for(tmp_path: Path, body: str = DEMO, base: str = BASE) -> Settings:
    return load_config(write_config(tmp_path, body, base))


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Daemon]:
    """Run the daemon in this event loop until the block ends, then stop it cleanly."""
    ready: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()

    def on_ready(d: Daemon) -> None:
        ready.set_result(d)

    task = asyncio.create_task(run(settings, on_ready=on_ready))
    waiting: list[asyncio.Future[Any]] = [task, ready]
    done, _ = await asyncio.wait(waiting, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what went wrong at startup
    assert ready.done(), "daemon did not become ready within 30 s"
    d = ready.result()
    try:
        yield d
    finally:
        d.stop()
        await asyncio.wait_for(task, 30)


def hook_url(d: Daemon, source: str = "demo") -> str:
    return f"http://127.0.0.1:{d.ports['webhooks']}/hooks/{source}"


def admin_url(d: Daemon, path: str) -> str:
    return f"http://127.0.0.1:{d.ports['admin']}{path}"


def signed_headers(body: bytes, msg_id: str, secret: str = DEMO_SECRET, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signing.standard_sign(secret, msg_id, ts, body),
    }


async def post_signed(
    session: aiohttp.ClientSession, url: str, payload: Any, msg_id: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps(payload)
    async with session.post(url, data=body, headers=signed_headers(body, msg_id, **kw)) as resp:
        return resp.status, await resp.json()


async def wait_for(
    predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll until ``predicate`` holds or fail after ``timeout`` seconds (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        res = predicate()
        if isinstance(res, Awaitable):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
