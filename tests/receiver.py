"""A local HTTP endpoint standing in for a sink's remote side: scripted answers, a gate to hold requests."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        return dict(orjson.loads(self.body))


@dataclass
class Receiver:
    """The remote side of a sink: answers ``status`` unless ``per_event`` scripts answers for an event id."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    per_event: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    log: list[Received] = field(default_factory=list)
    port: int = 0
    gate: asyncio.Event | None = None  # while set and not yet open, requests wait (deliveries in flight)
    pending: int = 0
    _runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ev_id = orjson.loads(body)["id"]
        self.pending += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.pending -= 1
        queued = self.per_event.get(ev_id)
        status, headers = queued.pop(0) if queued else (self.status, self.headers)
        self.log.append(Received(time.monotonic(), dict(request.headers), body, status))
        return web.json_response({"status": status}, status=status, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/in", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            server: Any = site._server
            self.port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/in"

    def delivered(self) -> list[dict[str, Any]]:
        return [r.event for r in self.log if 200 <= r.status < 300]
