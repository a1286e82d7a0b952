"""`make bench`: run the benchmarks and rewrite the results section of docs/benchmarks.md.

    python bench/run.py [ingest|e2e|store|all] [--runs 3] [--seconds 10] [--events 20000]

ingest  wrk against the bare aiohttp+uvloop baseline and against `integrand run`, 64 and 256 connections
e2e     webhooks in → jsonl sink written, sustained events/s
store   the queue alone beside huey and persist-queue, and leasing under a backlog

Results are kept in bench/results.json (each sub-benchmark replaces only its own part), and
the section between the markers in docs/benchmarks.md is regenerated from that file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import http_bench  # noqa: E402
import report  # noqa: E402
import store_bench  # noqa: E402

RESULTS = HERE / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
CONNECTIONS = (64, 256)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    mem_kb = next(
        int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
    )
    versions = {}
    for dist in ("aiohttp", "uvloop", "aiosqlite", "orjson", "huey", "persist-queue"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10).stdout.split("[")[0].strip()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "daemon"], capture_output=True, text=True, cwd=ROOT, timeout=10
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "versions": versions,
        "wrk": wrk,
        "commit": commit + ("+uncommitted daemon changes" if dirty else ""),
    }


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def bench_ingest(runs: int, seconds: float) -> dict[str, Any]:
    """Each run interleaves the targets so they share the machine's noise; fresh server each time."""
    out: dict[str, Any] = {"runs": runs, "seconds": seconds, "warmup_seconds": http_bench.WARMUP_SECONDS}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for c in CONNECTIONS:
        for r in range(runs):
            for kind in http_bench.TARGETS:
                tag = f"i{c}r{r}{kind[:3]}{int(time.time())}"
                res = http_bench.ingest_once(kind, c, seconds, tag)
                results.setdefault(str(c), {}).setdefault(kind, []).append(res)
                print(
                    f"ingest c={c} run={r + 1}/{runs} {kind:18} {res['rps']:8.0f} req/s  "
                    f"p50 {res['p50_us'] / 1000:6.1f} ms  p99 {res['p99_us'] / 1000:6.1f} ms  "
                    f"RSS {res['VmRSS'] / 1024:5.0f} MiB  non-2xx {res['errors_status']}",
                    flush=True,
                )
    out["results"] = results
    return out


def bench_e2e(runs: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs, "seconds": seconds, "connections": 64, "results": []}
    for r in range(runs):
        # The bare baseline just before, in the same run: the machine's speed moves by a third between
        # minutes here, and the ratio is what stays comparable with the target's own machine.
        bare = http_bench.ingest_once("bare", 64, seconds, f"e2eb{r}x{int(time.time())}")
        res = http_bench.e2e_once(64, seconds, f"e2e{r}x{int(time.time())}")
        res["bare_rps"] = bare["rps"]
        out["results"].append(res)
        print(
            f"e2e run={r + 1}/{runs} {res['lines']} events in {res['e2e_seconds']:.2f} s = "
            f"{res['e2e_eps']:.0f} events/s (sink finished {res['drain_after_load_s']:.2f} s after the load); "
            f"bare {bare['rps']:.0f} req/s just before",
            flush=True,
        )
    return out


def bench_store(runs: int, events: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "runs": runs,
        "events": events,
        "producers": store_bench.PRODUCERS,
        "consumers": store_bench.CONSUMERS,
        "lease_batch": store_bench.LEASE_BATCH,
        "payload_bytes": store_bench.PAYLOAD_BYTES,
        "e2e": {},
        "backlog": {},
    }
    for r in range(runs):
        for q in store_bench.QUEUES:
            res = store_bench.e2e_once(q, events)
            out["e2e"].setdefault(q, []).append(res)
            print(
                f"store run={r + 1}/{runs} {q:13} enqueue {res['enqueue_rate']:7.0f}/s  "
                f"drain {res['drain_rate']:7.0f}/s  end to end {res['e2e_rate']:7.0f}/s  (synchronous={res['synchronous']})",
                flush=True,
            )
    take = 1000
    out["backlog_take"] = take
    # Taking 1,000 lasts well under a second, so the noise of the shared machine weighs more: more runs.
    runs = out["backlog_runs"] = max(runs, 5)
    for r in range(runs):
        for q in store_bench.QUEUES:
            for backlog in (2000, 20000):
                res = store_bench.backlog_once(q, backlog, take)
                out["backlog"].setdefault(q, {}).setdefault(str(backlog), []).append(res)
                print(
                    f"backlog run={r + 1}/{runs} {q:13} {backlog:6} waiting: first {take} taken+acked at "
                    f"{res['rate']:7.0f}/s, whole backlog drained at {res['drain_all_rate']:7.0f}/s",
                    flush=True,
                )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=["ingest", "e2e", "store", "all", "doc"])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each configuration (medians reported)")
    parser.add_argument("--seconds", type=float, default=10, help="measured wrk duration per run")
    parser.add_argument("--events", type=int, default=20000, help="events in the store benchmark")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()

    data: dict[str, Any] = orjson.loads(RESULTS.read_bytes()) if RESULTS.exists() else {}
    if args.what != "doc":
        if args.what in ("ingest", "e2e", "all"):
            http_bench.ensure_wrk()
        started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        load_before = loadavg()
        steps = ["ingest", "e2e", "store"] if args.what == "all" else [args.what]
        for step in steps:
            if step == "ingest":
                part = bench_ingest(args.runs, args.seconds)
            elif step == "e2e":
                part = bench_e2e(args.runs, args.seconds)
            else:
                part = bench_store(args.runs, args.events)
            part["started"] = started
            part["loadavg_before"] = load_before
            part["loadavg_after"] = loadavg()
            part["machine"] = machine()
            part["command"] = "python bench/run.py " + " ".join(sys.argv[1:])
            data[step] = part
            RESULTS.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    if not args.no_doc:
        report.write(DOC, data)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
