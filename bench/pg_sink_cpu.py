"""The postgres sink's cost in CPU time, client and server apart (issue 14): what a busy machine cannot blur.

    python bench/pg_sink_cpu.py [--batch 10000] [--runs 5]

The same 20,000 invoice events and table as bench/pg_bench.py, one transaction per batch, for:
a plain COPY of pre-built tuples (the ceiling), the sink's ``deliver_batch`` with new keys (the
straight COPY), the same with the straight COPY off (the staged merge), and every row an update
(the same keys again, newer versions, over the full table). For each: this process's CPU time
(mapping, encoding, the driver) and the server backends' CPU time (read from /proc, so the
server must run on this machine), in µs per row, medians of the runs. Wall-clock time depends on
what else the two cores do; CPU time much less.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "plugins" / "postgres" / "tests"))

import pg_bench as b  # noqa: E402
from pg_support import random_schema  # noqa: E402

from integrand.connector import ConnectorContext  # noqa: E402


def cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes so far."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def main(batch: int, runs: int) -> None:
    from integrand_postgres import PostgresSink
    from integrand_postgres.sink import DirectCopy, PostgresSinkConfig

    async with random_schema() as schema:
        con = await schema.connect()
        await con.execute(b.TABLE.format(name="t"))
        cfg = PostgresSinkConfig.model_validate(
            {"dsn": schema.dsn, "table": "t", "key": "id", "columns": b.COLUMNS, "pool_max": 1}
        )
        sink = PostgresSink(cfg, ConnectorContext(name="bench", role="sink", base_dir=b.ROOT, state=b._State()))
        await sink.start()
        assert sink.pool is not None
        async with sink.pool.acquire() as pc:
            sink_pid = int(await pc.fetchval("SELECT pg_backend_pid()"))
        own_pid = int(await con.fetchval("SELECT pg_backend_pid()"))
        evs = b.events(20_000)
        chunks = [evs[i : i + batch] for i in range(0, len(evs), batch)]
        newer = [[dataclasses.replace(e, version=(e.version or "") + ".5") for e in c] for c in chunks]
        tchunks = [b.plain_tuples(c) for c in chunks]

        async def plain() -> None:
            for c in tchunks:
                async with con.transaction():
                    await con.copy_records_to_table("t", records=c, columns=b.PLAIN_COLS)

        def deliver(cs: list[list[b.Event]], direct: bool) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                sink.plan.direct = direct
                sink.direct = DirectCopy()
                for c in cs:
                    assert all(r is None for r in await sink.deliver_batch(c))

            return run

        ways: dict[str, tuple[Callable[[], Awaitable[None]], int, bool]] = {
            "plain COPY (ceiling)": (plain, own_pid, True),
            "deliver_batch, new keys (straight COPY)": (deliver(chunks, True), sink_pid, True),
            "deliver_batch, new keys, staged merge only": (deliver(chunks, False), sink_pid, True),
            "deliver_batch, every row an update": (deliver(newer, True), sink_pid, False),
        }
        res: dict[str, dict[str, list[float]]] = {k: {"client": [], "server": [], "wall": []} for k in ways}
        for _ in range(runs):
            for k, (fn, pid, fresh) in ways.items():
                if fresh:
                    await con.execute("TRUNCATE t")
                else:  # the rows as the new-keys pass left them
                    await con.execute("TRUNCATE t")
                    await deliver(chunks, True)()
                c0, s0, t0 = time.process_time(), cpu_of([pid]), time.perf_counter()
                await fn()
                n = len(evs)
                res[k]["client"].append((time.process_time() - c0) * 1e6 / n)
                res[k]["server"].append((cpu_of([pid]) - s0) * 1e6 / n)
                res[k]["wall"].append((time.perf_counter() - t0) * 1e6 / n)
        await sink.close()
        await con.close()
        print(
            f"batch {batch:,}, {runs} runs, load {os.getloadavg()[0]:.1f}: µs per row (median) client CPU + server CPU"
        )
        for k, v in res.items():
            c, s, w = (statistics.median(v[x]) for x in ("client", "server", "wall"))
            print(f"  {k:44s} client {c:6.2f}  server {s:6.2f}  sum {c + s:6.2f}   (wall {w:6.2f})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    asyncio.run(main(a.batch, a.runs))
