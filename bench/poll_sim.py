"""Simulate a week of polling a bursty source on a virtual clock: adaptive vs fixed intervals vs an oracle.

No sleeping and no network: changes are drawn from a non-homogeneous Poisson process
(quiet nights and weekends, busy working hours, bulk-import bursts), every policy
polls the same change history, and a change's detection latency is the time from the
change to the first poll that starts after it. The adaptive policy is integrand's own
:func:`integrand.pollpolicy.observe`, unchanged.

    python bench/poll_sim.py                 # the table for docs/benchmarks.md
    python bench/poll_sim.py --plot docs/polling-interval.png   # needs matplotlib (the bench extra)
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from integrand.pollpolicy import Observation, PollPolicy, PollState, observe

DAY = 86400.0
WEEK = 7 * DAY
PAGE = 100  # items per page: a poll that finds more asks again at once


@dataclass(frozen=True)
class Workload:
    """The true change rate λ(t) (changes per second) and one random history drawn from it."""

    bursts: tuple[tuple[float, float, float], ...]  # (start, end, rate)
    changes: tuple[float, ...]
    office: float = 20.0  # changes per hour in weekday working hours, outside bursts

    def base_rate(self, t: float) -> float:
        day, hour = int(t // DAY), (t % DAY) / 3600
        weekend = day % 7 >= 5
        if weekend:
            per_hour = 0.5 if 9 <= hour < 20 else 0.1
        elif 9 <= hour < 18:
            per_hour = self.office
        elif 7 <= hour < 9 or 18 <= hour < 21:
            per_hour = 3.0
        else:
            per_hour = 0.2
        return per_hour / 3600

    def rate(self, t: float) -> float:
        r = self.base_rate(t)
        for s, e, br in self.bursts:
            if s <= t < e:
                r += br
        return r


def make_workload(seed: int, office: float = 20.0) -> Workload:
    """Working-hours traffic plus 2-6 bulk-import bursts per weekday (50-400 changes over 2-15 minutes)."""
    rng = random.Random(seed)
    bursts = []
    for day in range(5):
        for _ in range(rng.randint(2, 6)):
            start = day * DAY + rng.uniform(8, 19) * 3600
            length = rng.uniform(120, 900)
            count = rng.uniform(50, 400)
            bursts.append((start, start + length, count / length))
    w = Workload(tuple(bursts), (), office)
    # Thinning (Lewis & Shedler): candidates at the peak rate, kept with probability λ(t)/peak.
    peak = max(w.base_rate(h * 1800.0) for h in range(7 * 48)) + max(b[2] for b in bursts)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(peak)
        if t >= WEEK:
            break
        if rng.random() * peak < w.rate(t):
            out.append(t)
    return Workload(w.bursts, tuple(out), office)


@dataclass
class Result:
    requests: int
    latencies: list[float]
    polls: list[float]
    waits: list[tuple[float, float]]

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p95(self) -> float:
        return percentile(self.latencies, 95)

    def max_in_any_hour(self) -> int:
        best, j = 0, 0
        for i, t in enumerate(self.polls):
            while self.polls[j] <= t - 3600:
                j += 1
            best = max(best, i - j + 1)
        return best


def percentile(xs: Sequence[float], p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def simulate(w: Workload, next_delay: Callable[[float, int, bool, int], float], target: float = 60.0) -> Result:
    """Poll from t=0 to the end of the week; ``next_delay(now, new_changes, more, late)`` picks each wait."""
    ch = w.changes
    polls: list[float] = []
    waits: list[tuple[float, float]] = []
    latencies: list[float] = []
    t, seen = 0.0, 0
    while t < WEEK:
        polls.append(t)
        upto = bisect.bisect_right(ch, t)
        new = upto - seen
        take = min(new, PAGE)
        found = [t - c for c in ch[seen : seen + take]]
        latencies.extend(found)
        seen += take
        more = new > PAGE
        d = next_delay(t, take, more, sum(1 for x in found if x > target))
        waits.append((t, d))
        t += max(d, 0.001) if more else d
    latencies.extend(WEEK - c for c in ch[seen:])  # not seen by the end: counted as late as they are
    return Result(len(polls), latencies, polls, waits)


def fixed(interval: float) -> Callable[[float, int, bool, int], float]:
    return lambda now, n, more, late: 0.0 if more else interval


def adaptive(policy: PollPolicy, seed: int) -> Callable[[float, int, bool, int], float]:
    rng = random.Random(seed)
    state = PollState()

    def step(now: float, n: int, more: bool, late: int) -> float:
        nonlocal state
        obs = Observation(now, changes=n, more=more)
        state, d = observe(policy, state, now, obs, rng.random())
        return d.delay

    return step


def oracle(w: Workload, threshold: float, fast: float, slow: float) -> Callable[[float, int, bool, int], float]:
    """Knows λ(t): poll every ``fast`` s while λ(t+fast) ≥ threshold, else every ``slow`` s, but never past a change of regime."""

    def step(now: float, n: int, more: bool, late: int) -> float:
        if more:
            return 0.0
        if w.rate(now) >= threshold or w.rate(now + fast) >= threshold:
            return fast
        # Sleep slow, but wake on time for the next busy stretch (it knows when that is).
        t = now + fast
        while t < now + slow:
            if w.rate(t) >= threshold:
                return t - now
            t += fast
        return slow

    return step


def best_fixed_for(w: Workload, p95: float) -> tuple[float, Result]:
    """The longest fixed interval whose p95 detection latency is no worse than ``p95``."""
    lo, hi = 1.0, 3600.0
    best = (lo, Result(0, [], [], []))
    for _ in range(30):
        mid = (lo + hi) / 2
        r = simulate(w, fixed(mid))
        if r.p95 <= p95:
            lo, best = mid, (mid, r)
        else:
            hi = mid
    return best


def oracle_for(w: Workload, p95: float, fast: float, slow: float) -> Result:
    """The oracle with the change-rate threshold (a grid from 0.01 to 10^4 per hour) that needs fewest requests for ``p95``."""
    best = simulate(w, oracle(w, 0.0, fast, slow))
    for i in range(49):
        thr = 10 ** (-2 + i / 8) / 3600
        r = simulate(w, oracle(w, thr, fast, slow))
        if r.p95 <= p95 and r.requests < best.requests:
            best = r
    return best


# integrand's defaults for everything but the three numbers a user sets per source.
POLICY = PollPolicy(min_interval=5.0, max_interval=1800.0, target_latency=60.0)


def adaptive_for(w: Workload, p95: float, policy: PollPolicy, seed: int) -> tuple[float, Result]:
    """The adaptive policy at its best setting: the ``aggressiveness`` (a grid from 0.001 to 10) with fewest requests for ``p95``."""
    best: tuple[float, Result] | None = None
    for i in range(33):
        theta = 10 ** (-3 + i / 8)
        r = simulate(w, adaptive(dataclasses.replace(policy, aggressiveness=theta), seed))
        if r.p95 <= p95 and (best is None or r.requests < best[1].requests):
            best = (theta, r)
    assert best is not None, "even the most eager setting misses the target"
    return best


def run(seeds: Sequence[int], policy: PollPolicy, budget: int | None, office: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    target = policy.target_latency
    for seed in seeds:
        w = make_workload(seed, office)
        d = simulate(w, adaptive(policy, seed))
        t_fix, f = best_fixed_for(w, target)
        theta, a = adaptive_for(w, target, policy, seed)
        o = oracle_for(w, target, fast=target, slow=policy.max_interval)
        row: dict[str, Any] = {
            "seed": seed,
            "changes": len(w.changes),
            "fixed_interval": t_fix,
            "theta": theta,
            "workload": w,
        }
        for name, r in (("default", d), ("fixed", f), ("adaptive", a), ("oracle", o)):
            row[name] = r
        if budget is not None:
            b = simulate(w, adaptive(dataclasses.replace(policy, max_requests_per_hour=budget), seed))
            row["budget"] = budget
            row["budgeted"] = b
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], target: float) -> str:
    def lat(r: Result) -> str:
        return f"{r.p50:.0f} / {r.p95:.0f}"

    out = [
        f"Each policy at its best setting for p95 detection latency ≤ {target:.0f} s:",
        "",
        "| seed | changes | fixed: interval | requests | p50 / p95 (s) | adaptive: aggressiveness | requests "
        "| p50 / p95 (s) | oracle: requests | p50 / p95 (s) | fixed ÷ adaptive | adaptive ÷ oracle |",
        "|---:|---:|---:|---:|---|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in rows:
        f, a, o = r["fixed"], r["adaptive"], r["oracle"]
        out.append(
            f"| {r['seed']} | {r['changes']} | {r['fixed_interval']:.0f} s | {f.requests} | {lat(f)} "
            f"| {r['theta']:.3f} | {a.requests} | {lat(a)} | {o.requests} | {lat(o)} "
            f"| {f.requests / a.requests:.1f}x | {a.requests / o.requests:.2f}x |"
        )
    mean = statistics.mean
    out += [
        "",
        f"Mean: fixed ÷ adaptive **{mean(r['fixed'].requests / r['adaptive'].requests for r in rows):.1f}x**, "
        f"adaptive ÷ oracle **{mean(r['adaptive'].requests / r['oracle'].requests for r in rows):.2f}x**, "
        f"fixed ÷ oracle {mean(r['fixed'].requests / r['oracle'].requests for r in rows):.1f}x.",
        "",
        "The adaptive policy with its shipped defaults (aggressiveness 0.2, no per-seed tuning), and with a request budget:",
        "",
        "| seed | default: requests | p50 / p95 (s) | fixed with the same p95: requests | fixed ÷ default "
        "| budget (req/h) | requests | p50 / p95 (s) | most requests in any 3600 s |",
        "|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        d = r["default"]
        _, same = best_fixed_for(r["workload"], d.p95) if "workload" in r else (0, None)
        b = r.get("budgeted")
        fx = f"{same.requests} | {same.requests / d.requests:.1f}x" if same else "- | -"
        bud = f"{r['budget']} | {b.requests} | {lat(b)} | {b.max_in_any_hour()}" if b else "- | - | - | -"
        out.append(f"| {r['seed']} | {d.requests} | {lat(d)} | {fx} | {bud} |")
    return "\n".join(out)


def plot(path: str, seed: int, policy: PollPolicy) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = make_workload(seed)
    a = simulate(w, adaptive(policy, seed))
    f_int, _ = best_fixed_for(w, a.p95)
    lo, hi = 0.0, 2 * DAY
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    hours = [t / 3600 for t, _ in a.waits if lo <= t < hi]
    waits = [d for t, d in a.waits if lo <= t < hi]
    ax1.step(hours, waits, where="post", lw=0.8, label="adaptive: wait before next poll")
    ax1.axhline(f_int, color="tab:red", ls="--", lw=0.8, label=f"fixed interval with the same p95 ({f_int:.0f} s)")
    ax1.set_yscale("log")
    ax1.set_ylabel("seconds")
    ax1.legend(loc="upper right", fontsize=8)
    xs = [h / 6 for h in range(int(hi / 600))]
    ax2.plot(xs, [w.rate(h * 3600) * 3600 for h in xs], color="tab:green", lw=0.8)
    ax2.set_yscale("symlog", linthresh=1)
    ax2.set_ylabel("true changes / hour")
    ax2.set_xlabel("hours (two weekdays)")
    fig.suptitle(
        f"integrand adaptive polling, bursty source (seed {seed}, target latency {policy.target_latency:.0f} s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3, 4, 5])
    ap.add_argument("--budget", type=int, default=120, help="requests per hour for the budget run")
    ap.add_argument("--office", type=float, default=20.0, help="changes per hour in working hours outside bursts")
    ap.add_argument("--plot", help="write the interval-vs-time figure here (PNG)")
    args = ap.parse_args()
    print(table(run(args.seeds, POLICY, args.budget, args.office), POLICY.target_latency))
    if args.plot:
        plot(args.plot, args.seeds[0], POLICY)


if __name__ == "__main__":
    main()
