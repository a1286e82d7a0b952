"""How long ``Store.counts()`` (what ``integrand status``, ``/metrics`` and systemd's STATUS= read) takes
with a big backlog: 100,000 ready deliveries plus 100,000 delivered ones still retained, over 4 sinks.

Before schema 7 it counted every delivery row (``GROUP BY sink, state`` over the table); since, it reads
the per-(sink, state) counts the store keeps. ``--src DIR`` measures another checkout's ``daemon/`` (the
code before the change) in the same run. Reported: the median and max wall time of ``--runs`` calls, and
the longest the event loop went without running a 0.5 ms ticker meanwhile.

Usage: python bench/store_counts.py [--src DIR] [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BACKLOG = 100_000
DELIVERED = 100_000
SINKS = ("a", "b", "c", "d")


async def measure(path: Path, runs: int) -> dict[str, Any]:
    from store_holds import held

    from integrand.events import Event
    from integrand.store import Outcome, Store

    store = Store(path, synchronous="off")
    await store.open()
    try:
        per_sink = (BACKLOG + DELIVERED) // len(SINKS)
        n = 0
        for sink in SINKS:
            for _ in range(0, per_sink, 2000):
                await store.enqueue(
                    [(Event(id=f"e{n + i}", source="s", type="t", data={"i": i}), [sink]) for i in range(2000)]
                )
                n += 2000
        left = DELIVERED
        while left > 0:
            rows = await store.lease(min(2000, left), 600)
            await store.complete([Outcome(r, "done") for r in rows])
            left -= len(rows)
        counts = await store.counts()
        assert sum(counts.values()) == BACKLOG + DELIVERED, counts
        walls: list[float] = []
        gaps: list[float] = []
        for _ in range(runs):
            t = time.perf_counter()
            gap, _ = await held(store.counts)
            walls.append(time.perf_counter() - t)
            gaps.append(gap)
        return {
            "counts_wall_median_ms": statistics.median(walls) * 1e3,
            "counts_wall_max_ms": max(walls) * 1e3,
            "counts_gap_max_ms": max(gaps) * 1e3,
        }
    finally:
        await store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, help="a daemon/ directory to measure instead of this checkout's")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve()))
    with tempfile.TemporaryDirectory() as tmp:
        res = asyncio.run(measure(Path(tmp) / "counts.db", args.runs))
    print(json.dumps(res) if args.json else "\n".join(f"{k:28} {v:10.2f}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
