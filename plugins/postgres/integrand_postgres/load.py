"""A full load for ``integrand sync --full``: pages COPYed into a session's temporary table, one merge at the end.

The staging table lives on one dedicated connection, so a run that fails or is interrupted
before ``finish`` leaves nothing behind (PostgreSQL drops the table with the session) and the
target is untouched. ``finish`` is one transaction: upsert what changed (versions still never
go backwards, so a newer row the daemon wrote meanwhile stays), then soft- or hard-delete the
target's rows from this source that the listing did not contain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from integrand.connector import Event, PermanentError

from .pg import classify, connect, describe, quote_ident

if TYPE_CHECKING:
    from .sink import PostgresSink


class PgLoad:
    def __init__(self, sink: PostgresSink, con: asyncpg.Connection, source: str):
        self.sink = sink
        self.plan = sink.plan
        self.con = con
        self.source = source
        self.table = quote_ident(f"integrand_load_{self.plan.where.split('.', 1)[1]}")
        self.staged = 0

    @classmethod
    async def begin(cls, sink: PostgresSink, source: str) -> PgLoad:
        await sink._ready()  # the schema check, and the plan bound to the table's types
        con = await connect(sink.config, sink.ctx.base_dir, f"integrand sync {sink.ctx.name}")
        plan = sink.plan
        cols = ", ".join(quote_ident(c) for c in plan.data_cols)
        load = cls(sink, con, source)
        try:
            await con.execute(f"CREATE TEMP TABLE {load.table} AS SELECT {cols} FROM {plan.table} WITH NO DATA")
        except Exception as e:
            await con.close()
            raise classify(e, "creating the staging table") from e
        return load

    async def stage(self, events: Sequence[Event]) -> list[BaseException | None]:
        results: list[BaseException | None] = [None] * len(events)
        rows = self.plan.prepare(events, results)
        records = [v for v, d in zip(rows.values, rows.delete, strict=True) if not d]
        if records:
            try:
                await self.con.copy_records_to_table(
                    self.table.strip('"'), records=records, columns=self.plan.data_cols
                )
            except Exception as e:
                raise classify(e, "staging rows") from e
            self.staged += len(records)
        return results

    async def finish(self, *, delete_missing: bool) -> Any:
        from integrand.sync import LoadCounts

        p, q = self.plan, quote_ident
        keys = ", ".join(q(k) for k in p.key)
        cols = [*p.data_cols]
        tail = []
        if p.loaded_at:
            cols.append(p.loaded_at)
            tail.append("now()")
        if p.deleted_at:
            cols.append(p.deleted_at)
            tail.append("NULL")
        col_list = ", ".join(q(c) for c in cols)
        # What the row holds, to tell "unchanged" from "written": the mapped columns and whether it is deleted.
        compare = [c for c in p.mapped if c not in p.key]
        changed = " OR ".join(f"t.{q(c)} IS DISTINCT FROM excluded.{q(c)}" for c in compare) or "false"
        if p.deleted_at:
            changed += f" OR t.{q(p.deleted_at)} IS NOT NULL"
        guard = f"({changed})"
        if p.version:
            v = q(p.version)
            guard += f" AND (t.{v} IS NULL OR excluded.{v} IS NULL OR excluded.{v} >= t.{v})"
        updates = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in cols if c not in p.key)
        order = f"{keys}" + (f", {q(p.version)} DESC NULLS LAST" if p.version else "")
        merge = (
            f"INSERT INTO {p.table} AS t ({col_list}) "
            f"SELECT {', '.join([*(q(c) for c in p.data_cols), *tail])} FROM "
            f"(SELECT DISTINCT ON ({keys}) * FROM {self.table} ORDER BY {order}) AS s "
            f"ON CONFLICT ({keys}) DO " + (f"UPDATE SET {updates} WHERE {guard}" if updates else "NOTHING")
        )
        missing = (
            f"NOT EXISTS (SELECT 1 FROM {self.table} s WHERE "
            + " AND ".join(f"s.{q(k)} = t.{q(k)}" for k in p.key)
            + ")"
        )
        mine = ""
        args: list[Any] = []
        if p.cfg.metadata.source:
            mine = f" AND t.{q(p.cfg.metadata.source)} = $1"  # only rows this source loaded
            args.append(self.source)
        try:
            async with self.con.transaction():
                distinct = int(
                    await self.con.fetchval(f"SELECT count(*) FROM (SELECT DISTINCT {keys} FROM {self.table}) d")
                )
                status = await self.con.execute(merge)
                written = int(status.split()[-1])
                deleted = 0
                if delete_missing and p.cfg.deletes != "ignore":
                    if p.cfg.deletes == "hard":
                        status = await self.con.execute(f"DELETE FROM {p.table} AS t WHERE {missing}{mine}", *args)
                    else:
                        d = q(p.deleted_at or "")
                        status = await self.con.execute(
                            f"UPDATE {p.table} AS t SET {d} = now() WHERE t.{d} IS NULL AND {missing}{mine}", *args
                        )
                    deleted = int(status.split()[-1])
        except asyncpg.PostgresError as e:
            raise PermanentError(f"{p.where}: the final merge failed, the table is unchanged: {describe(e)}") from e
        except Exception as e:
            raise classify(e, "merging the staged rows (the table is unchanged)") from e
        finally:
            await self.abort()
        return LoadCounts(written=written, unchanged=distinct - written, deleted=deleted)

    async def abort(self) -> None:
        with contextlib.suppress(Exception):
            await self.con.close()  # the temporary table goes with the session
