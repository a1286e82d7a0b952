"""How long one store call holds the event loop, on the two backlogs issue 9 named.

1. ``entity``: 100,000 ready deliveries of one entity to one sink, its head in backoff (retry in an
   hour): every lease and next_due must skip the whole blocked line.
2. ``dead``: 50,000 old events whose delivery is dead (kept until purged) plus 1,000 old done ones:
   each retention pass must not walk all the dead ones in one writer hold.

Two measures of a hold: ``apply`` is the time the writer spends running a transaction's statements
on the loop (``Store._apply``, present before and after the change), and ``gap`` is measured from
outside, by a ticker task that wakes every 0.5 ms and records the largest gap between its wake-ups
while the call runs (minus the tick): it also counts thread hand-offs and, on a shared machine, noise. Run with ``--src DIR`` to measure another checkout's ``daemon/``
(e.g. the code before a change) in the same run: ``python bench/store_holds.py --src /tmp/base/daemon``.

Usage: python bench/store_holds.py [--src DIR] [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

TICK = 0.0005
ENTITY_BACKLOG = 100_000
DEAD_LETTERS = 50_000


APPLIES: list[float] = []
APPLIES_CPU: list[float] = []  # the same holds in the loop thread's CPU time: without the machine's preemptions


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.99))]


def instrument() -> None:
    """Record how long each ``Store._apply`` (a transaction's statements, on the loop) takes."""
    from integrand import store as store_mod

    orig = store_mod.Store._apply

    def timed(self: Any, batch: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return orig(self, batch)
        finally:
            APPLIES.append(time.perf_counter() - t)
            APPLIES_CPU.append(time.thread_time() - c)

    store_mod.Store._apply = timed  # type: ignore[method-assign]


async def held(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    """The longest the loop went without running the ticker while ``call`` ran (seconds), and its result."""
    worst = 0.0
    stop = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            worst = max(worst, now - last - TICK)
            last = now

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        res = await call()
    finally:
        stop = True
        await t
    return max(0.0, worst), res


async def entity_backlog(path: Path, runs: int) -> dict[str, Any]:
    from integrand.events import Event
    from integrand.store import Outcome, Store

    clock = [1_000_000.0]
    store = Store(path, synchronous="normal", clock=lambda: clock[0])
    await store.open()
    try:
        for start in range(0, ENTITY_BACKLOG, 2000):
            await store.enqueue(
                [
                    (Event(id=f"e{i}", source="s", type="t", data={"i": i}, entity="E", entity_id="one"), ["k"])
                    for i in range(start, start + 2000)
                ]
            )
        await store.enqueue([(Event(id=f"o{i}", source="s", type="t", data={}), ["k"]) for i in range(100)])
        [head] = [d for d in await store.lease(1, 60) if d.event.id == "e0"] or [None]
        assert head is not None, "the head of the line was not leased first"
        await store.complete([Outcome(head, "retry", error="down", next_attempt_at=clock[0] + 3600)])
        leases: list[float] = []
        dues: list[float] = []
        APPLIES.clear()
        APPLIES_CPU.clear()
        for _ in range(runs):
            h, rows = await held(lambda: store.lease(100, 60))
            leases.append(h)
            await store.complete([Outcome(r, "done") for r in rows])
            h, _ = await held(lambda: store.next_due())
            dues.append(h)
        return {
            "lease_apply_max_ms": max(APPLIES) * 1e3,
            "lease_apply_p99_ms": p99(APPLIES) * 1e3,
            "lease_apply_cpu_max_ms": max(APPLIES_CPU) * 1e3,
            "lease_gap_max_ms": max(leases) * 1e3,
            "lease_gap_median_ms": statistics.median(leases) * 1e3,
            "next_due_gap_max_ms": max(dues) * 1e3,
        }
    finally:
        await store.close()


async def dead_backlog(path: Path, runs: int) -> dict[str, Any]:
    from integrand.events import Event
    from integrand.store import Outcome, Store

    clock = [1_000_000.0]
    store = Store(path, synchronous="normal", clock=lambda: clock[0])
    await store.open()
    try:
        for start in range(0, DEAD_LETTERS, 2000):
            await store.enqueue(
                [(Event(id=f"d{i}", source="s", type="t", data={"i": i}), ["k"]) for i in range(start, start + 2000)]
            )
            rows = await store.lease(2000, 60)
            await store.complete([Outcome(r, "dead", error="bad") for r in rows])
        await store.enqueue([(Event(id=f"ok{i}", source="s", type="t", data={}), ["k"]) for i in range(1000)])
        rows = await store.lease(1000, 60)
        await store.complete([Outcome(r, "done") for r in rows])
        clock[0] += 10 * 86400
        cutoff = clock[0] - 86400
        holds: list[float] = []
        passes: list[float] = []
        calls: list[int] = []
        APPLIES.clear()
        APPLIES_CPU.clear()
        for _ in range(runs):
            t0 = time.perf_counter()
            total = 0
            while True:
                h, n = await held(lambda: store.prune(cutoff))
                holds.append(h)
                if n <= 0:
                    break
                total += n
            passes.append(time.perf_counter() - t0)
            calls.append(len(holds) - sum(calls))
        return {
            "prune_apply_max_ms": max(APPLIES) * 1e3,
            "prune_apply_p99_ms": p99(APPLIES) * 1e3,
            "prune_apply_median_ms": statistics.median(APPLIES) * 1e3,
            "prune_apply_cpu_max_ms": max(APPLIES_CPU) * 1e3,
            "prune_apply_cpu_p99_ms": p99(APPLIES_CPU) * 1e3,
            "prune_holds": len(APPLIES),
            "prune_gap_max_ms": max(holds) * 1e3,
            "prune_gap_median_ms": statistics.median(holds) * 1e3,
            "prune_pass_ms": statistics.median(passes) * 1e3,
            "prune_calls_first_pass": calls[0],
        }
    finally:
        await store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", help="a daemon/ directory to import integrand from (default: this checkout)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    src = Path(args.src) if args.src else Path(__file__).resolve().parent.parent / "daemon"
    sys.path.insert(0, str(src))
    import integrand

    assert Path(integrand.__file__).resolve().is_relative_to(src.resolve()), integrand.__file__
    instrument()
    with tempfile.TemporaryDirectory() as d:
        res = {"src": str(src)}
        res |= asyncio.run(entity_backlog(Path(d) / "entity.db", args.runs))
        res |= asyncio.run(dead_backlog(Path(d) / "dead.db", 3))
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:24} {v:.2f}" if isinstance(v, float) else f"{k:24} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
