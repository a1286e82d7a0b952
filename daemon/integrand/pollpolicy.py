"""When to poll next: a pure function of what past polls found, so tests and the simulator drive it with a fake clock.

The model (see docs/polling.md): changes arrive as a Poisson process whose rate λ
varies (quiet nights, busy hours, bursts). The goal is a detection latency target —
``target_latency`` for 95% of changes — for as few requests as possible. Polling
every ``target_latency`` makes every change on time; polling faster buys nothing for
that goal, so ``max(min_interval, target_latency)`` is the floor. When changes are
rare, most of the requests that polling at the floor would make find nothing; the
policy then waits until about ``aggressiveness`` changes are expected:

    T = clamp(aggressiveness / λ,  max(min_interval, target_latency),  max_interval)

``λ`` is an exponentially decaying count of the changes found (half-life
``rate_half_life``; no division by the gap between polls, so multi-page passes and
irregular polls need no special case). Optionally (``seasonal``) it is raised to
what the same hour of the day looked like on previous days, so the policy is already
fast when the working day starts.

On top of the rate rule, in this order: more pages waiting → poll again at once;
errors → exponential backoff with jitter (the rate state is left alone); a
provider's ``Retry-After`` → at least that long; a budget the provider reports →
keep ``budget_reserve`` of it for the sinks' writes and spread the rest until it
resets; a configured hourly budget → never more than ``max_requests_per_hour``
requests in any 3600-second window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

HOUR = 3600.0
DAY = 86400.0
BUCKETS = 24

Reason = Literal["rate", "more", "error", "retry-after", "budget", "provider-budget"]


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """A source's polling settings."""

    min_interval: float = 5.0
    max_interval: float = 900.0
    target_latency: float = 60.0
    max_requests_per_hour: int | None = None
    budget_reserve: float = 0.2
    aggressiveness: float = 0.2
    rate_half_life: float = 600.0
    seasonal: bool = False
    error_base: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")
        if self.target_latency <= 0 or self.aggressiveness <= 0 or self.rate_half_life <= 0:
            raise ValueError("target_latency, aggressiveness and rate_half_life must be positive")
        if not 0 <= self.budget_reserve < 1:
            raise ValueError("budget_reserve must be in [0, 1)")
        if self.max_requests_per_hour is not None and self.max_requests_per_hour < 1:
            raise ValueError("max_requests_per_hour must be at least 1")


@dataclass(frozen=True, slots=True)
class Observation:
    """What one poll request came back with."""

    started: float
    changes: int = 0
    more: bool = False
    error: bool = False
    retry_after: float | None = None
    budget_remaining: int | None = None
    budget_limit: int | None = None
    budget_reset: float | None = None


@dataclass(frozen=True, slots=True)
class PollState:
    """What the policy remembers between polls."""

    rate: float = 0.0
    updated: float | None = None
    errors: int = 0
    requests: tuple[float, ...] = ()
    season: tuple[float, ...] = field(default_factory=lambda: (0.0,) * BUCKETS)
    interval: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    delay: float
    reason: Reason


def decay(policy: PollPolicy, state: PollState, now: float) -> PollState:
    """Age the rate estimate to ``now`` and fold it into the hour-of-day profile."""
    if state.updated is None:
        return replace(state, updated=now)
    dt = max(0.0, now - state.updated)
    if dt == 0:
        return state
    tau = policy.rate_half_life / math.log(2)
    rate = state.rate * math.exp(-dt / tau)
    season = state.season
    if policy.seasonal:
        # Each hour bucket moves half-way to the hour's mean rate per day it is observed.
        # Rates above the one that already means "poll at the floor" are capped, so one burst does
        # not make its hour look busy for days.
        b = int((state.updated % DAY) // HOUR)
        w = min(1.0, dt / HOUR) * 0.5
        cap = policy.aggressiveness / max(policy.min_interval, policy.target_latency)
        sample = min(cap, (state.rate + rate) / 2)
        season = (*season[:b], season[b] + w * (sample - season[b]), *season[b + 1 :])
    return replace(state, rate=rate, updated=now, season=season)


def expected_rate(policy: PollPolicy, state: PollState, now: float, horizon: float) -> float:
    """Changes per second to plan for: the recent rate, or the daily profile now and ``horizon`` ahead."""
    rate = state.rate
    if policy.seasonal:
        for t in (now, now + horizon):
            rate = max(rate, state.season[int((t % DAY) // HOUR)])
    return rate


def rate_interval(policy: PollPolicy, rate: float) -> float:
    """Wait until ``aggressiveness`` changes are expected, but never less than the target latency needs.

    Polling faster than ``target_latency`` cannot make changes any more on time, so
    the floor is ``max(min_interval, target_latency)``; the ceiling is ``max_interval``.
    """
    floor = min(policy.max_interval, max(policy.min_interval, policy.target_latency))
    if rate <= 0:
        return policy.max_interval
    return min(policy.max_interval, max(floor, policy.aggressiveness / rate))


def budget_wait(policy: PollPolicy, requests: tuple[float, ...], now: float) -> float:
    """Seconds until one more request keeps every 3600 s window within ``max_requests_per_hour``."""
    n = policy.max_requests_per_hour
    if n is None or len(requests) < n:
        return 0.0
    # A millisecond more than the exact boundary, so float rounding never lets n + 1 into one window.
    return max(0.0, requests[-n] + HOUR + 0.001 - now)


def provider_wait(policy: PollPolicy, obs: Observation) -> float | None:
    """Pacing from a provider-reported budget, keeping ``budget_reserve`` of it for sink writes."""
    if obs.budget_remaining is None:
        return None
    keep = math.ceil(policy.budget_reserve * (obs.budget_limit or obs.budget_remaining))
    spare = obs.budget_remaining - keep
    reset = obs.budget_reset if obs.budget_reset is not None else policy.max_interval
    if spare <= 0:
        return reset
    return reset / spare


def observe(
    policy: PollPolicy, state: PollState, now: float, obs: Observation, rand: float = 0.5
) -> tuple[PollState, Decision]:
    """Record a finished poll and decide how long to wait before the next one (``rand`` in [0, 1) is jitter)."""
    state = decay(policy, state, now)
    tau = policy.rate_half_life / math.log(2)
    requests = (*(t for t in state.requests if t > now - HOUR), obs.started)
    if policy.max_requests_per_hour is not None:
        requests = requests[-policy.max_requests_per_hour :]
    if obs.error:
        errors = state.errors + 1
        state = replace(state, errors=errors, requests=requests)
        base = policy.error_base or policy.min_interval
        cap = min(policy.max_interval, base * 2.0 ** min(errors - 1, 62))
        delay = max(policy.min_interval, cap / 2 + rand * cap / 2)
        decision = Decision(delay, "error")
    else:
        state = replace(state, rate=state.rate + obs.changes / tau, errors=0, requests=requests)
        if obs.more:
            decision = Decision(0.0, "more")
        else:
            rate = expected_rate(policy, state, now, state.interval or 0.0)
            interval = rate_interval(policy, rate)
            state = replace(state, interval=interval)
            decision = Decision(interval, "rate")
    if obs.retry_after is not None and obs.retry_after > decision.delay:
        decision = Decision(obs.retry_after, "retry-after")
    pw = provider_wait(policy, obs)
    if pw is not None and pw > decision.delay:
        decision = Decision(pw, "provider-budget")
    bw = budget_wait(policy, state.requests, now)
    if bw > decision.delay:
        decision = Decision(bw, "budget")
    return state, decision
