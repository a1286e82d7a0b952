"""Where the postgres sink's time goes (issue 14): one batch's phases, timed one by one, beside plain COPY.

    python bench/pg_sink_phases.py [--batch 10000] [--runs 5]

The same 20,000 invoice events and table as bench/pg_bench.py, one transaction per batch. For the
shipped sink (``PostgresSink.deliver_batch``) it times, per batch: the mapping (``Plan.prepare``,
wall and process CPU time), one row per key in key order (``_newest_per_key``), and on the
database side BEGIN, the COPY into the staging table, the merge and the COMMIT (the staged way),
then the straight COPY into the table and its COMMIT (new keys), each as its own round trip;
beside them the whole ``deliver_batch`` and a plain COPY of pre-built tuples. Medians
of the runs, in ms per 1,000 rows, so batch sizes compare.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "plugins" / "postgres" / "tests"))

import pg_bench as b  # noqa: E402
from pg_support import random_schema  # noqa: E402

from integrand.connector import ConnectorContext  # noqa: E402


async def main(batch: int, runs: int) -> None:
    from integrand_postgres import PostgresSink
    from integrand_postgres.sink import PostgresSinkConfig, _newest_per_key

    async with random_schema() as schema:
        con = await schema.connect()
        await con.execute(b.TABLE.format(name="t"))
        cfg = PostgresSinkConfig.model_validate({"dsn": schema.dsn, "table": "t", "key": "id", "columns": b.COLUMNS})
        sink = PostgresSink(cfg, ConnectorContext(name="bench", role="sink", base_dir=b.ROOT, state=b._State()))
        await sink.start()
        plan = sink.plan
        evs = b.events(20_000)
        chunks = [evs[i : i + batch] for i in range(0, len(evs), batch)]
        tuples = b.plain_tuples(evs)
        tchunks = [tuples[i : i + batch] for i in range(0, len(tuples), batch)]
        res: dict[str, list[float]] = {}

        def add(k: str, seconds: float, rows: int) -> None:
            res.setdefault(k, []).append(seconds * 1000 / rows * 1000)

        assert sink.pool is not None
        try:
            for _ in range(runs):
                await con.execute("TRUNCATE t")
                t0 = time.perf_counter()
                for c in tchunks:
                    async with con.transaction():
                        await con.copy_records_to_table("t", records=c, columns=b.PLAIN_COLS)
                add("plain COPY, whole", time.perf_counter() - t0, len(tuples))

                await con.execute("TRUNCATE t")
                t0 = time.perf_counter()
                for c in chunks:
                    assert all(r is None for r in await sink.deliver_batch(c))
                add("integrand deliver_batch, whole", time.perf_counter() - t0, len(evs))

                await con.execute("TRUNCATE t")
                phases: dict[str, float] = {}

                def tick(k: str, started: float, phases: dict[str, float] = phases) -> float:
                    now = time.perf_counter()
                    phases[k] = phases.get(k, 0.0) + now - started
                    return now

                for c in chunks:
                    t = time.perf_counter()
                    c0 = time.process_time()
                    rows = plan.prepare(c, [None] * len(c))
                    phases["mapping CPU (process time)"] = (
                        phases.get("mapping CPU (process time)", 0.0) + time.process_time() - c0
                    )
                    t = tick("mapping (Plan.prepare)", t)
                    ups: list[Any] = _newest_per_key(rows.values, plan)
                    t = tick("one row per key, in key order", t)
                    async with sink.pool.acquire() as pc:
                        if not pc.staged():  # type: ignore[attr-defined]
                            await pc.execute(plan.create_stage_sql)
                            pc.mark_staged()  # type: ignore[attr-defined]
                        t = tick("pool acquire", time.perf_counter())
                        tr = pc.transaction()
                        await tr.start()
                        t = tick("BEGIN", t)
                        await pc.copy_records_to_table(plan.stage_name, records=ups, columns=plan.data_cols)
                        t = tick("staged: COPY into the staging table", t)
                        await pc.execute(plan.merge_sql)
                        t = tick("staged: merge (INSERT … SELECT … ON CONFLICT)", t)
                        await tr.commit()
                        t = tick("staged: COMMIT", t)
                await con.execute("TRUNCATE t")
                for c in chunks:
                    ups = _newest_per_key(plan.prepare(c, [None] * len(c)).values, plan)
                    async with sink.pool.acquire() as pc:
                        tr = pc.transaction()
                        await tr.start()
                        t = time.perf_counter()
                        await pc.copy_records_to_table(
                            plan.rel_name, schema_name=plan.schema_name, records=ups, columns=plan.data_cols
                        )
                        t = tick("straight: COPY into the table", t)
                        await tr.commit()
                        t = tick("straight: COMMIT", t)
                for k, v in phases.items():
                    add(k, v, len(evs))
        finally:
            await sink.close()
            await con.close()
        print(f"batch {batch:,}, {runs} runs: ms per 1,000 rows (median)")
        for k, v in res.items():
            print(f"  {k:44s} {statistics.median(v):8.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    asyncio.run(main(a.batch, a.runs))
