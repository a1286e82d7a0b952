"""One node on the PostgreSQL store beside one node on SQLite: end-to-end events/s, same run.

    python bench/pg_store.py [--runs 3] [--seconds 10]

Each run measures, back to back, the shipped-default SQLite store and the PostgreSQL backend on
127.0.0.1:5432 (a database of the benchmark's own, dropped at the end), exactly as bench/run.py's
e2e: wrk at 64 connections, signed webhooks in, the jsonl sink's last line out. Prints one line per
measurement and the medians, and writes bench/results-pg.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import http_bench  # noqa: E402

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_KEYS = 'backend = "postgres"\ndsn = {env = "INTEGRAND_BENCH_STORE_DSN"}\n'


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _pg_counts(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


def pg_e2e_once(dsn: str, connections: int, seconds: float, tag: str, drain_timeout: float = 120.0) -> dict[str, Any]:
    """``http_bench.e2e_once`` on the PostgreSQL backend (the events are counted in the database)."""
    os.environ["INTEGRAND_BENCH_STORE_DSN"] = dsn
    with http_bench.server("integrand", PG_KEYS) as srv:
        t0 = time.time()
        res = http_bench.run_wrk(srv.url, connections, seconds, tag)
        t_load_end = time.time()
        counter = http_bench.LineCounter(srv.jsonl)
        deadline = time.monotonic() + drain_timeout
        stored = asyncio.run(_pg_counts(dsn))
        while counter.poll() < stored:
            if time.monotonic() > deadline:
                raise RuntimeError(f"jsonl sink wrote {counter.lines} of {stored} events within {drain_timeout} s")
            time.sleep(0.05)
            stored = asyncio.run(_pg_counts(dsn))
        t_last = srv.jsonl.stat().st_mtime
        res.update(http_bench.proc_status(srv.proc.pid))
    res["stored"] = stored
    res["lines"] = counter.lines
    res["e2e_seconds"] = t_last - t0
    res["e2e_eps"] = counter.lines / (t_last - t0)
    res["drain_after_load_s"] = max(0.0, t_last - t_load_end)
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    out: dict[str, Any] = {"runs": [], "loadavg_start": os.getloadavg()}
    for r in range(args.runs):
        name = f"integrand_bench_{uuid.uuid4().hex[:10]}"
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
        try:
            sq = http_bench.e2e_once(64, args.seconds, f"pgs{r}x{int(time.time())}")
            pg = pg_e2e_once(
                f"postgresql://postgres@127.0.0.1:5432/{name}", 64, args.seconds, f"pgp{r}x{int(time.time())}"
            )
        finally:
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        ratio = pg["e2e_eps"] / sq["e2e_eps"]
        print(
            f"run {r + 1}/{args.runs}: sqlite {sq['e2e_eps']:.0f} events/s ({sq['lines']} events), "
            f"postgres {pg['e2e_eps']:.0f} events/s ({pg['lines']} events), ratio {ratio:.2f}; load {os.getloadavg()}",
            flush=True,
        )
        out["runs"].append({"sqlite": sq, "postgres": pg, "ratio": ratio})
    med = {k: statistics.median(run[k]["e2e_eps"] for run in out["runs"]) for k in ("sqlite", "postgres")}
    out["median_eps"] = med
    out["median_ratio"] = statistics.median(run["ratio"] for run in out["runs"])
    print(f"median: sqlite {med['sqlite']:.0f}/s, postgres {med['postgres']:.0f}/s, ratio {out['median_ratio']:.2f}")
    (HERE / "results-pg.json").write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
