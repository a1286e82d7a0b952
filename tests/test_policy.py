"""Property tests for the pure policies: retry delays and the circuit breaker."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from integrand import breaker as br
from integrand.backoff import parse_retry_after, retry_delay, should_give_up

attempts = st.integers(min_value=1, max_value=200)
seconds = st.floats(min_value=0.001, max_value=86400, allow_nan=False)
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@given(attempts, seconds, seconds, unit)
def test_delay_is_within_full_jitter_bounds(attempt: int, base: float, cap: float, rand: float) -> None:
    d = retry_delay(attempt, base=base, cap=cap, rand=rand)
    assert 0.0 <= d <= min(cap, base * 2 ** (attempt - 1)) + 1e-9


@given(attempts, seconds, seconds, unit, seconds)
def test_retry_after_is_a_floor(attempt: int, base: float, cap: float, rand: float, ra: float) -> None:
    assert retry_delay(attempt, base=base, cap=cap, rand=rand, retry_after=ra) >= ra


@given(st.integers(min_value=1, max_value=60), seconds, seconds)
def test_ceiling_grows_monotonically_until_cap(attempt: int, base: float, cap: float) -> None:
    a = retry_delay(attempt, base=base, cap=cap, rand=1.0)
    b = retry_delay(attempt + 1, base=base, cap=cap, rand=1.0)
    assert a <= b <= cap + 1e-9


def test_give_up_on_attempts_or_age() -> None:
    assert not should_give_up(3, 10, max_attempts=5, max_age=100)
    assert should_give_up(5, 10, max_attempts=5, max_age=100)
    assert should_give_up(1, 100, max_attempts=5, max_age=100)


def test_parse_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("120", now=0) == 120
    assert parse_retry_after(None, now=0) is None
    assert parse_retry_after("soon", now=0) is None
    # RFC 9110 example date; 784111777 is its epoch second.
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=784111777 - 30) == 30
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=784111777 + 30) == 0


def new_breaker() -> br.Breaker:
    return br.Breaker(threshold=3, open_for=5.0, max_open_for=60.0)


@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=0, max_value=30)), max_size=200))
def test_breaker_invariants(steps: list[tuple[bool, float]]) -> None:
    """Open never lasts longer than max_open_for; only one probe is let through while half-open."""
    b, now = new_breaker(), 0.0
    for ok, dt in steps:
        now += dt
        permit, b = br.permit(b, now)
        assert b.current_open_for <= b.max_open_for
        if permit == "probe":
            assert b.status == "half_open"
            assert br.permit(b, now)[0] == "no"
        if permit == "no":
            continue
        b = br.on_success(b) if ok else br.on_failure(b, now)
        if ok:
            assert b.status == "closed" and b.failures == 0


def test_breaker_opens_after_threshold_then_probes_and_backs_off() -> None:
    b = new_breaker()
    for t in range(2):
        b = br.on_failure(b, float(t))
        assert br.permit(b, float(t))[0] == "yes"
    b = br.on_failure(b, 2.0)
    assert b.status == "open"
    assert br.permit(b, 6.9)[0] == "no"
    permit, b = br.permit(b, 7.0)
    assert permit == "probe"
    b = br.on_failure(b, 7.0)  # failed probe: open twice as long
    assert (b.status, b.reopens_at) == ("open", 17.0)
    for _ in range(10):
        _, b = br.permit(b, b.reopens_at)
        b = br.on_failure(b, b.reopens_at)
    assert b.current_open_for == 60.0  # capped: a recovered sink is noticed within a minute
    _, b = br.permit(b, b.reopens_at)
    assert br.on_success(b).status == "closed"


def test_trip_opens_immediately() -> None:
    b = br.trip(new_breaker(), 100.0)
    assert b.status == "open" and br.permit(b, 100.0 + 59)[0] == "no"
    assert br.permit(b, 160.0)[0] == "probe"
