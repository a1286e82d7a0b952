"""Logical mode's reader alone (issue 14): commit → pgoutput message decoded, no daemon, no store.

    python bench/pg_walreader.py [--rate 1000] [--seconds 3]

A private wal_level=logical server (as the tests start it), one writer connection committing
single-row inserts at ``--rate``, and integrand's WalReader (psycopg2's replication connection in
a thread) + pgoutput Decoder on the same event loop: latency from the writer's commit returning to
the change decoded. What the replication protocol costs before integrand's store sees anything.
"""

# ruff: noqa: ASYNC110 - a benchmark driver waiting out its own deadline

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins" / "postgres" / "tests"))

from integrand_postgres.pgoutput import Decoder
from integrand_postgres.walsender import WalReader
from pg_support import logical_cluster, random_schema


async def main(rate: float, seconds: float) -> None:
    with logical_cluster() as c:
        async with random_schema(c.dsn) as schema:
            con = await schema.connect()
            await con.execute("CREATE TABLE a (id int PRIMARY KEY, v int)")
            await con.execute("CREATE PUBLICATION bench_p FOR TABLE a")
            await con.execute("SELECT pg_create_logical_replication_slot('bench_s', 'pgoutput')")
            reader = WalReader(c.dsn, {}, "bench_s", "bench_p", 0)
            reader.start()
            commits: dict[int, float] = {}
            got: dict[int, float] = {}

            async def consume() -> None:
                d = Decoder()
                while True:
                    msgs = await reader.get(1.0)
                    now = time.time()
                    for _, data in msgs:
                        tx = d.feed(data)
                        for ch in tx.changes if tx else []:
                            got[int((ch.after or {})["id"])] = now

            task = asyncio.create_task(consume())
            w = await asyncpg.connect(schema.dsn)
            st = await w.prepare("INSERT INTO a VALUES ($1, 1)")
            t0 = time.perf_counter()
            for i in range(int(rate * seconds)):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await st.fetch(i)
                commits[i] = time.time()
            deadline = time.monotonic() + 30
            while len(got) < len(commits) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            lat = sorted((got[i] - commits[i]) * 1000 for i in commits if i in got)
            print(
                f"{len(lat):,} of {len(commits):,} changes at {rate:,.0f}/s: commit → decoded p50 {lat[len(lat) // 2]:.1f} ms, "
                f"p99 {lat[int(len(lat) * 0.99)]:.1f} ms, max {lat[-1]:.1f} ms"
            )
            task.cancel()
            await reader.close()
            await w.close()
            await con.execute("SELECT pg_drop_replication_slot('bench_s')")
            await con.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    asyncio.run(main(a.rate, a.seconds))
