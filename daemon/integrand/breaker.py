"""A per-sink circuit breaker as pure state transitions.

While open, a sink's deliveries wait without spending attempts. After ``open_for``
one probe is let through (half-open); success closes the breaker, failure
reopens it for twice as long, up to ``max_open_for`` — so a recovered sink is
noticed within ``max_open_for`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Status = Literal["closed", "open", "half_open"]
Permit = Literal["yes", "probe", "no"]


@dataclass(frozen=True, slots=True)
class Breaker:
    threshold: int
    open_for: float
    max_open_for: float
    status: Status = "closed"
    failures: int = 0
    opened_at: float = 0.0
    current_open_for: float = 0.0

    @property
    def reopens_at(self) -> float:
        return self.opened_at + self.current_open_for


def permit(b: Breaker, now: float) -> tuple[Permit, Breaker]:
    """May a delivery go to this sink now? ``probe`` means exactly one, as a test of recovery."""
    if b.status == "closed":
        return "yes", b
    if b.status == "open" and now >= b.reopens_at:
        return "probe", replace(b, status="half_open")
    return "no", b


def on_success(b: Breaker) -> Breaker:
    if b.status == "closed" and b.failures == 0 and b.current_open_for == 0.0:
        return b  # already so: the common case, once per delivered event, skips building a copy
    return replace(b, status="closed", failures=0, current_open_for=0.0)


def on_failure(b: Breaker, now: float) -> Breaker:
    if b.status == "half_open":
        return replace(b, status="open", opened_at=now, current_open_for=min(b.max_open_for, b.current_open_for * 2))
    if b.status == "open":
        return b
    failures = b.failures + 1
    if failures >= b.threshold:
        return replace(
            b,
            status="open",
            failures=failures,
            opened_at=now,
            current_open_for=min(b.open_for, b.max_open_for),
        )
    return replace(b, failures=failures)


def trip(b: Breaker, now: float, open_for: float | None = None) -> Breaker:
    """Open at once (e.g. the sink's credentials were refused)."""
    span = b.max_open_for if open_for is None else open_for
    return replace(b, status="open", opened_at=now, current_open_for=span, failures=max(b.failures, b.threshold))
