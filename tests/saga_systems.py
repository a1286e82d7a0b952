"""Three small record systems behind one local HTTP server, for saga tests: idempotent, scriptable, observed.

``POST /SYSTEM`` takes integrand's ``http`` sink envelope. A step (any type but ``saga.compensate``)
upserts ``data`` by ``data.key`` and answers ``{"id": …}``; a compensation deletes the record
``data.id``. Both are idempotent on the ``Idempotency-Key`` header, as a well-behaved API is: a
repeated key gets the first answer again and changes nothing. Each request can be scripted
(``plan``): answer 422 (permanent), 503 (transient), or hang before / after applying (so a test can
kill the daemon while the request is in flight). Everything seen is in ``log``.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

COMPENSATE = "saga.compensate"


@dataclass
class Seen:
    system: str
    kind: str  # "run" or "undo"
    key: str
    status: int
    applied: bool  # False: refused, or a repeated idempotency key answered from memory


@dataclass
class Systems:
    records: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # system → id → record
    log: list[Seen] = field(default_factory=list)
    # (system, kind) → behaviours consumed one per request: "ok", "422", "503", "hang-before", "hang-after",
    # "503*" (every request from then on)
    plan: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    answered: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # idempotency key → answer
    hold: set[str] = field(default_factory=set)  # data.key values whose step requests hang until ``release``
    hanging: asyncio.Event = field(default_factory=asyncio.Event)  # set when a request starts hanging
    release: asyncio.Event = field(default_factory=asyncio.Event)  # hanging requests wait for this (or forever)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{system}", self._handle)
        return app

    def seen(self, system: str | None = None, kind: str | None = None) -> list[Seen]:
        return [s for s in self.log if (system is None or s.system == system) and (kind is None or s.kind == kind)]

    def applied(self, kind: str | None = None) -> list[tuple[str, str]]:
        """(system, kind) of every request that changed something, in order."""
        return [(s.system, s.kind) for s in self.log if s.applied and (kind is None or s.kind == kind)]

    def _next(self, system: str, kind: str) -> str:
        steps = self.plan.get((system, kind))
        if not steps:
            return "ok"
        if steps[0].endswith("*"):
            return steps[0][:-1]
        return steps.pop(0)

    async def _handle(self, request: web.Request) -> web.Response:
        system = request.match_info["system"]
        body = orjson.loads(await request.read())
        key = request.headers.get("Idempotency-Key", "")
        kind = "undo" if body.get("type") == COMPENSATE else "run"
        try:
            if key in self.answered:  # a repeat: the first answer, nothing changed
                status, answer = self.answered[key]
                self.log.append(Seen(system, kind, key, status, False))
                return web.json_response(answer, status=status)
            what = "hang-before" if (body.get("data") or {}).get("key") in self.hold else self._next(system, kind)
            if what in ("422", "503"):
                self.log.append(Seen(system, kind, key, int(what), False))
                return web.json_response({"error": f"scripted {what}"}, status=int(what))
            if what == "hang-before":
                self.log.append(Seen(system, kind, key, 0, False))
                self.hanging.set()
                await self.release.wait()
                return web.json_response({"error": "released"}, status=503)
            answer = self._apply(system, kind, body.get("data") or {})
            self.answered[key] = (200, answer)
            self.log.append(Seen(system, kind, key, 200, True))
            if what == "hang-after":  # applied, but the answer never reaches integrand
                self.hanging.set()
                await self.release.wait()
            return web.json_response(answer)
        finally:
            self.changed.set()

    def _apply(self, system: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        recs = self.records.setdefault(system, {})
        if kind == "undo":
            recs.pop(str(data.get("id")), None)
            return {"deleted": data.get("id")}
        for rid, rec in recs.items():
            if rec.get("key") == data.get("key"):
                rec.update(data)
                return {"id": rid}
        rid = f"{system}-{next(self._ids)}"
        recs[rid] = dict(data)
        return {"id": rid}
