"""The built-in http sink through the shared HTTP helper: signed, idempotent, and its failures sorted."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from integrand import signing
from integrand.config import load_config
from integrand.testing import fake_api_server

from .helpers import BASE, DEMO_SECRET, admin_url, hook_url, post_signed, running, wait_for, write_config

OUT_SECRET = "whsec_dGVzdC1vdXRib3VuZC1zZWNyZXQtMTIzNDU2"


class Receiver:
    """An endpoint that checks the Standard Webhooks signature and answers what the test scripts per event."""

    def __init__(self) -> None:
        self.accepted: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.script: dict[str, list[int]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signing.standard_verify([OUT_SECRET], request.headers, body, time.time())
        payload = await request.json()
        self.keys.append(request.headers["Idempotency-Key"])
        status = (self.script.get(payload["id"]) or [200]).pop(0)
        if status == 200:
            self.accepted.append(payload)
            return web.json_response({"ok": True})
        return web.json_response({"error": status}, status=status, headers={"X-Request-Id": f"rcv-{payload['id']}"})


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/in", r.handle)
    async with fake_api_server(app) as url:
        yield r, url


async def test_http_sink_signs_retries_dead_letters_and_pauses(tmp_path: Path, receiver: tuple[Receiver, str]) -> None:
    r, url = receiver
    body = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.out]
connector = "http"
url = "{url}/in"
secret = "{OUT_SECRET}"
retry = {{ base = "10ms", cap = "20ms" }}
breaker = {{ failure_threshold = 100, open_for = "50ms", max_open_for = "50ms" }}

[[routes]]
from = "demo"
to = ["out"]
"""
    settings = load_config(write_config(tmp_path, body, BASE))
    r.script = {"retry": [503, 429], "gone": [410], "auth": [401]}
    async with running(settings) as d, aiohttp.ClientSession() as s:
        for msg in ("ok", "retry", "gone"):
            assert (await post_signed(s, hook_url(d), {"n": msg}, msg))[0] == 200

        async def settled() -> bool:
            c = await d.store.counts()
            return c.get(("out", "done"), 0) == 2 and c.get(("out", "dead"), 0) == 1

        await wait_for(settled)
        dead = await d.store.dead_letters()
        assert [x.event_id for x in dead] == ["gone"]
        assert "PermanentError: HTTP 410" in dead[0].last_error
        assert "(request id rcv-gone)" in dead[0].last_error
        assert sorted(p["id"] for p in r.accepted) == ["ok", "retry"]
        assert r.keys.count("demo:retry") == 3  # 503, 429, then delivered: the same idempotency key each time

        # 401 from the endpoint pauses the sink (it is our credentials) instead of dead-lettering.
        assert (await post_signed(s, hook_url(d), {"n": 1}, "auth"))[0] == 200

        async def done() -> bool:
            return bool((await d.store.counts()).get(("out", "done"), 0) == 3)

        await wait_for(done)  # the probe after the pause succeeds (the script answers 401 only once)
        async with s.get(admin_url(d, "/status")) as resp:
            status = await resp.json()
        assert status["breakers"]["out"]["paused"] is None
        assert r.keys.count("demo:auth") == 2
