"""Property tests of the adaptive polling policy, driven with a fake clock."""

from __future__ import annotations

import math
from dataclasses import replace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from integrand.pollpolicy import (
    DAY,
    HOUR,
    WEEK_HOURS,
    Observation,
    PollPolicy,
    PollState,
    backgrounds,
    best_gap,
    blended,
    burst_length,
    from_json,
    isolated_to_rate,
    observe,
    onset_late,
    ordinary_rate,
    plan,
    price,
    recent_price,
    recent_rate,
    reconciled,
    spilled,
    to_json,
    trusting,
    week_bucket,
)

policies = st.builds(
    PollPolicy,
    min_interval=st.floats(0.5, 60),
    max_interval=st.floats(60, 7200),
    target_latency=st.floats(1, 600),
    aggressiveness=st.floats(0.1, 10),
    rate_half_life=st.floats(10, 7200),
    seasonal=st.booleans(),
)

polls = st.lists(
    st.tuples(
        st.integers(0, 500),  # changes found
        st.booleans(),  # more pages waiting
        st.booleans(),  # error
        st.floats(0, 1, exclude_max=True),  # jitter
        st.floats(0, 30),  # how long the request took
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(policies, polls, st.floats(0, 1e9))
def test_interval_stays_within_bounds_unless_provider_demands(
    policy: PollPolicy, seq: list[tuple[int, bool, bool, float, float]], t0: float
) -> None:
    state, now = PollState(), t0
    for changes, more, error, rand, took in seq:
        started = now
        now += took
        state, d = observe(
            policy, state, now, Observation(started, changes=changes, more=more and not error, error=error), rand
        )
        if more and not error:
            assert d.delay == 0
            assert d.reason == "more"
        else:
            assert policy.min_interval <= d.delay <= policy.max_interval, d
        now += d.delay


@settings(max_examples=200, deadline=None)
@given(policies, polls, st.floats(0, 5000))
def test_retry_after_is_always_honoured(
    policy: PollPolicy, seq: list[tuple[int, bool, bool, float, float]], retry_after: float
) -> None:
    state, now = PollState(), 1e6
    for changes, more, error, rand, took in seq:
        started, now = now, now + took
        state, d = observe(
            policy,
            state,
            now,
            Observation(started, changes=changes, more=more, error=error, retry_after=retry_after),
            rand,
        )
        assert d.delay >= retry_after
        assert d.delay <= max(policy.max_interval, retry_after)
        now += d.delay


@settings(max_examples=150, deadline=None)
@given(policies, polls, st.integers(1, 200), st.lists(st.floats(0, 50), max_size=60))
def test_budget_holds_over_any_window(
    policy: PollPolicy, seq: list[tuple[int, bool, bool, float, float]], budget: int, early: list[float]
) -> None:
    """Whatever the polls find, and even when nudges ask for early polls, no 3600 s window holds more than the budget."""
    from dataclasses import replace

    from integrand.pollpolicy import budget_wait

    policy = replace(policy, max_requests_per_hour=budget)
    state, now = PollState(), 0.0
    made: list[float] = []
    for i, (changes, more, error, rand, took) in enumerate(seq * 3):
        started = now
        made.append(started)
        now += took
        state, d = observe(policy, state, now, Observation(started, changes=changes, more=more, error=error), rand)
        delay = d.delay
        # A nudge may cut the wait short, but never below what the budget allows.
        if early and i < len(early):
            delay = max(min(delay, early[i]), budget_wait(policy, state.requests, now))
        now += delay
    for i, t in enumerate(made):
        in_window = sum(1 for u in made[i:] if u < t + HOUR)
        assert in_window <= budget


def test_changes_shrink_and_quiet_grows_the_interval() -> None:
    policy = PollPolicy(min_interval=5, max_interval=900, target_latency=60, seasonal=False)
    state, now = PollState(), 0.0
    state, d = observe(policy, state, now, Observation(now))
    assert d.delay == 900  # nothing known, nothing found: as slow as allowed
    intervals = []
    for _ in range(5):  # a busy spell: 20 changes spread over each interval
        prev, now = now, now + d.delay
        times = tuple(prev + (now - prev) * (i + 0.5) / 20 for i in range(20))
        state, d = observe(policy, state, now, Observation(now, changes=20, change_times=times))
        intervals.append(d.delay)
    # Down to the target latency, not below: faster polls would not make changes any more on time.
    assert intervals[-1] == 60
    assert intervals == sorted(intervals, reverse=True)
    quiet: list[float] = []
    while d.delay < 900 and len(quiet) < 200:
        now += d.delay
        state, d = observe(policy, state, now, Observation(now))
        quiet.append(d.delay)
    assert quiet == sorted(quiet)
    assert quiet[-1] == 900
    assert now < 2 * 3600  # the burst-end rule, not the half-life, ends the fast polling


@settings(max_examples=200, deadline=None)
@given(policies, polls)
def test_burst_end_caps_the_rate_by_the_quiet_since_the_last_change(
    policy: PollPolicy, seq: list[tuple[int, bool, bool, float, float]]
) -> None:
    """After E quiet seconds the rate used is at most -ln(a)/E, or the recent periods' median if that is higher:
    k empty polls that improbable end a burst, not the source's ordinary rate."""
    state, now = PollState(), 1e6
    for changes, more, error, rand, took in seq:
        started, now = now, now + took
        times = tuple(started + took * i / max(1, changes) for i in range(changes))
        state, d = observe(
            policy, state, now, Observation(started, changes=changes, more=more, error=error, change_times=times), rand
        )
        now += d.delay
    quiet_end = now + 10 * policy.target_latency
    state, _ = observe(policy, state, quiet_end, Observation(quiet_end))
    start = state.last_change if state.last_change is not None else state.quiet_from
    assert start is not None
    exposure = quiet_end - state.lag - start
    cap = max(-math.log(policy.quiet_confidence) / exposure, ordinary_rate(state))
    assert recent_rate(state) <= cap * (1 + 1e-9)


def test_a_burst_ends_after_a_few_empty_polls() -> None:
    """The real-daemon finding: 150 changes in a burst kept the old policy at the floor for a minute of empty polls."""
    policy = PollPolicy(min_interval=0.2, max_interval=20, target_latency=1)
    state, now = PollState(), 1e6
    for _ in range(10):  # 150 changes over 10 s, seen at the floor
        prev, now = now, now + 1.0
        times = tuple(prev + i / 15 for i in range(15))
        state, d = observe(policy, state, now, Observation(prev, changes=15, change_times=times))
        assert d.delay <= 1.0
    empty = 0
    while d.delay <= 1.0:
        now += d.delay
        state, d = observe(policy, state, now, Observation(now))
        empty += 1
    # After E quiet seconds the cap is 3/E changes/s; with the initial price (5 requests per late
    # change) polling fast stops once 5 * 3/E * 1 s < 1, i.e. E > 15 s: about 15 empty polls.
    assert empty <= 20
    quiet_for = now - state.last_change  # type: ignore[operator]
    assert quiet_for < 20


def test_hour_of_week_profile_warms_up_before_busy_hours_and_survives_a_restart() -> None:
    policy = PollPolicy(min_interval=5, max_interval=1800, target_latency=60)
    state, now = PollState(), float(4 * DAY)  # Monday 1970-01-05 00:00 UTC
    # One week: changes every minute Mondays to Fridays 09:00-17:00, nothing otherwise.
    while now < 11 * DAY + HOUR:
        busy = (now - 4 * DAY) % DAY // HOUR in range(9, 17) and (now - 4 * DAY) // DAY % 7 < 5
        state, d = observe(policy, state, now, Observation(now, changes=1 if busy else 0, change_times=(now,) * busy))
        now += min(d.delay, 60.0) if busy else d.delay
    assert week_bucket(4 * DAY + 9 * HOUR) == 9 and week_bucket(10 * DAY) == 6 * 24
    assert state.base_price is not None  # a full week seen: the price is planned from the profile
    # A restart: the state goes through JSON and back.
    state = from_json(orjson.loads(orjson.dumps(to_json(state))))
    # Monday 08:45 of the next week: quiet for hours, yet the next poll comes by 09:01.
    now = 11 * DAY + 8 * HOUR + 45 * 60
    state, d = observe(policy, state, now, Observation(now))
    assert now + d.delay <= 11 * DAY + 9 * HOUR + 60
    _, d_plain = observe(replace(policy, seasonal=False), state, now, Observation(now))
    assert d_plain.delay > d.delay
    # Saturday 03:00 is slow.
    sat = 16 * DAY + 3 * HOUR
    _, d2 = observe(policy, state, sat, Observation(sat))
    assert d2.delay >= 900


@settings(max_examples=100, deadline=None)
@given(policies, polls)
def test_state_round_trips_through_json(policy: PollPolicy, seq: list[tuple[int, bool, bool, float, float]]) -> None:
    state, now = PollState(), 5e5
    for changes, more, error, rand, took in seq:
        started, now = now, now + took * 100
        times = tuple(started + i for i in range(min(changes, 5)))
        state, d = observe(
            policy, state, now, Observation(started, changes=changes, more=more, error=error, change_times=times), rand
        )
        now += d.delay
    back = from_json(orjson.loads(orjson.dumps(to_json(state))))
    assert to_json(back) == to_json(state)
    assert from_json({"v": 99}) == PollState()
    assert from_json({"v": 1, "season": [1.0]}) == PollState()


def test_late_changes_raise_the_price_and_on_time_ones_lower_it_back_to_the_plan() -> None:
    policy = PollPolicy(min_interval=5, max_interval=1800, target_latency=60, seasonal=False)
    state, now = PollState(), 1e6
    p0 = price(policy, state)
    for _ in range(20):  # late lumps: bounded to e^0.7 of the plan
        now += 60
        state, _ = observe(policy, state, now, Observation(now, changes=50, change_times=(now - 600,) * 50))
    high = price(policy, state)
    assert p0 < high <= p0 * math.exp(0.7) * (1 + 1e-9)
    for _ in range(200):
        now += 60
        state, _ = observe(policy, state, now, Observation(now, changes=50, change_times=(now - 1,) * 50))
    assert price(policy, state) < high
    assert price(policy, state) == pytest.approx(p0)  # never below the plan


def test_reconciliation_misses_count_as_late_changes() -> None:
    policy = PollPolicy(seasonal=False)
    state = PollState()
    state, _ = observe(policy, state, 0.0, Observation(0.0))
    after = reconciled(policy, state, 10.0, missed=5)
    assert after.rate > state.rate
    assert price(policy, after) > price(policy, state)
    assert reconciled(policy, state, 10.0, missed=0) == state


def test_errors_back_off_exponentially_and_leave_the_rate_alone() -> None:
    policy = PollPolicy(min_interval=1, max_interval=600, target_latency=30, seasonal=False)
    state, now = PollState(), 0.0
    state, _ = observe(policy, state, now, Observation(now, changes=50))
    rate = state.rate
    delays = []
    for _ in range(12):
        state, d = observe(policy, state, now, Observation(now, error=True), rand=0.0)
        delays.append(d.delay)
    assert delays[:9] == [1, 1, 2, 4, 8, 16, 32, 64, 128]
    assert max(delays) == 300  # half the cap with zero jitter
    assert state.rate == rate
    assert state.errors == 12
    state, d = observe(policy, state, now, Observation(now, changes=0))
    assert state.errors == 0
    assert d.reason == "rate"
    assert d.delay < 600


def test_provider_budget_keeps_a_reserve_for_writes() -> None:
    policy = PollPolicy(min_interval=1, max_interval=600, target_latency=30, budget_reserve=0.2)
    state, d = observe(
        policy, PollState(), 0.0, Observation(0.0, changes=100, budget_remaining=15, budget_limit=100, budget_reset=60)
    )
    assert d.reason == "provider-budget"
    assert d.delay == 60
    state, d = observe(
        policy, state, 60.0, Observation(60.0, changes=100, budget_remaining=30, budget_limit=100, budget_reset=600)
    )
    assert (d.reason, d.delay) == ("provider-budget", 60.0)  # 10 spare over 600 s


hooked_polls = st.lists(
    st.tuples(
        st.integers(0, 50),  # changes the poll found that webhooks had not delivered
        st.integers(0, 50),  # changes webhooks delivered since the previous poll
        st.booleans(),  # error
        st.floats(0, 1, exclude_max=True),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(policies, hooked_polls, st.booleans())
def test_webhooks_are_trusted_only_while_they_carry_most_changes(
    policy: PollPolicy, seq: list[tuple[int, int, bool, float]], trust: bool
) -> None:
    """Trusting webhooks means max_interval between nudges, and only while polls find at most the lost share."""
    policy = replace(policy, trust_nudges=trust)
    state, now = PollState(), 1e6
    for found, pushed, error, rand in seq:
        times = tuple(now - i for i in range(found))
        state, d = observe(
            policy, state, now, Observation(now, changes=found, change_times=times, pushed=pushed, error=error), rand
        )
        assert policy.min_interval <= d.delay <= policy.max_interval
        if d.reason == "webhooks":
            assert trust and not error
            assert d.delay == policy.max_interval
            total = state.pushed_ew + state.found_ew
            assert total > 0 and state.found_ew <= policy.trust_lost_share * total
        now += d.delay


def test_nudged_source_waits_max_interval_between_webhooks_until_they_stop() -> None:
    policy = PollPolicy(min_interval=5, max_interval=1800, target_latency=60, seasonal=False)
    state, now = PollState(), 1e6
    state, d = observe(policy, state, now, Observation(now, changes=30, change_times=(now - 30,) * 30))
    assert d.reason == "rate" and d.delay < 120  # no webhook yet: busy, so polled at the floor
    for _ in range(10):  # webhooks deliver nine changes in ten; polls find the tenth
        now += 60
        state, d = observe(policy, state, now, Observation(now, changes=1, change_times=(now - 30,), pushed=9))
    assert trusting(policy, state)
    assert (d.reason, d.delay) == ("webhooks", 1800)
    # The webhooks stop arriving (a broken endpoint): polls find everything, and trust ends within a few polls.
    found = 0
    while d.reason == "webhooks":
        now += 60
        state, d = observe(policy, state, now, Observation(now, changes=10, change_times=(now - 30,) * 10))
        found += 10
    assert found <= 200
    assert d.reason == "rate" and d.delay < 120
    # A source without nudges (nudge = false) never trusts.
    plain = replace(policy, trust_nudges=False)
    s2, d2 = observe(plain, PollState(), now, Observation(now, changes=1, change_times=(now - 1,), pushed=99))
    assert not trusting(plain, s2) and d2.reason == "rate"


def test_a_lumpy_hour_lends_half_its_rate_to_its_neighbours_a_regular_one_nothing() -> None:
    """Bursts at random times on some weekdays at 09:00 may as well start at 08:00; an export every night at 02:00 not at 01:00."""
    season, n = [0.0] * WEEK_HOURS, [1] * WEEK_HOURS
    for d, burst in enumerate([300.0, 0.0, 250.0, 0.0, 0.0]):  # 09:00: a bulk import on two weekdays of five
        season[d * 24 + 9] = (20.0 + burst) / HOUR
    for d in range(7):  # 02:00: an export of 290-310 changes every night
        season[d * 24 + 2] = (290.0 + 5 * d) / HOUR
    rates = blended(season, n)
    plan = spilled(season, n, rates)
    for d in range(5):
        assert plan[d * 24 + 8] == pytest.approx(0.5 * rates[d * 24 + 9])
        assert plan[d * 24 + 10] == pytest.approx(0.5 * rates[d * 24 + 9])
    for d in range(7):
        assert plan[d * 24 + 1] < 0.01 * rates[d * 24 + 2]
        assert plan[d * 24 + 3] < 0.01 * rates[d * 24 + 2]
    assert all(p >= r for p, r in zip(plan, rates, strict=True))  # spilling only adds


def test_a_patternless_source_is_priced_from_its_recent_periods_and_kept_at_the_floor() -> None:
    """The real-daemon finding: at λ = 1/6 s, target 1 s, the starting price (5 requests per late change) put
    μ·λ·L just below 1, so the policy went to max_interval between stretches at the floor and most of its late
    changes came from there. Priced on the recent periods, and with the quiet cap held at their median rate, a
    source that changes at random times stays at the floor once it has been watched for a while."""
    import random

    policy = PollPolicy(min_interval=0.2, max_interval=20, target_latency=1)
    rng = random.Random(6)
    changes, t = [], 1e6
    while t < 1e6 + 900:
        t += rng.expovariate(1 / 6)
        changes.append(t)
    state, now, i = PollState(), 1e6, 0
    late = total = 0
    waits: list[float] = []
    while now < 1e6 + 900:
        found = []
        while i < len(changes) and changes[i] <= now:
            found.append(changes[i])
            i += 1
        if now > 1e6 + 300:  # after five minutes of watching
            total += len(found)
            late += sum(1 for c in found if now - c > policy.target_latency)
        state, d = observe(policy, state, now, Observation(now, changes=len(found), change_times=tuple(found)))
        if now > 1e6 + 300:
            waits.append(d.delay)
        now += d.delay
    assert recent_price(policy, state) is not None
    assert max(waits) <= policy.target_latency
    assert late <= 0.05 * total


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-6, 0.99), st.floats(1, 600))
def test_isolated_changes_give_back_the_poisson_rate(lam_gap: float, gap: float) -> None:
    """λ·e^(-λ·gap) is the rate of Poisson changes more than ``gap`` after the one before; inverted below the hump."""
    lam = lam_gap / gap
    assert isolated_to_rate(lam * math.exp(-lam * gap), gap) == pytest.approx(lam, rel=1e-6)
    assert isolated_to_rate(1.0 / (math.e * gap) * 1.01, gap) == pytest.approx(1.0 / gap)
    assert isolated_to_rate(0.0, gap) == 0.0


def test_onset_late_ramps_up_to_the_burst_length_then_counts_the_mean_rate() -> None:
    """A poll that saw no burst going on: a burst's changes s seconds later are there only if it started since."""
    assert onset_late(0.01, 0.0, 300, 100) == pytest.approx(1.0)
    assert onset_late(0.0, 0.1, 300, 60) == pytest.approx(0.1 * 60 * 60 / 600)  # quadratic on the ramp
    assert onset_late(0.0, 0.1, 300, 300) == pytest.approx(15.0)
    assert onset_late(0.0, 0.1, 300, 900) == pytest.approx(0.1 * (900 - 150))  # the mean rate's beyond it
    assert onset_late(0.0, 0.1, 300, 300 - 1e-9) == pytest.approx(onset_late(0.0, 0.1, 300, 300 + 1e-9))
    assert onset_late(1.0, 1.0, 300, 0) == 0.0


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0.01, 100),  # μ
    st.floats(0, 0.05),  # background rate
    st.floats(0, 0.5),  # burst rate
    st.floats(10, 3600),  # burst length
    st.floats(1, 120),  # the late floor
    st.floats(0, 3600),  # how far above it the ceiling is
)
def test_best_gap_is_the_cheapest_gap_on_a_fine_grid(
    mu: float, base: float, burst: float, length: float, lat: float, xmax: float
) -> None:
    def cost(x: float) -> float:
        return (1 + mu * onset_late(base, burst, length, x)) / (lat + x)

    x = best_gap(mu, base, burst, length, lat, xmax)
    assert 0 <= x <= xmax
    grid = [xmax * i / 2000 for i in range(2001)]
    assert cost(x) <= min(cost(g) for g in grid) * (1 + 1e-9)


def test_a_lumpy_hours_background_is_its_isolated_changes_a_regular_hours_all_of_it() -> None:
    """09:00 on weekdays: 20 changes an hour at random times, plus a 300-change import on two days of five; 02:00:
    an export every night (regular: its rate is what the next minutes bring, all background)."""
    policy = PollPolicy(target_latency=60)
    season, iso, n = [0.0] * WEEK_HOURS, [0.0] * WEEK_HOURS, [1] * WEEK_HOURS
    lam0 = 20.0 / HOUR
    for d, burst in enumerate([300.0, 0.0, 250.0, 0.0, 0.0]):
        season[d * 24 + 9] = lam0 + burst / HOUR
        iso[d * 24 + 9] = lam0 * math.exp(-lam0 * 60) + (1 / HOUR if burst else 0.0)  # plus each burst's first
    for d in range(7):
        season[d * 24 + 2] = iso[d * 24 + 2] = (290.0 + 5 * d) / HOUR
    rates = blended(season, n)
    base = backgrounds(policy, season, n, rates, blended(iso, n))
    for d in range(5):
        assert base[d * 24 + 9] == pytest.approx(lam0, rel=0.1)  # the imports are bursts
    for d in range(7):
        assert base[d * 24 + 2] == pytest.approx(rates[d * 24 + 2])  # the export is not


def test_between_bursts_the_plan_polls_a_busy_hours_background_slower_than_the_floor_and_a_burst_at_it() -> None:
    """With a profile whose busy hour gets bulk imports at random times, the next poll after one that saw no burst
    waits longer than the floor (a burst starting meanwhile would have had little time to pile up late changes),
    and a burst going on is polled at the floor."""
    policy = PollPolicy(min_interval=5, max_interval=1800, target_latency=60)
    lam0, burst = 20.0 / HOUR, 150.0 / HOUR
    base = tuple(lam0 if 9 <= b % 24 < 18 else 0.0 for b in range(WEEK_HOURS))
    rates = tuple(a + (burst if a else 0.0) for a in base)
    now = 1e6 - 1e6 % (7 * DAY) + 4 * DAY + 10.5 * HOUR  # a Monday, 10:30 UTC
    assert week_bucket(now) == 10
    state = PollState(
        plan_rates=rates,
        plan_base=base,
        base_price=2.0,
        burst_len=200.0,
        burst_rate=0.5,
        updated=now,
        hour=int(now // HOUR),
    )
    quiet = plan(policy, state, now)
    assert 60 < quiet < 300
    going = replace(state, fast=0.5)  # a burst going on, seen by the fast estimate
    assert plan(policy, going, now) == pytest.approx(60)


def test_a_run_of_close_changes_is_a_burst_whose_size_and_intensity_set_the_ramp() -> None:
    policy = PollPolicy(min_interval=0.2, max_interval=20, target_latency=1)
    state, now = PollState(), 1e6
    state, _ = observe(policy, state, now, Observation(now))
    times = tuple(now + 0.1 * i for i in range(40))  # 40 changes over 3.9 s
    now += 5
    state, _ = observe(policy, state, now, Observation(now - 5, changes=40, change_times=times))
    assert state.burst_len is None  # the run has not ended yet
    now += 10
    state, _ = observe(policy, state, now, Observation(now - 10, changes=1, change_times=(now - 1,)))
    assert state.burst_len == 40
    assert state.burst_rate == pytest.approx(40 / 3.9)
    assert burst_length(policy, state) == pytest.approx(3.9)
