"""Property tests of the adaptive polling policy, driven with a fake clock."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from integrand.pollpolicy import HOUR, Observation, PollPolicy, PollState, observe

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
    for _ in range(5):  # a busy spell
        now += d.delay
        state, d = observe(policy, state, now, Observation(now, changes=20))
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
    assert now < 4 * 3600  # back to the slowest rate within a few half-lives


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


def test_daily_profile_anticipates_the_working_day() -> None:
    policy = PollPolicy(min_interval=5, max_interval=1800, target_latency=60, seasonal=True)
    state, now = PollState(), 0.0
    # Day 1: changes every minute from 09:00 to 17:00, nothing otherwise.
    while now < 86400:
        busy = 9 * 3600 <= now % 86400 < 17 * 3600
        state, d = observe(policy, state, now, Observation(now, changes=1 if busy else 0))
        now += min(d.delay, 60.0) if busy else d.delay
    # Day 2, 08:59: nothing changed for hours, yet the policy is already polling fast for 09:00.
    now = 86400 + 9 * 3600 - 60
    _, d = observe(policy, state, now, Observation(now))
    assert d.delay <= 300  # half-way to the learnt rate after one day; without the profile it would be 1800
    _, d_plain = observe(replace(policy, seasonal=False), state, now, Observation(now))
    assert d_plain.delay == 1800
    # Day 2 at 03:00 it is slow.
    _state2, d2 = observe(policy, state, 2 * 86400 + 3 * 3600, Observation(2 * 86400 + 3 * 3600))
    assert d2.delay >= 900
