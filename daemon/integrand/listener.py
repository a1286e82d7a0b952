"""The webhook port: ``POST /hooks/{source}``, answered 2xx only after the events are committed.

Order per request: source known (404) → body size (413) → signature and
timestamp (401; nothing unauthenticated is parsed) → content type and JSON
(415/400) → events → durable enqueue (503 if the store cannot commit) → 200.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .connector import WebhookRequest, WebhookSource
from .errors import StoreUnavailable, WebhookRejected
from .events import Event, utcnow_iso
from .metrics import Metrics
from .replies import shape_reply
from .routes import Router
from .secrets import REDACTED, is_credential_name
from .store import Store

log = logging.getLogger("integrand.listener")

RETRY_AFTER_UNAVAILABLE = "5"
HOOKS_PREFIX = "/hooks/"


@dataclass(frozen=True)
class SourceRuntime:
    name: str
    connector: WebhookSource | None
    max_body_bytes: int


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers as an operator may see them: anything that could be a credential is replaced."""
    return {str(k): (REDACTED if is_credential_name(k) else str(v)[:500]) for k, v in headers.items()}


def _json(data: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response encoded with orjson (aiohttp's json_response goes through the stdlib encoder)."""
    return web.Response(body=orjson.dumps(data), status=status, headers=headers, content_type="application/json")


def _content_type(request: web.BaseRequest) -> str:
    """The media type without parameters; the usual exact ``application/json`` skips aiohttp's header parser."""
    raw = request.headers.get("Content-Type")
    return raw if raw == "application/json" else request.content_type


def _error(status: int, reason: str, **headers: str) -> web.Response:
    return _json({"error": reason}, status, headers or None)


class Listener:
    def __init__(
        self,
        sources: dict[str, SourceRuntime],
        store: Store,
        router: Router,
        *,
        public_url: str | None = None,
        rejections_kept: int = 1000,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        on_accepted: Callable[[str, Sequence[Event]], None] | None = None,
    ):
        self.sources = sources
        self.store = store
        self.router = router
        self.public_url = public_url.rstrip("/") if public_url else None
        self.rejections_kept = rejections_kept
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.on_accepted = on_accepted
        self.stopping = False
        self.in_flight = 0

    def server(self) -> web.Server:
        """aiohttp's low-level server: the port has one route, so web.Application's router and
        middleware machinery (a fifth of a bare handler's CPU per request) buy nothing here."""
        return web.Server(self.handle, access_log=None)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        name = path[len(HOOKS_PREFIX) :] if path.startswith(HOOKS_PREFIX) else ""
        if not name or "/" in name:
            return _error(404, f"no endpoint at {path}; webhooks are POSTed to {HOOKS_PREFIX}{{source}}")
        source = self.sources.get(name)
        label = name if source is not None else "unknown"
        self.in_flight += 1
        try:
            resp = await self._handle(request, name, source)
        finally:
            self.in_flight -= 1
        if source is not None and source.connector is not None:
            resp = shape_reply(source.connector, resp)  # a provider's own ack shape (SOAP), if it has one
        self.metrics.webhooks.inc(label, str(resp.status))
        return resp

    async def _handle(self, request: web.BaseRequest, name: str, source: SourceRuntime | None) -> web.StreamResponse:
        if request.method != "POST":
            return _error(405, f"{request.method} is not allowed; webhooks are POSTed", Allow="POST")
        if self.stopping:
            resp = _error(503, "integrand is shutting down", **{"Retry-After": RETRY_AFTER_UNAVAILABLE})
            resp.force_close()
            return resp
        if source is None:
            return self._reject(request, name, 404, f"unknown source {name!r}")
        if source.connector is None:
            return self._reject(request, name, 404, f"source {name!r} does not accept webhooks")
        try:
            body = await self._read_body(request, source.max_body_bytes)
            received_at = utcnow_iso()
            headers = request.headers
            wr = WebhookRequest(
                source=name,
                method=request.method,
                # The URL as the sender called it (HubSpot signs it): the request target exactly as sent.
                url=(self.public_url or f"{request.scheme}://{request.host}") + request.raw_path,
                headers=headers,
                body=body,
                received_at=received_at,
                content_type=_content_type(request),
                remote=request.remote,
            )
            source.connector.verify(wr, self.clock())
            events = source.connector.parse(wr)
        except WebhookRejected as e:
            resp = self._reject(request, name, e.status, e.reason)
            if e.status == 413:
                resp.force_close()
            return resp
        except Exception:
            log.exception("source %s: connector failed on a webhook", name)
            return _error(500, f"source {name!r} failed to process the webhook; it was not stored")

        items = [(ev, self.router.sinks_for(ev)) for ev in events]
        try:
            result = await self.store.enqueue(items)
        except StoreUnavailable as e:
            log.error("source %s: webhook refused with 503, store unavailable: %s", name, e)
            return _error(
                503,
                "the event store cannot commit right now; retry later",
                **{"Retry-After": RETRY_AFTER_UNAVAILABLE},
            )
        self.metrics.events.inc(name, "accepted", amount=result.accepted)
        if result.duplicates:
            self.metrics.events.inc(name, "duplicate", amount=result.duplicates)
        if self.on_accepted is not None and result.accepted:
            self.on_accepted(name, events)
        return _json({"accepted": result.accepted, "duplicates": result.duplicates})

    @staticmethod
    async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
        declared = request.content_length
        if declared is not None and declared > limit:
            raise WebhookRejected(f"body of {declared} bytes exceeds the limit of {limit} bytes", status=413)
        content = request.content
        if content.is_eof():
            # The whole body has arrived with the headers (the usual webhook): take it without awaiting.
            body = content.read_nowait()
            while not content.at_eof():
                body += content.read_nowait()
            if len(body) > limit:
                raise WebhookRejected(f"body exceeds the limit of {limit} bytes", status=413)
            return body
        chunks, size = [], 0
        async for chunk in content.iter_any():
            size += len(chunk)
            if size > limit:
                raise WebhookRejected(f"body exceeds the limit of {limit} bytes", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    def _reject(self, request: web.BaseRequest, source: str, status: int, reason: str) -> web.Response:
        log.info("source %s: refused webhook from %s with %d: %s", source, request.remote, status, reason)
        self.store.record_rejection(
            source, status, reason, request.remote, redact_headers(request.headers), self.rejections_kept
        )
        return _error(status, reason)
