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
from typing import Any

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


class GuardedServer(web.Server):
    """aiohttp's low-level server with per-connection limits; see GuardedHandler."""

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
        # Connections with no request in progress, oldest first: when the port is full the oldest of these
        # makes room, so a flood of idle or slow-loris connections cannot lock out a sender with a request.
        self.idle: dict[GuardedHandler, None] = {}
        self.evicted = 0

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def refuse(self, kind: str, why: str, peer: str) -> None:
        if self.on_refused is not None:
            self.on_refused(kind)
        self.quiet.event(kind, logging.WARNING, "connection from %s closed: %s", peer, why)


class GuardedHandler(RequestHandler):
    """One connection: counted against the caps, given ``header_timeout`` to send each request head,
    and its malformed requests logged quietly (one line, no traceback, rate-limited)."""

    _guard: GuardedServer
    _peer = "?"
    _counted = False
    _head_timer: asyncio.TimerHandle | None = None

    def __init__(self, manager: GuardedServer, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._chunks = ChunkWatch(manager.body_limit) if manager.body_limit is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self._guard
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        why = None
        if g.per_ip[self._peer] >= g.limits.max_connections_per_ip:
            why = f"{g.per_ip[self._peer]} connections open from this address, the limit is {g.limits.max_connections_per_ip}"
            kind = "per-address connection limit"
        elif g.open >= g.cap:
            victim = next(iter(g.idle), None)
            if victim is not None:
                victim._evict()
            else:
                why = f"{g.open} connections open, the limit (daemon.max_connections) is {g.cap}"
                kind = "connection limit"
        if why is not None:
            g.refuse(kind, why, self._peer)
            assert isinstance(transport, asyncio.Transport)
            transport.write(
                _raw_response(503, "Service Unavailable", f"too many connections: {why}", "Retry-After: 1\r\n")
            )
            transport.close()
            self._manager = None  # connection_lost then has nothing to undo
            return
        self._counted = True
        g.open += 1
        g.per_ip[self._peer] += 1
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        self._uncount()
        super().connection_lost(exc)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            g = self._guard
            g.open -= 1
            g.per_ip[self._peer] -= 1
            if g.per_ip[self._peer] <= 0:
                del g.per_ip[self._peer]

    def _evict(self) -> None:
        """Make room for a new connection: this one has been waiting longest without sending a request."""
        self._guard.evicted += 1
        self._refuse_now(
            503,
            "Service Unavailable",
            "the port is full and this connection sent no request; it was closed to make room",
            kind="evicted idle connection",
        )
        self._uncount()

    def data_received(self, data: bytes) -> None:
        if self._chunks is not None and (why := self._chunks.feed(data)) is not None:
            self._refuse_now(413, "Content Too Large", why)
            return
        super().data_received(data)
        if self._head_timer is None and self._current_request is None and not self._messages:
            self._arm_head_timer()  # the first bytes of a new request head: its clock starts now

    async def finish_response(self, request: Any, resp: Any, start_time: Any) -> Any:
        result = await super().finish_response(request, resp, start_time)
        if self.transport is not None and not self._force_close and self._counted:
            self._guard.idle[self] = None  # kept alive between requests: evictable when the port is full
        return result

    def request_started(self) -> None:
        """Called by the listener when a request's head has been parsed: the head deadline is met."""
        self._disarm_head_timer()

    def _arm_head_timer(self) -> None:
        t = self._guard.limits.header_timeout
        if self.transport is not None:
            self._guard.idle[self] = None
            if t > 0:
                self._head_timer = self._loop.call_later(t, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        self._guard.idle.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse_now(self, status: int, phrase: str, reason: str, kind: str | None = None) -> None:
        """Answer and close without waiting for the request's handler (which then sees the connection gone)."""
        self._guard.idle.pop(self, None)
        self._guard.refuse(kind or f"{status} {phrase}", reason, self._peer)
        transport = self.transport
        if isinstance(transport, asyncio.Transport):
            transport.write(_raw_response(status, phrase, reason))
        self.force_close()
        if transport is not None:
            transport.close()

    def _head_timeout(self) -> None:
        """No complete request head since the connection opened or since bytes of a new one arrived."""
        self._head_timer = None
        transport = self.transport
        if transport is None or self._current_request is not None or self._messages:
            return
        t = self._guard.limits.header_timeout
        self._refuse_now(
            408, "Request Timeout", f"the request head did not arrive within {t:g} s (daemon.header_timeout)"
        )

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
