"""A per-realm rate limiter and QuickBooks time helpers.

Interim: the connector kit brings a shared HTTP helper and rate limiter; when it lands,
``RateLimiter``/``limiter_for`` move there and this module keeps only the QuickBooks parts.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Protocol


class PauseBoard(Protocol):
    """Where pauses after a 429 are kept: integrand's shared HTTP pool (``ctx.http.pool``) fits."""

    def pause(self, key: str, seconds: float) -> None: ...

    def paused_for(self, key: str) -> float: ...


class RateLimiter:
    """Sliding-window limits (e.g. 10 per second *and* 500 per minute) as the server counts them.

    A request is counted from when its answer came back (it certainly reached the server by
    then), and while it is in flight it counts as happening now; so however the network delays
    requests, the server never sees more than ``n`` arrivals inside any window.
    """

    def __init__(
        self,
        limits: list[tuple[int, float]],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        board: PauseBoard | None = None,
        key: str = "",
    ):
        self.limits = [(n, w) for n, w in limits if n > 0]
        self._board = board
        self._key = key
        self._clock = clock
        self._sleep = sleep
        self._done: deque[float] = deque()
        self._in_flight = 0
        self._changed = asyncio.Event()
        self._paused_until = 0.0
        self.waited = 0.0

    def pause(self, seconds: float) -> None:
        """Hold every caller for ``seconds`` (the provider said 429: wait, do not hammer).

        With a board (integrand's shared HTTP pool) the pause lives there, under this account's key,
        so every connector of the account and an operator's ``clear_pauses`` see the same one.
        """
        if self._board is not None:
            self._board.pause(self._key, seconds)
        else:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when none)."""
        if self._board is not None:
            return self._board.paused_for(self._key)
        return max(0.0, self._paused_until - self._clock())

    def _delay(self, now: float) -> float | None:
        """Seconds to wait before one more request may start; None: wait for one in flight to finish."""
        delay = self.paused_for()
        longest = max((w for _, w in self.limits), default=0.0)
        while self._done and self._done[0] <= now - longest:
            self._done.popleft()
        for n, window in self.limits:
            if self._in_flight >= n:
                return None
            inside = [t for t in self._done if t > now - window]
            if self._in_flight + len(inside) >= n:
                # The oldest finished request that keeps us at the limit must leave the window first.
                delay = max(delay, inside[-(n - self._in_flight)] + window - now)
        return delay

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one request's place in every window from start until its answer is in."""
        while True:
            now = self._clock()
            delay = self._delay(now)
            if delay is not None and delay <= 0:
                break
            self._changed.clear()
            if delay is None:
                await self._changed.wait()
            else:
                self.waited += delay
                await self._sleep(delay)
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._done.append(self._clock())
            self._changed.set()


# Weak values: a limiter lives as long as a connector uses it (a fresh fake on a reused port starts clean).
_LIMITERS: weakref.WeakValueDictionary[tuple[str, str], RateLimiter] = weakref.WeakValueDictionary()


def limiter_for(key: tuple[str, str], limits: list[tuple[int, float]], board: PauseBoard | None = None) -> RateLimiter:
    """One limiter per (API base, realm) in this process, shared by the source and the sink of the same company."""
    lim = _LIMITERS.get(key)
    if lim is None or lim.limits != [(n, w) for n, w in limits if n > 0]:
        lim = RateLimiter(limits, board=board, key=f"quickbooks:{key[1]}")
        _LIMITERS[key] = lim
    return lim


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` given in seconds (the form APIs use); None when absent or unreadable."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def parse_time(value: str) -> datetime:
    """QuickBooks timestamps come as ``2015-10-05T14:42:19-0700``, ``…-08:00`` or CloudEvents' nanosecond ``…Z``."""
    v = value.strip()
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    # Python's parser takes at most microseconds; CloudEvents times carry nanoseconds.
    if "." in v:
        head, _, rest = v.partition(".")
        digits = ""
        for ch in rest:
            if not ch.isdigit():
                break
            digits += ch
        v = head + "." + digits[:6].ljust(6, "0") + rest[len(digits) :]
    dt = datetime.fromisoformat(v)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def utc_version(value: str) -> str:
    """A sortable UTC version string (``2015-10-05T21:42:19Z``) from any QuickBooks timestamp."""
    # Whole seconds, always: QuickBooks keeps LastUpdatedTime to the second, and one format keeps
    # versions comparable as strings (integrand's entity table compares them that way).
    return parse_time(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def qbo_time(dt: datetime, offset_hours: int = -8) -> str:
    """Format as QuickBooks does in API bodies: seconds and the company's UTC offset (``-08:00``)."""
    from datetime import timedelta, timezone

    tz = timezone(timedelta(hours=offset_hours))
    return dt.astimezone(tz).isoformat(timespec="seconds")
