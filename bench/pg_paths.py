"""The staged upsert's bound (issue 14): server-side costs of the ways to upsert a batch, beside plain COPY.

    python bench/pg_paths.py [--batch 10000] [--runs 5]

The same 20,000 typed tuples as bench/pg_bench.py's plain COPY, into the same empty table, one
transaction per batch, with no mapping at all: COPY into the target (the ceiling); COPY into the
staging table alone; + a plain INSERT … SELECT (no conflict handling); + the sink's ON CONFLICT
merge; + PostgreSQL 15's MERGE instead; one INSERT … SELECT FROM unnest(arrays) ON CONFLICT; and
executemany of single-row upserts. Medians of the runs, ratio to plain COPY. What no race-safe
staged upsert of this table can beat, whatever the Python side does.
"""

# ruff: noqa: S608 - fixed SQL built from this file's own column names, no input

from __future__ import annotations

import argparse
import asyncio
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

COLS = b.PLAIN_COLS
TYPES = ["bigint", "text", "numeric", "date", "text", "int", "text", "text", "text"]


async def main(batch: int, runs: int) -> None:
    async with random_schema() as schema:
        con = await schema.connect()
        await con.execute(b.TABLE.format(name="t"))
        cl = ", ".join(COLS)
        await con.execute(f"CREATE TEMP TABLE stage ON COMMIT DELETE ROWS AS SELECT {cl} FROM t WITH NO DATA")
        tuples = b.plain_tuples(b.events(20_000))
        chunks = [tuples[i : i + batch] for i in range(0, len(tuples), batch)]
        columns = [list(zip(*c, strict=True)) for c in chunks]
        upd = ", ".join(f"{c} = excluded.{c}" for c in COLS if c != "id")
        guard = " WHERE t.etl_version IS NULL OR excluded.etl_version > t.etl_version"
        conflict = f" ON CONFLICT (id) DO UPDATE SET {upd}, etl_loaded_at = excluded.etl_loaded_at{guard}"
        merge = f"INSERT INTO t AS t ({cl}, etl_loaded_at) SELECT {cl}, now() FROM stage ORDER BY id{conflict}"
        sets = ", ".join(f"{c} = s.{c}" for c in COLS if c != "id")
        pg_merge = (
            "MERGE INTO t USING stage s ON t.id = s.id WHEN MATCHED AND (t.etl_version IS NULL OR "
            f"s.etl_version > t.etl_version) THEN UPDATE SET {sets}, etl_loaded_at = now() WHEN NOT MATCHED THEN "
            f"INSERT ({cl}, etl_loaded_at) VALUES ({', '.join('s.' + c for c in COLS)}, now())"
        )
        arrays = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(TYPES))
        unnest = (
            f"INSERT INTO t AS t ({cl}, etl_loaded_at) SELECT {cl}, now() FROM unnest({arrays}) AS s({cl}){conflict}"
        )

        def staged(sql: str | None) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                for c in chunks:
                    async with con.transaction():
                        await con.copy_records_to_table("stage", records=c, columns=COLS)
                        if sql:
                            await con.execute(sql)

            return run

        async def copy() -> None:
            for c in chunks:
                async with con.transaction():
                    await con.copy_records_to_table("t", records=c, columns=COLS)

        async def arrays_upsert() -> None:
            for cols in columns:
                async with con.transaction():
                    await con.execute(unnest, *cols)

        async def executemany() -> None:
            for c in chunks:
                async with con.transaction():
                    await con.executemany(b.UPSERT.format(t="t"), c)

        ways: dict[str, Callable[[], Awaitable[None]]] = {
            "plain COPY (ceiling)": copy,
            "COPY into the staging table alone": staged(None),
            "+ plain INSERT … SELECT": staged(f"INSERT INTO t ({cl}) SELECT {cl} FROM stage"),
            "+ INSERT … SELECT … ON CONFLICT (the sink's merge)": staged(merge),
            "+ MERGE (not safe against concurrent inserts)": staged(pg_merge),
            "INSERT … SELECT FROM unnest(arrays) ON CONFLICT": arrays_upsert,
            "executemany of single-row upserts": executemany,
        }
        res: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(runs):
            for k, fn in ways.items():
                await con.execute("TRUNCATE t")
                t0 = time.perf_counter()
                await fn()
                res[k].append(len(tuples) / (time.perf_counter() - t0))
        ceiling = res["plain COPY (ceiling)"]
        print(f"batch {batch:,}, {runs} runs: rows/s (median of per-run ratios to plain COPY)")
        for k, v in res.items():
            ratio = statistics.median(x / c for x, c in zip(v, ceiling, strict=True))
            print(f"  {k:52s} {statistics.median(v):10,.0f}  ({ratio:.2f})")
        await con.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    asyncio.run(main(a.batch, a.runs))
