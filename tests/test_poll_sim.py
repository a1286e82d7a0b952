"""A small version of bench/poll_sim.py: the simulator's source behaves, the references are what they claim."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from integrand.pollpolicy import PollPolicy


def _load() -> ModuleType:
    path = Path(__file__).parent.parent / "bench" / "poll_sim.py"
    spec = importlib.util.spec_from_file_location("poll_sim", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["poll_sim"] = mod
    spec.loader.exec_module(mod)
    return mod


ps = _load()


@pytest.fixture(scope="module")
def bursty() -> dict[str, Any]:
    """Two short 'weeks' (Monday and Tuesday each): the second is measured."""
    return ps.run_one("bursty", 7, ps.Source(), ps.POLICY, days=2)  # type: ignore[no-any-return]


def test_nothing_missed_retry_after_honoured_and_references_bracket_the_policy(bursty: dict[str, Any]) -> None:
    a, f, o = bursty["integrand"], bursty["fixed"], bursty["oracle"]
    assert a.missed == 0 and f.missed == 0
    assert a.retry_after_violations == 0 and f.retry_after_violations == 0
    # The best fixed interval meets the policy's p95 and the next 0.5 % longer one does not.
    assert f.pct(95) <= a.pct(95)
    # The oracle is a lower bound: nothing causal beats it, and it needs fewer requests than fixed polling.
    assert o.bound <= o.requests <= o.feasible <= a.requests
    assert o.requests < f.requests
    assert o.late_share <= 0.05


def test_oracle_on_a_constant_rate_without_lag_is_the_textbook_interval() -> None:
    """Poisson at rate λ, no lag: a share 1 - L/g of changes wait longer than L, so 5 % late means g = L / 0.95."""
    src = ps.Source(lag=0.0, errors=0.0, throttle=0.0)
    w = ps.make_workload("random", 1, weeks=1, lag=0.0, days=1)
    policy = PollPolicy(min_interval=1, max_interval=1800, target_latency=60)
    o = ps.rate_oracle(w, src, 60.0, policy)
    assert o.requests == pytest.approx(86400 * 0.95 / 60, rel=1e-6)
    # The same interval, simulated, makes about 5 % of changes late.
    r = ps.simulate(w, src, ps.fixed_step(60 / 0.95), 1)
    late = sum(1 for x in r.latencies if x > 60) / len(r.latencies)
    assert abs(late - 0.05) < 0.03


def test_phi_matches_a_direct_integration() -> None:
    """φ(g) = E[(g - (p - lag))+] for lag ~ U(0, m), against a midpoint sum."""
    for g in (10.0, 55.0, 58.0, 61.0, 200.0):
        p, m, n = 60.0, 5.0, 20000
        direct = sum(max(0.0, g - (p - m * (i + 0.5) / n)) for i in range(n)) / n
        assert math.isclose(ps._phi(g, p, m), direct, rel_tol=1e-4, abs_tol=1e-9)


def test_webhooks_with_losses_need_far_fewer_polls() -> None:
    hook = ps.Source(webhook_drop=0.1)
    r = ps.run_one("bursty", 7, hook, ps.POLICY, days=2)
    a = r["integrand"]
    assert a.missed == 0
    assert a.pct(50) < 5  # most changes arrive by webhook
    assert a.requests < r["fixed"].requests
