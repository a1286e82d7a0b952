"""A sliding-window rate limiter for HubSpot's rolling windows.

Interim: the connector kit brings a shared HTTP helper and rate limiter; when it lands, this
module goes and the connector uses the kit's (the QuickBooks plugin carries the same class).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` given in seconds (the form APIs use); None when absent or unreadable."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
