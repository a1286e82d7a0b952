"""When to poll next: a pure function of what past polls found, so tests and the simulator drive it with a fake clock.

The model (see docs/polling.md): changes arrive as a Poisson process whose rate λ(t)
varies (quiet nights, busy hours, bursts). The goal is a detection latency target,
``target_latency`` for 95% of all changes, for as few requests as possible. A change
made ``target_latency`` or more before the next poll is late, so an interval of
length T whose first T - L seconds have rate λ costs one request and λ·(T - L)
expected late changes. The policy prices a late change at μ requests and picks the
T that minimises the cost per second, ``(1 + μ·Λ(T)) / T`` with Λ(T) the expected
late changes (a renewal-reward argument); μ is learnt online so that about
``late_share`` of the changes are late (dual ascent on the p95 constraint).

What goes into λ:

* the **change times** the poll returned (``updated_at`` / versions), each counted at
  its own time with an exponential kernel (half-life ``rate_half_life``), so a burst
  that ended before a slow poll counts less than one still going on;
* **burst end**: after E seconds without a change, the rate estimate is capped at the
  one-sided (1 - ``quiet_confidence``) upper confidence bound of a Poisson rate that
  produced nothing in E seconds, -ln(a)/E: once k empty polls would have had a
  probability below a under the estimate, the burst's influence ends;
* **seasonality**: the mean rate of every hour of the week (bursts included: their
  expected cost is what matters), planned with ahead of time, so the interval shortens
  before an hour that is usually busy; the profile is part of the state the poller
  persists in the store;
* **spill**: an hour whose days vary far beyond a Poisson count (bursts at random times)
  lends half its rate to the hours beside it (:func:`spilled`): a burst window's edges;
* **bursts as onsets**: a burst going on is seen at the first poll inside it, so after a
  poll that saw none only the bursts that start meanwhile can make late changes; each
  hour's rate is split into background and bursts (:func:`backgrounds`), the bursts
  counted on a ramp (:func:`onset_late`), which gives busy hours an interval between the
  floor and the ceiling; with a full week, the price is the one at which this plan on the
  profile leaves ``late_share`` late (:func:`onset_price`);
* **recent history**, before a week's profile exists: change counts of the last periods
  of 10 target latencies give the price a floor (:func:`recent_price`) and the rate a
  floor at their median (:func:`ordinary_rate`), so a patternless source stays at the floor;
* **webhook nudges** count as changes seen on time (the poller brings the next poll
  forward itself), reconciliation's missed changes as changes found (see
  :func:`reconciled`); while webhooks carry most changes, scheduled polls wait
  ``max_interval`` and the nudges are the fast path (:func:`trusting`).

Hard limits on top, in this order: more pages waiting → poll again at once; errors →
exponential backoff with jitter (the learnt state is left alone); a provider's
``Retry-After`` → at least that long; a budget the provider reports → keep
``budget_reserve`` of it for the sinks' writes and spread the rest until it resets; a
configured hourly budget → never more than ``max_requests_per_hour`` requests in any
3600-second window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

HOUR = 3600.0
DAY = 86400.0
WEEK_HOURS = 168
# 1970-01-01 was a Thursday: hour-of-week buckets start on Monday 00:00 UTC.
_EPOCH_WEEKDAY = 3
MAX_PRICE = 1e5  # requests per late change; the learnt price stays within [1/MAX_PRICE, MAX_PRICE]
PRICE_UP, PRICE_DOWN = 0.7, 0.0  # how far (in log) feedback may raise or lower the planned price (see _price)
GROWTH = 4.0  # an interval at most this many times the previous one: one wrong estimate is not a 30-minute gap
SLOW_HALF_LIVES = 60.0  # the default half-life of the stable rate estimate, in target latencies
FAST_HALF_LIVES = 10.0  # the fast rate estimate's half-life, in target latencies
LAG_HALF_LIFE = 6 * HOUR  # how quickly a measured index lag is forgotten
# An hour lends nothing while its count varies from day to day by less than half its mean beyond a
# Poisson count's spread (sd/mean <= 0.5: office hours, a nightly export), all it may once that is 1.
LUMPY_FROM, LUMPY_FULL = 0.25, 1.0
# Before the hour-of-week profile has a full week, the price comes from the recent history instead: change
# counts per period of RECENT_PERIOD target latencies, the last RECENT_PERIODS of them (a day at a 60 s target).
RECENT_PERIOD, RECENT_PERIODS = 10.0, 144
# Bursts (see onset_cost): a change more than ISOLATED_GAP target latencies after the one before it is isolated
# (background, or a burst's first); a run of at least BURST_MIN changes with shorter gaps is a burst, and the
# source's burst length is a running mean of those runs' lengths (BURST_LENGTH target latencies until one is seen).
ISOLATED_GAP, BURST_MIN, BURST_LENGTH, BURST_WEIGHT = 1.0, 10, 5.0, 0.2

Reason = Literal["rate", "more", "error", "retry-after", "budget", "provider-budget", "webhooks"]


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """A source's polling settings."""

    min_interval: float = 5.0
    max_interval: float = 900.0
    target_latency: float = 60.0
    max_requests_per_hour: int | None = None
    budget_reserve: float = 0.2
    # The starting price of a late change is 1/aggressiveness requests (it is learnt from then on).
    aggressiveness: float = 0.2
    rate_half_life: float | None = None  # None: SLOW_HALF_LIVES target latencies (1 h at a 60 s target)
    seasonal: bool = True
    error_base: float | None = None
    late_share: float = 0.04  # aim: 4% late, so the p95 stays under the target with a margin
    quiet_confidence: float = 0.05  # a, the burst-end rule's false-alarm probability
    price_step: float = 0.02  # dual-ascent step: log μ moves by this per late change beyond the share
    # Webhooks nudge this source's polls (the poller brings the next poll forward on each one): while they
    # deliver most changes, scheduled polls wait max_interval and only look for the lost ones.
    trust_nudges: bool = True
    trust_lost_share: float = 0.5  # trust ends when polls find more than this share of the changes

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")
        if self.target_latency <= 0 or self.aggressiveness <= 0 or (self.rate_half_life or 1) <= 0:
            raise ValueError("target_latency, aggressiveness and rate_half_life must be positive")
        if not 0 <= self.budget_reserve < 1:
            raise ValueError("budget_reserve must be in [0, 1)")
        if self.max_requests_per_hour is not None and self.max_requests_per_hour < 1:
            raise ValueError("max_requests_per_hour must be at least 1")
        if not 0 < self.late_share < 1 or not 0 < self.quiet_confidence < 1 or self.price_step < 0:
            raise ValueError("late_share and quiet_confidence must be in (0, 1), price_step >= 0")
        if not 0 < self.trust_lost_share < 1:
            raise ValueError("trust_lost_share must be in (0, 1)")


@dataclass(frozen=True, slots=True)
class Observation:
    """What one poll request came back with.

    ``change_times`` are the change times (epoch seconds) of the *new* changes found;
    ``changes`` beyond them count for the rate at ``started`` with no latency known.
    ``pushed`` is how many changes webhooks delivered since the previous poll.
    """

    started: float
    changes: int = 0
    more: bool = False
    error: bool = False
    retry_after: float | None = None
    budget_remaining: int | None = None
    budget_limit: int | None = None
    budget_reset: float | None = None
    change_times: tuple[float, ...] = ()
    pushed: int = 0


@dataclass(frozen=True, slots=True)
class PollState:
    """What the policy remembers between polls (all of it JSON-able: see :func:`to_json`)."""

    rate: float = 0.0  # recent change rate (per second) at `updated`
    fast: float = 0.0  # the same with a half-life of FAST_HALF_LIVES target latencies: sees a burst at once
    updated: float | None = None
    last_change: float | None = None  # newest change time seen
    quiet_from: float | None = None  # when watching started, for the burst-end rule before any change
    errors: int = 0
    requests: tuple[float, ...] = ()
    interval: float | None = None
    season: tuple[float, ...] = field(default_factory=lambda: (0.0,) * WEEK_HOURS)
    season_n: tuple[int, ...] = field(default_factory=lambda: (0,) * WEEK_HOURS)
    hour: int | None = None  # the absolute hour whose changes `hour_count` counts
    hour_count: float = 0.0
    price: float = 0.0  # log of the feedback correction to μ (dual ascent on the late share)
    base_price: float | None = None  # μ planned from the hour-of-week profile; None: not a full week yet
    plan_rates: tuple[float, ...] = ()  # per hour of the week: the profile blended with its day type's hour
    lag: float = 0.0  # index lag measured (seconds), decaying
    prev_poll: float | None = None  # start of the previous successful poll
    pushed_ew: float = 0.0  # changes webhooks delivered, and changes polls found that webhooks had not,
    found_ew: float = 0.0  # both decaying with the slow half-life: how much of the source the webhooks carry
    recent: tuple[float, ...] = ()  # change counts of the last RECENT_PERIODS periods (by change time), oldest first
    recent_at: int | None = None  # the index of the newest of them (time // period)
    typical: float = 0.0  # their median rate (see typical_rate), kept so planning need not sort them each time
    season_iso: tuple[float, ...] = field(default_factory=lambda: (0.0,) * WEEK_HOURS)  # isolated changes' rate
    hour_iso: float = 0.0  # isolated changes in the open hour
    plan_base: tuple[float, ...] = ()  # per hour of the week: the background part of plan_rates (the rest: bursts)
    burst_len: float | None = None  # running means over the bursts seen: changes per burst,
    burst_rate: float | None = None  # and changes per second within one (burst_length: their ratio)
    run_start: float | None = None  # the current run of closely spaced changes: its first change, and its size
    run_n: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    delay: float
    reason: Reason


def week_bucket(t: float) -> int:
    """The hour of the week (0 = Monday 00:00 UTC) that ``t`` falls in."""
    h = int(t // HOUR)
    return ((h // 24 + _EPOCH_WEEKDAY) % 7) * 24 + h % 24


def _fold(policy: PollPolicy, state: PollState, upto_hour: int) -> PollState:
    """Close the hours before ``upto_hour``: each one's change count moves its hour-of-week mean."""
    if state.hour is None or upto_hour <= state.hour:
        return state if state.hour is not None else replace(state, hour=upto_hour, hour_count=0.0)
    season, season_n, iso = list(state.season), list(state.season_n), list(state.season_iso)
    gap = upto_hour - state.hour
    # Hours after a long absence (a restart days later) were not watched: only the open one is folded.
    for i, h in enumerate(range(state.hour, upto_hour if gap <= 24 else state.hour + 1)):
        b = week_bucket(h * HOUR)
        sample = (state.hour_count if i == 0 else 0.0) / HOUR
        w = max(0.5, 1.0 / (season_n[b] + 1))
        season[b] += w * (sample - season[b])
        iso[b] += w * ((state.hour_iso if i == 0 else 0.0) / HOUR - iso[b])
        season_n[b] = min(season_n[b] + 1, 1000)
    rates = blended(season, season_n)
    base = backgrounds(policy, season, season_n, rates, blended(iso, season_n))
    plan_rates = smoothed(spilled(season, season_n, rates), base)
    state = replace(
        state,
        season=tuple(season),
        season_n=tuple(season_n),
        season_iso=tuple(iso),
        hour=upto_hour,
        hour_count=0.0,
        hour_iso=0.0,
        plan_rates=plan_rates,
        plan_base=base,
    )
    if not policy.seasonal or min(season_n) == 0:
        return replace(state, base_price=None)
    return replace(state, base_price=onset_price(policy, state))


def blended(season: Sequence[float], season_n: Sequence[int]) -> tuple[float, ...]:
    """Each hour of the week shrunk half-way to the same hour on the same kind of day (weekday or weekend).

    One week gives one sample per hour of the week, and a burst is as likely at 18:00
    on Thursday as on Tuesday; pooling weekdays (and weekend days) gives the burst
    hazard five (two) samples, while the hour's own mean keeps what is weekly.
    """
    out = []
    for b in range(WEEK_HOURS):
        day, h = divmod(b, 24)
        same = [d * 24 + h for d in (range(5) if day < 5 else range(5, 7)) if season_n[d * 24 + h]]
        pooled = sum(season[x] for x in same) / len(same) if same else season[b]
        out.append(0.5 * season[b] + 0.5 * pooled if season_n[b] else pooled)
    return tuple(out)


def spilled(season: Sequence[float], season_n: Sequence[int], rates: Sequence[float]) -> tuple[float, ...]:
    """Each hour planned with at least half a neighbouring hour's rate, in proportion to how lumpy that hour is.

    An hour whose days differ far more than a Poisson count would (some days a bulk import,
    some days none) holds bursts that start at random times, and a burst as likely starts
    just before or after it: one week cannot show that 08:00 never gets one when 09:00 gets
    them on two days of five. The weight grows with the hour's excess dispersion across the
    days of its kind, ``var/mean² - 1/count`` (about 0 for a Poisson hour however busy, 1 and
    more for bursts): nothing up to 0.25 (sd/mean ≤ 0.5), all of it from 1. A regular hour
    (office hours, an export at 02:00 every night) lends nothing.
    """
    lumpy = lumpiness(season, season_n)
    out = list(rates)
    for b in range(WEEK_HOURS):
        day, h = divmod(b, 24)
        for nb in (h - 1, h + 1):
            if 0 <= nb < 24:
                x = day * 24 + nb
                out[b] = max(out[b], 0.5 * lumpy[x] * rates[x])
    return tuple(out)


def lumpiness(season: Sequence[float], season_n: Sequence[int]) -> list[float]:
    """Per hour of the week, 0 to 1: how far its days differ beyond a Poisson count's spread (see :func:`spilled`)."""
    lumpy = [0.0] * WEEK_HOURS
    for b in range(WEEK_HOURS):
        day, h = divmod(b, 24)
        xs = [season[d * 24 + h] for d in (range(5) if day < 5 else range(5, 7)) if season_n[d * 24 + h]]
        mean = sum(xs) / len(xs) if xs else 0.0
        if len(xs) >= 2 and mean > 0:
            var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
            excess = var / mean**2 - 1.0 / (mean * HOUR)  # the dispersion beyond a Poisson count's
            lumpy[b] = min(1.0, max(0.0, (excess - LUMPY_FROM) / (LUMPY_FULL - LUMPY_FROM)))
    return lumpy


def isolated_to_rate(r: float, gap: float) -> float:
    """The Poisson rate λ whose changes come more than ``gap`` after the previous one at rate ``r``: λ·e^(-λ·gap) = r.

    The smaller root (λ·gap < 1); past the hump (r ≥ 1/(e·gap)) it is 1/gap.
    """
    if r <= 0:
        return 0.0
    if r * gap * math.e >= 1:
        return 1.0 / gap
    lo, hi = 0.0, 1.0 / gap  # λ·e^(-λ·gap) rises on [0, 1/gap]: bisection
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid * math.exp(-mid * gap) < r:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def backgrounds(
    policy: PollPolicy, season: Sequence[float], season_n: Sequence[int], rates: Sequence[float], iso: Sequence[float]
) -> tuple[float, ...]:
    """Per hour of the week, the background rate: what is not bursts.

    An hour whose days differ like Poisson counts (office hours, a nightly export) is all
    background: its rate is what the next minutes bring whatever happened before. In a
    lumpy one, the isolated changes (more than ``ISOLATED_GAP`` target latencies after the
    one before) are the background thinned by its own gaps (λ·e^(-λ·gap), inverted by
    :func:`isolated_to_rate`) plus one per burst; the rest comes in bursts, which the
    policy sees at the first poll inside them.
    """
    gap = ISOLATED_GAP * policy.target_latency
    lumpy = lumpiness(season, season_n)
    out = []
    for b in range(WEEK_HOURS):
        quiet = min(rates[b], isolated_to_rate(iso[b], gap))
        out.append(rates[b] - lumpy[b] * (rates[b] - quiet))
    return tuple(out)


def smoothed(rates: Sequence[float], base: Sequence[float]) -> tuple[float, ...]:
    """Each hour's burst rate at least the mean of its own and its two neighbours' on the same day.

    Bursts start at random times within a window of hours; one week shows a handful per
    hour, and an hour that happened to get none is no quieter than the hours around it.
    """
    burst = [max(0.0, r - a) for r, a in zip(rates, base, strict=True)]
    out = list(rates)
    for b in range(WEEK_HOURS):
        h = b % 24
        window = [burst[b + d] for d in (-1, 0, 1) if 0 <= h + d < 24]
        out[b] = base[b] + max(burst[b], sum(window) / len(window))
    return tuple(out)


def burst_length(policy: PollPolicy, state: PollState) -> float:
    """The length that turns a burst rate into its onset ramp, in seconds (BURST_LENGTH target latencies until a
    burst is seen): mean size over mean intensity, so short intense bursts weigh as much as their late changes do."""
    if state.burst_len is None or not state.burst_rate:
        return BURST_LENGTH * policy.target_latency
    return max(policy.target_latency, state.burst_len / state.burst_rate)


def onset_late(base: float, burst: float, length: float, x: float) -> float:
    """Expected changes in the first ``x`` seconds after a poll that saw no burst going on.

    Background ``base`` arrives at its rate; a burst's changes at s seconds after the poll
    are there only if it started after the poll (one going on then was seen), which for
    bursts of ``length`` seconds is a share min(1, s/length) of the burst rate ``burst``:
    ``base·x + burst·x²/(2·length)`` up to ``length``, the mean rate's count beyond it.
    """
    if x <= 0:
        return 0.0
    if x <= length:
        return base * x + burst * x * x / (2 * length)
    return base * x + burst * (x - length / 2)


def onset_price(policy: PollPolicy, state: PollState) -> float | None:
    """The price at which the policy's own plan on the profile leaves ``late_share`` of the week's changes late.

    For each hour of the week, the interval T = L' + x minimising (1 + μ·onset_late(x)) / T
    (floor, the interior optimum, the end of the ramp, or the ceiling) and its expected
    late changes per second; bisection on μ for the total. Where there are no bursts this
    is the rate oracle's threshold rule (:func:`profile_price`).
    """
    if not state.plan_rates or not state.plan_base:
        return None
    total = sum(state.plan_rates)
    if total <= 0:
        return None
    lat = late_floor(policy, state)
    length = burst_length(policy, state)
    xmax = max(0.0, policy.max_interval - lat)
    hours = [(a, max(0.0, r - a)) for r, a in zip(state.plan_rates, state.plan_base, strict=True)]
    allowed = policy.late_share * total

    def late_at(mu: float) -> float:
        out = 0.0
        for a, burst in hours:
            x = best_gap(mu, a, burst, length, lat, xmax)
            out += onset_late(a, burst, length, x) / (x + lat)
        return out

    lo, hi = 1e-4, MAX_PRICE
    if late_at(hi) > allowed:
        return hi
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if late_at(mid) > allowed:
            lo = mid
        else:
            hi = mid
    return hi


def best_gap(mu: float, base: float, burst: float, length: float, lat: float, xmax: float) -> float:
    """The x in [0, xmax] minimising (1 + μ·onset_late(x)) / (lat + x): floor, interior optimum, ramp end, ceiling."""
    cands = {0.0, xmax, min(xmax, length)}
    b = burst / (2 * length)
    if mu * base * lat < 1 and b > 0:
        x = -lat + math.sqrt(lat * lat + (1 - mu * base * lat) / (mu * b))
        cands.add(max(0.0, min(xmax, min(x, length))))
    return min(cands, key=lambda x: ((1 + mu * onset_late(base, burst, length, x)) / (lat + x), x))


def profile_price(policy: PollPolicy, rates: Sequence[float], season_n: Sequence[int]) -> float | None:
    """The price of a late change that a rate oracle would use on the learnt week: None until every hour is seen.

    With rates known per hour, the cheapest plan polls hours above a threshold λ* at the
    floor and the others at ``max_interval``, and λ* is the highest rate at which the
    slow hours' late changes stay within ``late_share`` of all changes; the matching
    price is μ = 1 / (λ*·target).
    """
    if not policy.seasonal or min(season_n) == 0:
        return None
    return _oracle_price(policy, rates)


def recent_price(policy: PollPolicy, state: PollState) -> float | None:
    """The same price on the recent history (periods of RECENT_PERIOD target latencies): the cold start's.

    Until a week is seen there is no profile, and the starting price 1/aggressiveness is
    only a guess: on a source that changes at random times at λ with μ·λ·L just below 1
    it polls at ``max_interval`` and nearly every change is late. Priced on what the
    source did in its recent periods, a source with no quiet periods gets a price that
    keeps it at the floor, and one whose quiet periods hold few of its changes may still
    poll those slowly. None until a change is seen.
    """
    if not state.recent:
        return None
    per = _period(policy)
    return _oracle_price(policy, [c / per for c in state.recent], late_floor(policy, state))


def typical_rate(policy: PollPolicy, state: PollState) -> float:
    """The median rate of the recent periods: what the source does in an ordinary period, bursts aside."""
    if not state.recent:
        return 0.0
    xs = sorted(state.recent)
    return xs[(len(xs) - 1) // 2] / _period(policy)


def _oracle_price(policy: PollPolicy, rates: Sequence[float], latency: float | None = None) -> float | None:
    total = sum(rates)
    if total <= 0:
        return None
    late_if_slow = max(0.0, 1.0 - policy.target_latency / policy.max_interval)
    allowed, spent, thr = policy.late_share * total, 0.0, max(rates)
    for r in sorted(rates):
        spent += r * late_if_slow
        if spent > allowed:
            thr = r
            break
    return 1.0 / (max(thr, 1e-9) * (latency or policy.target_latency))


def _period(policy: PollPolicy) -> float:
    return RECENT_PERIOD * policy.target_latency


def _tally(policy: PollPolicy, state: PollState, now: float, times: Iterable[float], unknown: int) -> PollState:
    """Count new changes into the recent periods by their own times (those without a time at ``now``)."""
    per = _period(policy)
    cur = int(now // per)
    counts, at = list(state.recent), state.recent_at
    if at is None or not counts:
        counts, at = [0.0], cur
    if cur > at:
        counts.extend([0.0] * min(cur - at, RECENT_PERIODS))
        at = cur
    counts = counts[-RECENT_PERIODS:]
    for c in (*times, *(now,) * unknown):
        i = len(counts) - 1 - (at - int(min(c, now) // per))
        if 0 <= i < len(counts):  # older than the window: not counted
            counts[i] += 1.0
    state = replace(state, recent=tuple(counts), recent_at=at)
    return replace(state, typical=typical_rate(policy, state))


def decay(policy: PollPolicy, state: PollState, now: float) -> PollState:
    """Age the rate and lag estimates to ``now`` and close the hours that ended."""
    if state.updated is None:
        return replace(state, updated=now, quiet_from=now, hour=int(now // HOUR))
    dt = max(0.0, now - state.updated)
    if dt > 0:
        tau = _slow_tau(policy)
        state = replace(
            state,
            rate=state.rate * math.exp(-dt / tau),
            fast=state.fast * math.exp(-dt / _fast_tau(policy)),
            lag=state.lag * 0.5 ** (dt / LAG_HALF_LIFE),
            pushed_ew=state.pushed_ew * math.exp(-dt / tau),
            found_ew=state.found_ew * math.exp(-dt / tau),
            updated=now,
        )
    return _fold(policy, state, int(now // HOUR))


def _slow_tau(policy: PollPolicy) -> float:
    return (policy.rate_half_life or SLOW_HALF_LIVES * policy.target_latency) / math.log(2)


def _fast_tau(policy: PollPolicy) -> float:
    return FAST_HALF_LIVES * policy.target_latency / math.log(2)


def recent_rate(state: PollState) -> float:
    """The recent rate: the larger of the slow (stable) and the fast (burst-seeing) estimate."""
    return max(state.rate, state.fast)


def quiet_cap(policy: PollPolicy, state: PollState, now: float) -> float:
    """The highest rate still plausible after the quiet since the newest change: -ln(a) / E."""
    start = state.last_change if state.last_change is not None else state.quiet_from
    if start is None:
        return math.inf
    exposure = now - state.lag - start
    return -math.log(policy.quiet_confidence) / exposure if exposure > 0 else math.inf


def planned_rate(policy: PollPolicy, state: PollState, t: float) -> float:
    """The rate to plan with at time ``t``: the recent one, or the hour of the week's mean, or the source's
    ordinary rate (the recent periods' median), whichever is highest."""
    if policy.seasonal and state.plan_rates:
        return max(recent_rate(state), ordinary_rate(state), state.plan_rates[week_bucket(t)])
    return max(recent_rate(state), ordinary_rate(state))


def ordinary_rate(state: PollState) -> float:
    """The recent periods' median rate, until a week's profile exists (then the hour of the week knows better:
    a day of office hours and quiet nights has its median in the office hours' shoulders, not at night)."""
    return state.typical if state.base_price is None else 0.0


def late_floor(policy: PollPolicy, state: PollState) -> float:
    """How long a change may wait after it shows up: the target less the index lag measured."""
    return max(min(policy.min_interval, policy.target_latency), policy.target_latency - state.lag)


def trusting(policy: PollPolicy, state: PollState) -> bool:
    """Webhooks nudge this source and recently carried most of its changes: scheduled polls may wait ``max_interval``.

    Trust is earned (no webhook yet, no trust) and lost by evidence: when polls find more
    than ``trust_lost_share`` of the changes (the webhooks stopped, or lose most), the
    policy plans from the rate again. A quiet source keeps what it had: nothing to lose.
    """
    total = state.pushed_ew + state.found_ew
    return policy.trust_nudges and total > 0 and state.found_ew <= policy.trust_lost_share * total


def nudge_delay(policy: PollPolicy, state: PollState, debounce: float) -> float:
    """How long after a webhook the nudged poll runs: as late as still catches, within the target, a change
    whose own webhook was lost, so a stream of webhooks costs one poll per target latency, not one per debounce."""
    return max(debounce, min(policy.max_interval, late_floor(policy, state)))


def plan(policy: PollPolicy, state: PollState, now: float) -> float:
    """The interval T minimising (1 + μ·Λ(T)) / T, Λ(T) the expected changes more than the target late.

    λ is piecewise constant (it changes only at hour boundaries), so the cost is
    monotone between boundaries and its minimum lies at the floor, the ceiling or a
    boundary: those are the only candidates, and the minimum is exact.
    """
    lo = min(policy.max_interval, max(policy.min_interval, late_floor(policy, state)))
    hi = policy.max_interval
    lat = late_floor(policy, state)
    mu = price(policy, state)
    candidates = [lo, hi]
    first = (math.floor(now / HOUR) + 1) * HOUR
    k = 0
    while first + k * HOUR + lat - now < hi and k < 48:
        candidates.append(first + k * HOUR + lat - now)
        k += 1
    if state.interval is not None:
        hi = max(lo, min(hi, GROWTH * state.interval))
        candidates.append(hi)
    if _onsets(policy, state):
        # Bursts make the cost convex between boundaries: the current hour's optimum, the ramp's end and a grid.
        length = burst_length(policy, state)
        b = week_bucket(now)
        base = max(recent_rate(state), ordinary_rate(state), state.plan_base[b])
        burst = max(0.0, state.plan_rates[b] - state.plan_base[b])
        candidates.append(lat + best_gap(mu, base, burst, length, lat, max(0.0, hi - lat)))
        candidates.append(lat + length)
        candidates += [lo * (hi / lo) ** (i / 16) for i in range(1, 16)]
    best, best_cost = hi, math.inf
    for t_ in sorted(c for c in candidates if lo <= c <= hi):
        late = _expected(policy, state, now, now + t_ - lat)
        cost = (1.0 + mu * late) / t_
        if cost < best_cost * (1 - 1e-12):
            best, best_cost = t_, cost
    return best


def _onsets(policy: PollPolicy, state: PollState) -> bool:
    return policy.seasonal and bool(state.plan_rates) and bool(state.plan_base)


def _expected(policy: PollPolicy, state: PollState, a: float, b: float) -> float:
    """∫ planned_rate over [a, b], hour by hour; with a profile, its bursts only as they may start after ``a``.

    A poll at ``a`` that saw no burst going on (else the recent rate shows it) leaves a
    burst's changes at ``t`` to bursts that started since: a share min(1, (t - a)/length)
    of the hour's burst rate (:func:`onset_late`), over the background rate.
    """
    if not _onsets(policy, state):
        total, t = 0.0, a
        while t < b:
            nxt = min(b, (math.floor(t / HOUR) + 1) * HOUR)
            total += planned_rate(policy, state, t) * (nxt - t)
            t = nxt
        return total
    length = burst_length(policy, state)
    floor_rate = max(recent_rate(state), ordinary_rate(state))
    total, t = 0.0, a
    while t < b:
        nxt = min(b, (math.floor(t / HOUR) + 1) * HOUR)
        hb = week_bucket(t)
        base, burst = state.plan_base[hb], max(0.0, state.plan_rates[hb] - state.plan_base[hb])
        s1, s2 = t - a, nxt - a
        if s1 < length:  # on the ramp: base + burst·s/length
            e = min(s2, length)
            total += _max_linear(floor_rate, base, burst / length, s1, e)
            s1 = e
        if s2 > s1:
            total += max(floor_rate, base + burst) * (s2 - s1)
        t = nxt
    return total


def _max_linear(r: float, c0: float, c1: float, s1: float, s2: float) -> float:
    """∫ max(r, c0 + c1·s) ds over [s1, s2] (c1 ≥ 0)."""
    if s2 <= s1:
        return 0.0
    if c1 <= 0:
        return max(r, c0) * (s2 - s1)
    cross = (r - c0) / c1
    if cross <= s1:
        return c0 * (s2 - s1) + c1 * (s2 * s2 - s1 * s1) / 2
    if cross >= s2:
        return r * (s2 - s1)
    return r * (cross - s1) + c0 * (s2 - cross) + c1 * (s2 * s2 - cross * cross) / 2


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


def _learn(
    policy: PollPolicy, state: PollState, now: float, times: Iterable[float], unknown: int
) -> tuple[PollState, int, int]:
    """Fold new changes (by their own times) into the rate, the hour count, the lag and the late price."""
    tau = _slow_tau(policy)
    ftau = _fast_tau(policy)
    rate, fast, count, late, n = state.rate, state.fast, state.hour_count, 0, 0
    newest, lag = state.last_change, state.lag
    season, season_n, season_iso, iso = state.season, state.season_n, state.season_iso, state.hour_iso
    run_start, run_n, burst_len, burst_rate = state.run_start, state.run_n, state.burst_len, state.burst_rate
    gap = ISOLATED_GAP * policy.target_latency
    hour_start = (state.hour or 0) * HOUR
    for c in sorted(times):
        c = min(c, now)
        rate += math.exp(-(now - c) / tau) / tau
        fast += math.exp(-(now - c) / ftau) / ftau
        isolated = newest is None or c - newest > gap
        if isolated:  # a run of close changes ended before this one: a burst if it was long enough
            if run_start is not None and newest is not None and run_n >= BURST_MIN:
                intensity = run_n / max(newest - run_start, policy.target_latency)
                if burst_len is None or burst_rate is None:
                    burst_len, burst_rate = float(run_n), intensity
                else:
                    burst_len += BURST_WEIGHT * (run_n - burst_len)
                    burst_rate += BURST_WEIGHT * (intensity - burst_rate)
            run_start, run_n = c, 1
        elif c >= newest:  # type: ignore[operator]
            run_n += 1
        newest = c if newest is None else max(newest, c)
        if c >= hour_start:
            count += 1
            iso += isolated
        else:  # found after its hour was closed (a lagging index, a slow poll): credit that hour directly
            b = week_bucket(c)
            if season_n[b]:
                season = (*season[:b], season[b] + 0.5 / HOUR, *season[b + 1 :])
                if isolated:
                    season_iso = (*season_iso[:b], season_iso[b] + 0.5 / HOUR, *season_iso[b + 1 :])
        if state.prev_poll is not None and c < state.prev_poll:
            lag = max(lag, min(state.prev_poll - c, policy.target_latency / 2))
        late += now - c > policy.target_latency
        n += 1
    rate += unknown / tau
    count += unknown
    learnt = replace(
        state,
        rate=rate,
        fast=fast,
        hour_count=count,
        hour_iso=iso,
        last_change=newest,
        lag=lag,
        season=season,
        season_n=season_n,
        season_iso=season_iso,
        run_start=run_start,
        run_n=run_n,
        burst_len=burst_len,
        burst_rate=burst_rate,
    )
    return learnt, late, n


def price(policy: PollPolicy, state: PollState) -> float:
    """μ, the requests one late change is worth: planned from the profile (or 1/aggressiveness), times the feedback."""
    # With a week's profile, the price at which the plan on it meets the late share (onset_price); before
    # that the starting price, or the recent history's if higher (see recent_price).
    if state.base_price is not None:
        base = state.base_price
    else:
        base = max(recent_price(policy, state) or 0.0, 1.0 / policy.aggressiveness)
    return min(MAX_PRICE, max(1.0 / MAX_PRICE, base * math.exp(state.price)))


def _price(policy: PollPolicy, state: PollState, late: int, total: int) -> float:
    """Dual ascent on the late share: the correction rises with each late change, falls with each on-time one.

    Bounded to [1, e^0.7] times the planned price: late changes come in clumps (a burst
    that started during a long interval), and one clump must not swing the plan; and
    it never goes below the plan, because a stretch with few late changes is no evidence
    that slower polling is safe: the next burst in a slow interval is a lump of them.
    """
    p = state.price + policy.price_step * (late - policy.late_share * total)
    return min(PRICE_UP, max(-PRICE_DOWN, p))


def observe(
    policy: PollPolicy, state: PollState, now: float, obs: Observation, rand: float = 0.5
) -> tuple[PollState, Decision]:
    """Record a finished poll and decide how long to wait before the next one (``rand`` in [0, 1) is jitter)."""
    state = decay(policy, state, now)
    requests = (*(t for t in state.requests if t > now - HOUR), obs.started)
    if obs.pushed:
        state = replace(state, pushed_ew=state.pushed_ew + obs.pushed)
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
        unknown = max(0, obs.changes - len(obs.change_times))
        state, late, n = _learn(policy, state, now, obs.change_times, unknown)
        state = _tally(policy, state, now, obs.change_times, unknown)
        state = replace(state, found_ew=state.found_ew + n + unknown)
        correction = _price(policy, state, late, n + obs.pushed)
        # The quiet stretch ends a burst, not the source's ordinary rate: never below the recent periods' median.
        cap = max(quiet_cap(policy, state, now), ordinary_rate(state))
        state = replace(
            state,
            rate=min(state.rate, cap),
            fast=min(state.fast, cap),
            price=correction,
            errors=0,
            requests=requests,
            prev_poll=state.prev_poll if obs.more else obs.started,
        )
        if obs.more:
            decision = Decision(0.0, "more")
        elif trusting(policy, state):
            # The nudge after each webhook is the fast path; this poll only looks for what webhooks lost.
            state = replace(state, interval=policy.max_interval)
            decision = Decision(policy.max_interval, "webhooks")
        else:
            interval = plan(policy, state, now)
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


def reconciled(policy: PollPolicy, state: PollState, now: float, missed: int) -> PollState:
    """A reconciliation found ``missed`` changes polling had not seen: they count as changes found now, and late."""
    if missed <= 0:
        return state
    state = decay(policy, state, now)
    tau = _slow_tau(policy)
    return replace(
        state,
        rate=state.rate + missed / tau,
        fast=state.fast + missed / _fast_tau(policy),
        hour_count=state.hour_count + missed,
        found_ew=state.found_ew + missed,
        price=_price(policy, state, missed, missed),
    )


# --- persistence ---------------------------------------------------------------------------------

_FIELDS = (
    "rate",
    "fast",
    "updated",
    "last_change",
    "quiet_from",
    "requests",
    "season",
    "season_n",
    "hour",
    "hour_count",
    "price",
    "base_price",
    "plan_rates",
    "lag",
    "interval",
    "pushed_ew",
    "found_ew",
    "recent",
    "recent_at",
    "typical",
    "season_iso",
    "hour_iso",
    "plan_base",
    "burst_len",
    "burst_rate",
    "run_start",
    "run_n",
)


def to_json(state: PollState) -> dict[str, Any]:
    """What is worth keeping across a restart (the learnt profile, price, lag and the budget's request log)."""
    return {"v": 1, **{k: getattr(state, k) for k in _FIELDS}}


def from_json(data: Any) -> PollState:
    """The state :func:`to_json` wrote; anything unreadable gives a fresh state (learning starts again)."""
    if not isinstance(data, dict) or data.get("v") != 1:
        return PollState()
    try:
        kw: dict[str, Any] = {k: data[k] for k in _FIELDS if k in data}
        kw["requests"] = tuple(float(x) for x in kw.get("requests", ()))
        kw["season"] = tuple(float(x) for x in kw.get("season", (0.0,) * WEEK_HOURS))
        kw["season_n"] = tuple(int(x) for x in kw.get("season_n", (0,) * WEEK_HOURS))
        kw["plan_rates"] = tuple(float(x) for x in kw.get("plan_rates", ()))
        kw["recent"] = tuple(float(x) for x in kw.get("recent", ()))
        kw["season_iso"] = tuple(float(x) for x in kw.get("season_iso", (0.0,) * WEEK_HOURS))
        kw["plan_base"] = tuple(float(x) for x in kw.get("plan_base", ()))
        if len(kw["season_iso"]) != WEEK_HOURS:
            kw["season_iso"] = (0.0,) * WEEK_HOURS
        if len(kw["season"]) != WEEK_HOURS or len(kw["season_n"]) != WEEK_HOURS:
            return PollState()
        return PollState(**kw)
    except (TypeError, ValueError):
        return PollState()
