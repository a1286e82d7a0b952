"""The webhook port's defences against hostile clients: connection caps, read deadlines, quiet refusals.

aiohttp parses HTTP; this module decides how long and how many. An idle, slow or oversized client is
cut off after a bounded time and a bounded number of bytes, a flood of them costs one log line per
interval and a sampled few store writes, and the fds they can hold stay below the process's limit so
well-behaved senders always find the port open.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("integrand.listener")

# fds kept out of the connection cap's reach: SQLite (db, WAL, shm, lock, reader), sinks' and pollers'
# outbound connections, the admin port, logs.
FD_RESERVE = 128
LINGER = 2.0


@dataclass(frozen=True)
class PortLimits:
    """What one client, and all of them together, may hold of the webhook port."""

    max_connections: int = 4096
    max_connections_per_ip: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 15.0
    max_headers: int = 100


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd's default soft limit is 1,024); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # pragma: no cover - a hard limit the kernel refuses (RLIM_INFINITY)
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft, hard


def connection_cap(configured: int) -> int:
    """The connection cap that fits the fds this process may open, leaving room for its own files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, soft - FD_RESERVE))


class QuietLog:
    """At most ``burst`` lines per interval and kind; the rest become one line with counts when it ends.

    Unauthenticated clients choose how often something is refused; they must not choose how much is logged."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 10.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self._window_start = clock()
        self._logged: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()
        self._flush_handle: asyncio.TimerHandle | None = None
        self.total: Counter[str] = Counter()

    def event(self, kind: str, level: int, msg: str, *args: Any, extra: dict[str, Any] | None = None) -> None:
        self.total[kind] += 1
        now = self.clock()
        if now - self._window_start >= self.interval:
            self.flush()
        if self._logged[kind] < self.burst:
            self._logged[kind] += 1
            self.logger.log(level, msg, *args, extra=extra)
            return
        self._suppressed[kind] += 1
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # pragma: no cover - always called from the loop
                return
            delay = max(0.0, self._window_start + self.interval - now)
            self._flush_handle = loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Write the interval's counts (if anything was held back) and start a new interval."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._suppressed:
            elapsed = self.clock() - self._window_start
            counts = ", ".join(f"{k}: {n}" for k, n in self._suppressed.most_common())
            self.logger.warning(
                "%d more like these in the last %.0f s, not logged one by one (%s)",
                sum(self._suppressed.values()),
                elapsed,
                counts,
            )
        self._window_start = self.clock()
        self._logged.clear()
        self._suppressed.clear()


class TokenBucket:
    """``rate`` tokens a second up to ``burst``: how many refused requests get a row in the store."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _raw_response(status: int, phrase: str, reason: str, extra: str = "") -> bytes:
    body = orjson.dumps({"error": reason})
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


class ChunkWatch:
    """Follows a connection's request framing to refuse a chunk that declares more than the body limit
    the moment its size line arrives (aiohttp's parser would wait for the bytes and hand them over).

    It only reads framing (head end, Content-Length, chunk-size lines) and stops following at the first
    thing it does not understand, leaving the request to aiohttp's parser, which is the authority."""

    MAX_HEAD = 64 * 1024

    def __init__(self, limit_for: Callable[[bytes], int | None]):
        self.limit_for = limit_for
        self.state = "head"
        self.buf = b""
        self.skip = 0  # body or chunk bytes still to pass over
        self.limit = 0
        self.seen = 0  # chunk bytes declared so far in this body

    def feed(self, data: bytes) -> str | None:
        """The reason to refuse the current request now, or None."""
        pos, size = 0, len(data)
        if self.buf:
            data, self.buf = self.buf + data, b""
            size = len(data)
        while pos < size and self.state != "off":
            if self.skip:
                n = min(self.skip, size - pos)
                self.skip -= n
                pos += n
            elif self.state == "crlf":
                self.state, self.skip = "size", 2
            else:
                sep = b"\r\n\r\n" if self.state == "head" else b"\r\n"
                end = data.find(sep, pos)
                if end < 0:
                    self.buf = data[pos:]
                    if len(self.buf) > (self.MAX_HEAD if self.state == "head" else 1024):
                        self.state, self.buf = "off", b""
                    return None
                why = self._item(data[pos:end])
                if why is not None:
                    return why
                pos = end + len(sep)
        return None

    def _item(self, item: bytes) -> str | None:
        if self.state == "head":
            low = item.lower()  # one C-speed pass; no header dict (this runs on every request)
            if b"chunked" in low and b"\ntransfer-encoding:" in low:
                parts = item.lstrip(b"\r\n").split(b"\r\n", 1)[0].split(b" ")
                limit = self.limit_for(parts[1]) if len(parts) == 3 else None
                if limit is None:
                    self.state = "off"
                    return None
                self.state, self.limit, self.seen = "size", limit, 0
                return None
            at = low.find(b"\ncontent-length:")
            if at >= 0:
                end = low.find(b"\r", at + 16)
                try:
                    self.skip = int(low[at + 16 : end if end >= 0 else None])
                except ValueError:
                    self.state = "off"
            return None
        if self.state == "size":
            try:
                size = int(item.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.state = "off"
                return None
            if size == 0:
                self.state = "trailer"
                return None
            self.seen += size
            if self.seen > self.limit:
                return f"body exceeds the limit of {self.limit} bytes"  # declared by a chunk size, not yet sent
            self.state, self.skip = "crlf", size
            return None
        if item == b"":  # the blank line after the trailers: the next request's head follows
            self.state = "head"
        return None


# How late a header deadline may be enforced: the sweep closes the heads past their deadline, at most this
# often, instead of one timer per connection; and at most SWEEP_BATCH in one go, the rest after the loop has
# served I/O again (a thousand connections opened at once reach their deadline at once: closing them all in
# one callback would stall every other connection for tens of milliseconds).
SWEEP_GRANULARITY = 0.1
SWEEP_BATCH = 64


class GuardedServer(web.Server):
    """aiohttp's low-level server with per-connection limits.

    A connection costs as little as possible until its first byte: a ``PendingConnection`` (counted, on the
    eviction list, under the header deadline) with none of aiohttp's per-connection state (parser, task,
    keep-alive timer); the ``GuardedHandler`` is built when bytes arrive. Header deadlines are kept in one
    dict in deadline order and enforced by one sweep, not a timer per connection: an idle flood costs an
    accept, a few dict operations and a close each."""

    def __init__(
        self,
        handler: Any,
        *,
        limits: PortLimits,
        quiet: QuietLog,
        on_refused: Callable[[str], None] | None = None,
        body_limit: Callable[[bytes], int | None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            handler,
            keepalive_timeout=limits.keepalive_timeout,
            max_headers=limits.max_headers,
            # After a refusal mid-body aiohttp reads and drops the rest for this long (10 s by default) so the
            # client sees the answer before a reset; a hostile client would hold the connection that long.
            lingering_time=LINGER,
            **kwargs,
        )
        self.limits = limits
        self.cap = connection_cap(limits.max_connections)
        self.quiet = quiet
        self.on_refused = on_refused
        self.body_limit = body_limit
        self.open = 0
        self.per_ip: Counter[str] = Counter()
        # Connections with no request in progress, oldest first, keyed by transport: when the port is full the
        # oldest of ``idle`` (never answered 2xx: silent, slow or refused clients) makes room, and only when
        # none is left the oldest of ``proven`` (kept alive after a 2xx: a sender with a valid signature), so a
        # flood of idle or slow-loris connections cannot lock out, nor churn the connections of, a real sender.
        self.idle: dict[asyncio.BaseTransport, PendingConnection | GuardedHandler] = {}
        self.proven: dict[asyncio.BaseTransport, GuardedHandler] = {}
        # Request heads being waited for: transport -> (deadline, connection), in deadline order (one timeout
        # for all, appended as armed; a connection that gets its handler keeps its place).
        self.heads: dict[asyncio.BaseTransport, tuple[float, PendingConnection | GuardedHandler]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.evicted = 0

    def __call__(self) -> PendingConnection:  # type: ignore[override]
        return PendingConnection(self)

    def handler(self) -> GuardedHandler:
        """aiohttp's protocol for a connection whose first bytes have arrived."""
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def refuse(self, kind: str, why: str, peer: str) -> None:
        if self.on_refused is not None:
            self.on_refused(kind)
        self.quiet.event(kind, logging.WARNING, "connection from %s closed: %s", peer, why)

    def admit(self, transport: asyncio.BaseTransport, peer: str) -> bool:
        """Count a new connection against the caps (making room if the port is full), or refuse it with 503."""
        why = None
        if self.per_ip[peer] >= self.limits.max_connections_per_ip:
            why = f"{self.per_ip[peer]} connections open from this address, the limit is {self.limits.max_connections_per_ip}"
            kind = "per-address connection limit"
        elif self.open >= self.cap:
            victim = next(iter(self.idle.values()), None) or next(iter(self.proven.values()), None)
            if victim is not None:
                victim.evict()
            else:
                why = f"{self.open} connections open, the limit (daemon.max_connections) is {self.cap}"
                kind = "connection limit"
        if why is not None:
            self.refuse(kind, why, peer)
            # Not isinstance(asyncio.Transport): uvloop's transports (what `integrand run` uses) are not.
            transport = cast(asyncio.Transport, transport)
            transport.write(
                _raw_response(503, "Service Unavailable", f"too many connections: {why}", "Retry-After: 1\r\n")
            )
            transport.close()
            return False
        self.open += 1
        self.per_ip[peer] += 1
        return True

    def uncount(self, peer: str) -> None:
        self.open -= 1
        self.per_ip[peer] -= 1
        if self.per_ip[peer] <= 0:
            del self.per_ip[peer]

    def watch_head(self, transport: asyncio.BaseTransport, conn: PendingConnection | GuardedHandler) -> None:
        """A request head is awaited on ``transport`` from now: evictable, and cut at ``header_timeout``."""
        self.proven.pop(transport, None)
        self.idle.pop(transport, None)
        self.idle[transport] = conn
        t = self.limits.header_timeout
        if t <= 0 and isinstance(conn, PendingConnection):
            t = self.limits.keepalive_timeout  # no head deadline: a silent connection still ends, as aiohttp's would
        if t > 0:
            self.heads.pop(transport, None)
            deadline = self._loop.time() + t
            self.heads[transport] = (deadline, conn)
            if self._sweep is None:
                self._sweep = self._loop.call_at(deadline, self._sweep_heads)

    def forget(self, transport: asyncio.BaseTransport) -> None:
        """No longer idle nor waiting for a head (a request started, or the connection is closing)."""
        self.idle.pop(transport, None)
        self.proven.pop(transport, None)
        self.heads.pop(transport, None)

    def _sweep_heads(self) -> None:
        """Close every connection whose head deadline has passed, then sleep until the next one is due."""
        self._sweep = None
        now = self._loop.time()
        for _ in range(SWEEP_BATCH):
            if not self.heads:
                return
            transport, (deadline, conn) = next(iter(self.heads.items()))
            if deadline > now:
                self._sweep = self._loop.call_at(max(deadline, now + SWEEP_GRANULARITY), self._sweep_heads)
                return
            del self.heads[transport]
            conn.head_timeout()
        if self.heads:
            self._sweep = self._loop.call_at(now, self._sweep_heads)  # more are due: after the next I/O poll

    def pre_shutdown(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in [c for c in self.idle.values() if isinstance(c, PendingConnection)]:
            conn.close()
        super().pre_shutdown()


class PendingConnection(asyncio.Protocol):
    """A connection that has sent nothing yet: counted and timed by the guard, nothing else. The first bytes
    hand the transport to a ``GuardedHandler`` (aiohttp's protocol), which keeps this one's head deadline."""

    __slots__ = ("_guard", "_peer", "_transport")

    def __init__(self, guard: GuardedServer):
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if self._guard.admit(transport, self._peer):
            self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport instances
            self._guard.watch_head(transport, self)

    def data_received(self, data: bytes) -> None:
        transport, g = self._transport, self._guard
        if transport is None:  # refused at admission: whatever it sends is dropped with the connection
            return
        self._transport = None  # counted by the handler from now on
        h = g.handler()
        h.adopt(transport, self._peer)
        transport.set_protocol(h)
        h.connection_made(transport)
        h.data_received(data)

    def eof_received(self) -> bool | None:
        return None  # the client closed without a request: close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._transport is not None:
            self._guard.forget(self._transport)
            self._transport = None
            self._guard.uncount(self._peer)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _answer_and_close(self, status: int, phrase: str, reason: str, kind: str | None = None) -> None:
        transport = self._transport
        if transport is None:
            return
        self._guard.forget(transport)
        self._guard.refuse(kind or f"{status} {phrase}", reason, self._peer)
        transport.write(_raw_response(status, phrase, reason))
        transport.close()

    def evict(self) -> None:
        self._guard.evicted += 1
        self._answer_and_close(503, "Service Unavailable", EVICTED, kind="evicted idle connection")
        if self._transport is not None:
            self._transport = None
            self._guard.uncount(self._peer)  # its slot goes to the new connection now, not at connection_lost

    def head_timeout(self) -> None:
        t = self._guard.limits.header_timeout
        if t > 0:
            self._answer_and_close(408, "Request Timeout", _head_late(t))
        elif self._transport is not None:  # the keep-alive timeout of a connection that never sent a byte
            self._guard.forget(self._transport)
            self._transport.close()


EVICTED = "the port is full and this connection sent no complete request; it was closed to make room"
EVICTED_KEPT = "the port is full and this kept-alive connection had no request in progress; it was closed to make room"


def _head_late(t: float) -> str:
    return f"the request head did not arrive within {t:g} s (daemon.header_timeout)"


class GuardedHandler(RequestHandler):
    """One connection past its first byte, handed over by its ``PendingConnection`` (``adopt``: it was counted
    against the caps there): given ``header_timeout`` for each request head, and its malformed requests logged
    quietly (one line, no traceback, rate-limited)."""

    _guard: GuardedServer
    _peer = "?"
    _counted = False
    _tr: asyncio.BaseTransport | None = None

    def __init__(self, manager: GuardedServer, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._chunks = ChunkWatch(manager.body_limit) if manager.body_limit is not None else None

    def adopt(self, transport: asyncio.BaseTransport, peer: str) -> None:
        """Take over a counted connection from its ``PendingConnection``, keeping its place and deadline."""
        self._peer, self._counted, self._tr = peer, True, transport
        g = self._guard
        if transport in g.idle:
            g.idle[transport] = self
        if transport in g.heads:
            g.heads[transport] = (g.heads[transport][0], self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._uncount()
        self._tr = None
        super().connection_lost(exc)

    def _uncount(self) -> None:
        if self._tr is not None:
            self._guard.forget(self._tr)
        if self._counted:
            self._counted = False
            self._guard.uncount(self._peer)

    def evict(self) -> None:
        """Make room for a new connection: this one has been waiting longest without sending a request."""
        self._guard.evicted += 1
        why = EVICTED if self._request_count == 0 else EVICTED_KEPT
        self._refuse_now(503, "Service Unavailable", why, kind="evicted idle connection")
        self._uncount()

    def data_received(self, data: bytes) -> None:
        if self._chunks is not None and (why := self._chunks.feed(data)) is not None:
            self._refuse_now(413, "Content Too Large", why)
            return
        super().data_received(data)
        tr = self._tr
        if tr is not None and tr not in self._guard.heads and self._current_request is None and not self._messages:
            self._guard.watch_head(tr, self)  # the first bytes of a new request head: its clock starts now

    async def finish_response(self, request: Any, resp: Any, start_time: Any) -> Any:
        result = await super().finish_response(request, resp, start_time)
        tr = self._tr
        if tr is not None and self.transport is not None and not self._force_close and self._counted:
            # Kept alive between requests: evictable when the port is full, after every never-answered one
            # if this request was accepted.
            g = self._guard
            g.forget(tr)
            if 200 <= getattr(resp, "status", 0) < 300:
                g.proven[tr] = self
            else:
                g.idle[tr] = self
        return result

    def request_started(self) -> None:
        """Called by the listener when a request's head has been parsed: the head deadline is met."""
        if self._tr is not None:
            self._guard.forget(self._tr)

    def _refuse_now(self, status: int, phrase: str, reason: str, kind: str | None = None) -> None:
        """Answer and close without waiting for the request's handler (which then sees the connection gone)."""
        if self._tr is not None:
            self._guard.forget(self._tr)
        self._guard.refuse(kind or f"{status} {phrase}", reason, self._peer)
        transport = self.transport
        if transport is not None:  # not isinstance(asyncio.Transport): uvloop's transports are not
            transport.write(_raw_response(status, phrase, reason))
        self.force_close()
        if transport is not None:
            transport.close()

    def head_timeout(self) -> None:
        """No complete request head since the connection opened or since bytes of a new one arrived."""
        if self.transport is None or self._current_request is not None or self._messages:
            return
        self._refuse_now(408, "Request Timeout", _head_late(self._guard.limits.header_timeout))

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            reason = (exc.message or type(exc).__name__).splitlines()[0][:200]
            if self._guard.on_refused is not None:
                self._guard.on_refused("malformed request")
            self._guard.quiet.event(
                "malformed request", logging.INFO, "malformed request from %s refused with 400: %s", self._peer, reason
            )
            return
        super().log_exception(*args, **kw)
