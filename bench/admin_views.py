"""What the admin views cost under a backlog: /status, /metrics' refresh and the status page's data.

The status page refreshes every 5 s and Prometheus scrapes every 15-60 s, each reading the queue
while webhooks arrive. For backlogs of 0, 10,000 and 100,000 pending deliveries (one sink, spread
over 1,000 entities) plus 500 dead letters, each view is timed end to end (``wall``) and by the
longest gap a 0.5 ms ticker saw on the event loop while it ran (``gap``: what a webhook arriving
then would have waited). The baseline is ``store.counts()`` alone, which is all the old ``/status``
read, measured in the same run.

Usage: python bench/admin_views.py [--runs N] [--json]    (medians of N runs; default 5)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

from integrand import reports  # noqa: E402
from integrand.config import parse_config  # noqa: E402
from integrand.events import Event  # noqa: E402
from integrand.store import Store  # noqa: E402

TICK = 0.0005
BACKLOGS = (0, 10_000, 100_000)
DEAD = 500


async def measured(call: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """(wall seconds, longest loop gap in seconds beyond the tick) while ``call`` runs."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            worst = max(worst, now - last - TICK)
            last = now

    t = asyncio.create_task(ticker())
    await asyncio.sleep(TICK * 2)
    start = time.perf_counter()
    await call()
    wall = time.perf_counter() - start
    done = True
    await t
    return wall, max(0.0, worst)


async def fill(store: Store, pending: int) -> None:
    batch: list[tuple[Event, list[str]]] = []
    for i in range(pending + DEAD):
        ev = Event(id=f"e{i}", source="demo", type="t", data={"n": i}, entity="c", entity_id=f"c{i % 1000}")
        batch.append((ev, ["crm"]))
        if len(batch) == 2000:
            await store.enqueue(batch)
            batch = []
    if batch:
        await store.enqueue(batch)


async def one_run(pending: int, settings: Any) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "integrand.db")
        await store.open()
        try:
            await fill(store, pending)
            views: dict[str, Callable[[], Awaitable[Any]]] = {
                "baseline counts()": store.counts,
                "backlog()": store.backlog,
                "event_count()": store.event_count,
                "/api/status": lambda: reports.status(store, settings),
                "/api/dlq (200)": lambda: reports.dlq_list(store, limit=200),
                "events list (100)": lambda: reports.events_list(store, source=None, since=None, state=None),
            }
            out = {}
            for name, call in views.items():
                await call()  # warm the page cache: the steady state of a page refreshing every 5 s
                out[name] = await measured(call)
            return out
        finally:
            await store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    raw = {
        "sources": {"demo": {"connector": "webhook", "signature": "none", "allow_unsigned": True}},
        "sinks": {"crm": {"connector": "jsonl", "path": "out.jsonl"}},
        "routes": [{"from": "demo", "to": ["crm"]}],
    }
    settings = parse_config(raw, base_dir=Path(tempfile.gettempdir()))
    results: dict[int, dict[str, dict[str, float]]] = {}
    for pending in BACKLOGS:
        runs = [asyncio.run(one_run(pending, settings)) for _ in range(args.runs)]
        results[pending] = {
            name: {
                "wall_ms": statistics.median(r[name][0] for r in runs) * 1000,
                "gap_ms": statistics.median(r[name][1] for r in runs) * 1000,
            }
            for name in runs[0]
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"# {platform.node()} · Python {platform.python_version()} · medians of {args.runs} runs")
    print("| view | " + " | ".join(f"{n:,} pending: wall / loop gap (ms)" for n in BACKLOGS) + " |")
    print("|---|" + "---|" * len(BACKLOGS))
    for name in results[BACKLOGS[0]]:
        cells = [f"{results[n][name]['wall_ms']:.1f} / {results[n][name]['gap_ms']:.1f}" for n in BACKLOGS]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
