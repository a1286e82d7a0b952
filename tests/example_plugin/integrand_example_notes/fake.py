"""A local fake of the Notes API that behaves like its documentation: rotating OAuth tokens, pages, 429s."""

from __future__ import annotations

import hashlib
import hmac
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class FakeNotes:
    """The Notes API in memory. Tests seed ``notes``, inject faults, and read what was written."""

    webhook_secret: str = "notes-webhook-secret"
    refresh_token: str = "rt-0"
    access_token: str = ""
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    seq: int = 0
    fault: tuple[int, dict[str, str]] | None = None  # while set, every API request gets this answer
    idempotency: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: int = 0
    _tokens: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def put(self, note_id: str, text: str) -> dict[str, Any]:
        """Create or change a note as a user of the Notes app would (a new version and change number)."""
        self.seq += 1
        old = self.notes.get(note_id, {"version": 0})
        note = {"id": note_id, "text": text, "version": old["version"] + 1, "seq": self.seq}
        self.notes[note_id] = note
        return note

    def webhook(self, note_id: str) -> bytes:
        """The thin body the Notes API POSTs when a note changes: what changed, not the new text."""
        note = self.notes[note_id]
        return orjson.dumps({"type": "note.updated", "note": {"id": note_id, "version": note["version"]}})

    def fail(self, status: int | None, headers: dict[str, str] | None = None) -> None:
        """Answer every API request with ``status`` (429 with Retry-After, 503, 401 …) until ``fail(None)``."""
        self.fault = None if status is None else (status, dict(headers or {}))

    def sign(self, body: bytes) -> str:
        return "sha256=" + hmac.new(self.webhook_secret.encode(), body, hashlib.sha256).hexdigest()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        app.router.add_get("/notes", self._list)
        app.router.add_get("/notes/{id}", self._get)
        app.router.add_put("/notes/{id}", self._put)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != self.refresh_token:
            return web.json_response({"error": "invalid_grant"}, status=400)
        n = next(self._tokens)
        self.access_token, self.refresh_token = f"at-{n}", f"rt-{n}"  # refresh tokens rotate on every use
        return web.json_response(
            {"access_token": self.access_token, "refresh_token": self.refresh_token, "expires_in": 3600}
        )

    def _check(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {self.access_token}" or not self.access_token:
            return web.json_response({"error": "invalid_token"}, status=401, headers={"X-Request-Id": "req-401"})
        if self.fault is not None:
            status, headers = self.fault
            return web.json_response({"error": f"fault {status}"}, status=status, headers=headers)
        return None

    async def _list(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        after = int(request.query.get("after", "0"))
        limit = min(int(request.query.get("limit", "100")), 100)
        changed = sorted((n for n in self.notes.values() if n["seq"] > after), key=lambda n: n["seq"])
        return web.json_response({"notes": changed[:limit], "has_more": len(changed) > limit})

    async def _get(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        note = self.notes.get(request.match_info["id"])
        if note is None:
            return web.json_response({"error": "not found"}, status=404, headers={"X-Request-Id": "req-404"})
        return web.json_response(note)

    async def _put(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        key = request.headers.get("Idempotency-Key", "")
        if key and key in self.idempotency:
            return web.json_response(self.idempotency[key])  # a retried write replays its first answer
        body = await request.json()
        self.writes += 1
        note = self.put(request.match_info["id"], str(body["text"]))
        if key:
            self.idempotency[key] = note
        return web.json_response(note)
