"""Where a commit's time goes under load: trips to the SQLite threads, timed from both sides.

    python bench/trace_writer.py [integrand|integrand-noroute] [--seconds 10] [--connections 64]

Runs the daemon in this process (uvloop, like `integrand run`), wraps aiosqlite's
``Connection._execute`` (private: a diagnostic, not something the daemon relies on) to time
each trip as the event loop sees it (submit → result back in the coroutine) and as the
SQLite thread sees it (the call itself), and drives it with wrk. Prints commits and their
duration, trips per commit, and the two times per statement kind.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import aiosqlite  # noqa: E402
import http_bench  # noqa: E402

from integrand import store as store_mod  # noqa: E402
from integrand.app import Daemon, run  # noqa: E402
from integrand.config import load_config  # noqa: E402

Stats = dict[str, Any]


def instrument(stats: Stats) -> None:
    loop_side: dict[tuple[int, str], list[float]] = defaultdict(list)
    thread_side: dict[tuple[int, str], list[float]] = defaultdict(list)
    stats["loop"], stats["thread"], stats["commits"], stats["leases"] = loop_side, thread_side, [], []
    orig_execute = aiosqlite.Connection._execute
    orig_commit = store_mod.Store._commit
    orig_lease = store_mod.Store.lease

    async def execute(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        kind = args[0].split()[0].upper() if args and isinstance(args[0], str) else getattr(fn, "__name__", "?")
        key = (id(self), kind)

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                thread_side[key].append(time.perf_counter() - t)

        t0 = time.perf_counter()
        try:
            return await orig_execute(self, timed, *args, **kwargs)
        finally:
            loop_side[key].append(time.perf_counter() - t0)

    async def commit(self: store_mod.Store, batch: list[Any]) -> None:
        t0 = time.perf_counter()
        await orig_commit(self, batch)
        stats["commits"].append((time.perf_counter() - t0, len(batch)))

    async def lease(self: store_mod.Store, *args: Any, **kwargs: Any) -> Any:
        rows = await orig_lease(self, *args, **kwargs)
        stats["leases"].append(len(rows))
        return rows

    aiosqlite.Connection._execute = execute  # type: ignore[method-assign]
    store_mod.Store._commit = commit  # type: ignore[method-assign]
    store_mod.Store.lease = lease  # type: ignore[method-assign]


def report(stats: Stats, writer_id: int, wrk: dict[str, Any]) -> None:
    commits = stats["commits"]
    durations = [c[0] for c in commits]
    print(f"wrk: {wrk['rps']:.0f} req/s, p50 {wrk['p50_us'] / 1000:.1f} ms, p99 {wrk['p99_us'] / 1000:.1f} ms")
    print(
        f"commits: {len(commits)}, mean {statistics.mean(durations) * 1e3:.2f} ms, "
        f"p50 {statistics.median(durations) * 1e3:.2f} ms, ops per commit {statistics.mean(c[1] for c in commits):.1f}"
    )
    writer_trips = sum(len(v) for (cid, _), v in stats["loop"].items() if cid == writer_id)
    other_trips = sum(len(v) for (cid, _), v in stats["loop"].items() if cid != writer_id)
    print(f"writer trips: {writer_trips} ({writer_trips / len(commits):.1f} per commit); reader trips: {other_trips}")
    leases = stats["leases"]
    if leases:
        print(
            f"leases: {len(leases)}, empty {sum(1 for n in leases if n == 0)}, mean rows {statistics.mean(leases):.1f}"
        )
    print("\nwriter trips by statement: count, mean as the event loop sees it, mean inside the SQLite thread")
    rows = [(k[1], v, stats["thread"][k]) for k, v in stats["loop"].items() if k[0] == writer_id]
    for kind, loop_t, thread_t in sorted(rows, key=lambda r: -sum(r[1])):
        print(
            f"  {kind:18} {len(loop_t):7}  {statistics.mean(loop_t) * 1e3:6.2f} ms  "
            f"{statistics.mean(thread_t) * 1e3:6.2f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", nargs="?", default="integrand", choices=["integrand", "integrand-noroute"])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    stats: Stats = {}
    instrument(stats)
    port = http_bench.free_port()
    with tempfile.TemporaryDirectory(prefix="integrand-trace-") as tmp:
        cfg = Path(tmp) / "config.toml"
        text = http_bench.CONFIG.format(port=port, secret=http_bench.SECRET)
        cfg.write_text(text + (http_bench.ROUTE if args.kind == "integrand" else ""))
        settings = load_config(cfg)
        wrk: dict[str, Any] = {}
        holder: dict[str, Daemon] = {}
        started = threading.Event()

        def load() -> None:
            started.wait(30)
            url = f"http://127.0.0.1:{port}/hooks/demo"
            wrk.update(http_bench.run_wrk(url, args.connections, args.seconds, f"tr{int(time.time())}"))

        def on_ready(d: Daemon) -> None:
            holder["d"] = d
            started.set()

        async def daemon() -> None:
            task = asyncio.create_task(run(settings, on_ready=on_ready))
            while not wrk:
                await asyncio.sleep(0.1)
                if task.done():
                    task.result()
            holder["d"].stop()
            await asyncio.wait_for(task, 30)

        loader = threading.Thread(target=load)
        loader.start()
        import uvloop

        uvloop.run(daemon())
        loader.join(timeout=60)
        # The writer is the connection that commits; the other one is the read connection.
        writer_id = next((cid for (cid, kind) in stats["loop"] if kind == "COMMIT"), 0)
    report(stats, writer_id, wrk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
