"""The webhook port: ``POST /hooks/{source}``, answered 2xx only after the events are committed.

Order per request: source known (404) → body size (413) and read deadline (408)
→ signature and timestamp (401; nothing unauthenticated is parsed) → content
type and JSON (415/400) → events, each checked to be storable (depth, UTF-8:
400) → durable enqueue (503 if the store cannot commit) → 200. Connection-level
limits (caps, head deadline, keep-alive) live in ``guard``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from .connector import WebhookRequest, WebhookSource
from .errors import StoreUnavailable, WebhookRejected
from .events import Event, utcnow_iso
from .frontdoor import REQUEST_ID
from .guard import GuardedHandler, GuardedServer, PortLimits, QuietLog, TokenBucket
from .intake import intake
from .metrics import Metrics
from .replies import shape_reply, shapes_replies
from .routes import Router
from .secrets import REDACTED, is_credential_name
from .store import Store, UnstorableEvent

log = logging.getLogger("integrand.listener")

RETRY_AFTER_UNAVAILABLE = "5"
HOOKS_PREFIX = "/hooks/"
# Request ids: 16 random hex digits per process and a 16-digit counter, unique across restarts and nodes.
# (uuid4 per request cost a getrandom() system call each: 2 % of a webhook's CPU under load.)
_RID_PREFIX = secrets.token_hex(8)
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    """32 hex digits naming one webhook request (when no trusted proxy gave one)."""
    return f"{_RID_PREFIX}{next(_rid_counter):016x}"


@dataclass(frozen=True)
class SourceRuntime:
    name: str
    connector: WebhookSource | None
    max_body_bytes: int
    max_json_depth: int = 64
    # Whether the connector answers in its own shape (replies.py): decided once, not on every request.
    shapes_replies: bool = dataclasses.field(init=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes_replies", self.connector is not None and shapes_replies(self.connector))


def _printable(text: str | None) -> str | None:
    """A header or path as the store and the log can take it: undecodable bytes shown as U+FFFD."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def deeper_than(data: Any, limit: int) -> bool:
    """Whether parsed JSON nests more than ``limit`` arrays/objects deep (``{}`` is depth 1)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        t = type(value)
        if t is dict:
            children = value.values()
        elif t is list:
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if type(c) is dict or type(c) is list)
    return False


def unstorable(events: Sequence[Event], body: bytes, max_depth: int) -> str | None:
    """Why these events must not be stored, or None: nested deeper than the limit (orjson cannot write 255
    levels, and a hostile sender chooses the depth). What cannot be serialised at all the store refuses
    alone (UnstorableEvent) before it is queued; ``unstorable_reason`` words that refusal."""
    # Nesting can only exceed the limit if the body holds that many brackets: one C-speed count skips the walk.
    if body.count(b"{") + body.count(b"[") <= max_depth:
        return None
    for ev in events:
        if deeper_than(ev.data, max_depth):
            return f"JSON nested deeper than {max_depth} levels (daemon.max_json_depth)"
    return None


def unstorable_reason(events: Sequence[Event], error: BaseException) -> str:
    """The sender's answer when the store could not serialise an event: usually bytes that are not UTF-8."""
    for ev in events:
        for field in ("id", "type", "entity", "entity_id", "version", "occurred_at"):
            v = getattr(ev, field)
            if isinstance(v, str) and not _encodes(v):
                return f"event {field} (from a header or the body) is not valid UTF-8"
    return f"event cannot be stored: {str(error.__cause__ or error)[:200]}"


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers as an operator may see them: anything that could be a credential is replaced."""
    return {
        str(_printable(k)): (REDACTED if is_credential_name(k) else str(_printable(str(v)[:500])))
        for k, v in headers.items()
    }


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
        limits: PortLimits | None = None,
        rejections_per_second: float = 10.0,
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
        self.limits = limits or PortLimits()
        # Refusals are chosen by unauthenticated clients: logged at most a few per interval, and only a
        # sampled few (a token bucket) written to the store, so a flood costs neither log nor disk.
        self.quiet = QuietLog(log)
        self.recorded = TokenBucket(rejections_per_second, max(1, int(rejections_per_second * 10)))
        self.guarded: GuardedServer | None = None  # the port's server, once made (its counts, for tests)

    def server(
        self, wrap: Callable[[Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]], Any] | None = None
    ) -> web.Server:
        """aiohttp's low-level server: the port has one route, so web.Application's router and
        middleware machinery (a fifth of a bare handler's CPU per request) buy nothing here.
        ``wrap`` puts app.py's front door (proxy headers, no banner) around the handler."""
        self.guarded = GuardedServer(
            wrap(self.handle) if wrap is not None else self.handle,
            access_log=None,
            limits=self.limits,
            quiet=self.quiet,
            on_refused=lambda kind: self.metrics.webhooks.inc("-", kind),  # source "-": before any source is known
            body_limit=self._body_limit,
        )
        return self.guarded

    def _body_limit(self, target: bytes) -> int | None:
        """The body limit for a raw request target, as the connection guard sees it before aiohttp."""
        path = target.split(b"?", 1)[0]
        if not path.startswith(b"/hooks/"):
            return None
        source = self.sources.get(path[7:].decode("latin-1"))
        return source.max_body_bytes if source is not None else None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        if isinstance(protocol, GuardedHandler):
            protocol.request_started()
        # Every request has an id: a trusted proxy's (front door) or one of ours. It is answered in a header,
        # logged with the request's lines and stored with its events, so a sender's, a proxy's and our
        # records of one request can be matched (`integrand events show` says which request brought an event).
        # (The request's mapping is empty unless the front door put a proxy's id in it: asking only then spares
        # every other request a KeyError raised and caught inside Mapping.get.)
        rid = (request.get(REQUEST_ID) if len(request) else None) or new_request_id()
        path = request.path
        name = path[len(HOOKS_PREFIX) :] if path.startswith(HOOKS_PREFIX) else ""
        resp: web.StreamResponse
        if not name or "/" in name:
            resp = _error(404, f"no endpoint at {_printable(path)}; webhooks are POSTed to {HOOKS_PREFIX}{{source}}")
            resp.headers["X-Request-Id"] = rid
            return resp
        source = self.sources.get(name)
        label = name if source is not None else "unknown"
        self.in_flight += 1
        try:
            resp = await self._handle(request, name, source, rid)
        finally:
            self.in_flight -= 1
        if source is not None and source.shapes_replies:
            assert source.connector is not None
            resp = shape_reply(source.connector, resp)  # a provider's own ack shape (SOAP)
        resp.headers["X-Request-Id"] = rid
        self.metrics.webhooks.inc(label, str(resp.status))
        return resp

    async def _handle(
        self, request: web.BaseRequest, name: str, source: SourceRuntime | None, rid: str
    ) -> web.StreamResponse:
        if request.method != "POST":
            return _error(405, f"{request.method} is not allowed; webhooks are POSTed", Allow="POST")
        if self.stopping:
            resp = _error(503, "integrand is shutting down", **{"Retry-After": RETRY_AFTER_UNAVAILABLE})
            resp.force_close()
            return resp
        if source is None:
            return self._reject(request, rid, name, 404, f"unknown source {name!r}")
        if source.connector is None:
            return self._reject(request, rid, name, 404, f"source {name!r} does not accept webhooks")
        try:
            if request.content.is_eof():  # the usual webhook: the whole body came with the headers
                body = await self._read_body(request, source.max_body_bytes)
            else:
                async with asyncio.timeout(self.limits.body_timeout or None):
                    body = await self._read_body(request, source.max_body_bytes)
        except WebhookRejected as e:
            resp = self._reject(request, rid, name, e.status, e.reason)
            resp.force_close()  # the rest of the body is not read
            return resp
        except TimeoutError:
            t = self.limits.body_timeout
            resp = self._reject(
                request, rid, name, 408, f"the body did not arrive within {t:g} s (daemon.body_timeout)"
            )
            resp.force_close()
            return resp
        except (ConnectionError, RequestPayloadError, HttpProcessingError) as e:
            # The client left mid-body or sent a body that cannot be decoded: its problem, not a failure here.
            self.quiet.event(
                "body not read",
                logging.INFO,
                "source %s: body from %s not read: %s",
                name,
                request.remote,
                e,
                extra={"request_id": rid},
            )
            resp = _error(400, f"the body could not be read: {e}")
            resp.force_close()
            return resp
        try:
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
            problem = unstorable(events, body, source.max_json_depth)
            if problem is not None:
                raise WebhookRejected(problem, status=400)
        except WebhookRejected as e:
            return self._reject(request, rid, name, e.status, e.reason)
        except UnicodeError:
            # aiohttp keeps undecodable header bytes as surrogates; a scheme that signs the header cannot encode it.
            return self._reject(request, rid, name, 400, "a header the signature covers is not valid UTF-8")
        except Exception:
            log.exception("source %s: connector failed on a webhook", name, extra={"request_id": rid})
            return _error(500, f"source {name!r} failed to process the webhook; it was not stored")

        try:
            result = await intake(
                self.store,
                self.router,
                name,
                events,
                metrics=self.metrics,
                on_accepted=self.on_accepted,
                request_id=rid,
            )
        except UnstorableEvent as e:  # refused before it was queued: nobody else's commit is affected
            return self._reject(request, rid, name, 400, unstorable_reason(events, e))
        except StoreUnavailable as e:
            # One line per interval, not per request: during an outage every sender retries.
            self.quiet.event(
                "503 store unavailable",
                logging.ERROR,
                "source %s: webhook refused with 503, store unavailable: %s",
                name,
                e,
                extra={"request_id": rid},
            )
            return _error(
                503,
                "the event store cannot commit right now; retry later",
                **{"Retry-After": RETRY_AFTER_UNAVAILABLE},
            )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "source %s: webhook stored, %d event(s) accepted, %d duplicate(s)",
                name,
                result.accepted,
                result.duplicates,
                extra={"request_id": rid},
            )
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

    def _reject(self, request: web.BaseRequest, rid: str, source: str, status: int, reason: str) -> web.Response:
        remote, source = _printable(request.remote), str(_printable(source))
        self.quiet.event(
            f"{status}",
            logging.INFO,
            "source %s: refused webhook from %s with %d: %s",
            source,
            remote,
            status,
            reason,
            extra={"request_id": rid},
        )
        if self.recorded.take():
            self.store.record_rejection(
                source, status, reason, remote, redact_headers(request.headers), self.rejections_kept
            )
        return _error(status, reason)
