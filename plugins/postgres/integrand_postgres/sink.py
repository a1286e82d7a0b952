"""The ``postgres`` sink: events into a table (ETL), with versions that never go backwards.

One batch is one transaction. A batch of at least ``copy_min_rows`` rows is COPYed into a
temporary staging table and merged with one ``INSERT … SELECT … ON CONFLICT (key) DO UPDATE
… WHERE excluded.version > t.version``; a smaller one is an ``executemany`` of the same
upsert. Both write the same rows. When the database refuses a row (a constraint, a bad
value), the batch is rolled back and split in halves until the row is found; it alone is
dead-lettered with PostgreSQL's message, the rest are written.

New rows take a shorter way: a COPY batch is first COPYed straight into the table, which the
unique key refuses as soon as one of its keys is there already (or being inserted by someone
else: the COPY waits for that transaction and fails if it commits). Then the transaction is
rolled back and the batch takes the staged merge, which compares versions; so the result is the
merge's, whichever way it went. A batch of new keys costs one COPY (the merge's speculative
insertion costs about as much again); after a refused one the straight COPY is skipped for a
while (1, 2, 4 … 64 batches), so a stream of updates pays for a refused COPY only now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from operator import itemgetter
from typing import Annotated, Any, ClassVar, Literal

import asyncpg
from pydantic import BeforeValidator, Field, field_validator, model_validator

from integrand.connector import AuthError, Connector, ConnectorConfig, Event, PermanentError, RetryableError, Sink
from integrand.errors import ConfigError
from integrand.routes import CONVERSIONS, FieldMapping, FieldSpec, FieldSpecIn, MappingError, dig

from . import columns as bulkcols
from .pg import (
    ConnectionConfig,
    classify,
    connect,
    create_pool,
    describe,
    is_connection_error,
    is_row_error,
    qualified,
    quote_ident,
)
from .schema import TEXT_TYPES, TIME_TYPES, TableInfo, ValueRejected, converter, create_table_sql, inspect


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class MetadataColumns(ConnectorConfig):
    """Names of the ETL metadata columns; an empty string leaves that column out."""

    loaded_at: str = "etl_loaded_at"
    source: str = "etl_source"
    version: str = "etl_version"
    event_id: str = "etl_event_id"


class PostgresSinkConfig(ConnectionConfig):
    table: str = Field(min_length=1)
    key: Annotated[list[str], BeforeValidator(_as_list)] = Field(min_length=1)
    # Column → where its value comes from, in the route mapping's syntax (a dotted path, or a table
    # with path / const / template, convert, lookup, default, required).
    columns: dict[str, FieldSpecIn] = Field(min_length=1)
    lookups: dict[str, dict[str, Any]] = {}
    # The column that orders writes (an older value never overwrites a newer one); default: metadata.version.
    version_column: str | None = None
    metadata: MetadataColumns = MetadataColumns()
    deletes: Literal["soft", "hard", "ignore"] = "soft"
    deleted_at: str = "deleted_at"
    # Event types (globs) that mean "this record was deleted".
    delete_types: list[str] = ["*.deleted", "*.deleted.*"]
    # Batches of at least this many rows go through COPY and a staging table; smaller ones through executemany.
    copy_min_rows: int = Field(default=100, ge=1)
    # SQL types for `integrand postgres schema` (what the CREATE TABLE would say); the sink reads the real ones.
    column_types: dict[str, str] = {}

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        if v.count(".") > 1 or v.startswith(".") or v.endswith("."):
            raise ValueError("expected 'table' or 'schema.table'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PostgresSinkConfig:
        for k in self.key:
            if k not in self.columns:
                raise ValueError(f"key: column {k!r} is not in columns (a key column needs a value)")
        meta = [c for c in self.metadata.model_dump().values() if c]
        for c in meta:
            if c in self.columns:
                raise ValueError(f"columns.{c}: {c!r} is a metadata column, filled by the sink")
        v = self.version_column
        if v is not None and v not in self.columns and (v != self.metadata.version or not self.metadata.version):
            raise ValueError(f"version_column: {v!r} is neither in columns nor the metadata version column")
        if self.deletes == "soft" and (self.deleted_at in self.columns or self.deleted_at in meta):
            raise ValueError(f"deleted_at: {self.deleted_at!r} is also a mapped or metadata column")
        for c, f in self.columns.items():
            if f.lookup is not None and f.lookup not in self.lookups:
                raise ValueError(f"columns.{c}.lookup: no lookup table {f.lookup!r}")
        for c in self.column_types:
            if c not in self.columns:
                raise ValueError(f"column_types.{c}: not in columns")
        return self

    @property
    def version(self) -> str | None:
        return self.version_column or (self.metadata.version or None)


_CONVERT_TYPES = {
    "int": "bigint",
    "epoch_ms": "bigint",
    "float": "double precision",
    "number": "numeric",
    "bool": "boolean",
    "date": "date",
    "datetime": "timestamptz",
}


@dataclass(frozen=True)
class Row:
    index: int
    delete: bool
    values: tuple[Any, ...]
    event: Event


@dataclass
class Rows:
    """A batch's rows as parallel lists (no object per row): the event's place in the batch, delete or not, values."""

    index: list[int]
    delete: list[bool]
    values: list[tuple[Any, ...]]

    def __len__(self) -> int:
        return len(self.index)

    def halves(self) -> tuple[Rows, Rows]:
        m = len(self.index) // 2
        return (
            Rows(self.index[:m], self.delete[:m], self.values[:m]),
            Rows(self.index[m:], self.delete[m:], self.values[m:]),
        )

    @classmethod
    def of(cls, rows: Sequence[Row]) -> Rows:
        return cls([r.index for r in rows], [r.delete for r in rows], [r.values for r in rows])


class Plan:
    """The columns a sink writes and how an event becomes a row; SQL is made once the table's types are known."""

    def __init__(self, cfg: PostgresSinkConfig, where: str):
        self.cfg = cfg
        self.where = where
        self.table = qualified(cfg.table)
        meta = cfg.metadata
        self.mapped = list(cfg.columns)
        self.meta_cols = [(c, attr) for attr, c in (("source", meta.source), ("version", meta.version)) if c]
        if meta.event_id:
            self.meta_cols.append((meta.event_id, "id"))
        self.data_cols = self.mapped + [c for c, _ in self.meta_cols]
        self.key = list(cfg.key)
        self.version = cfg.version
        self.loaded_at = meta.loaded_at or None
        self.deleted_at = cfg.deleted_at if cfg.deletes == "soft" else None
        # A column that is a bare path with conversions is read with the mapping engine's own dig() and
        # CONVERSIONS, per column; the rest (templates, lookups, defaults, required) go through FieldMapping.
        self.simple = {c: f for c, f in cfg.columns.items() if _is_simple(f)}
        rest = {c: f for c, f in cfg.columns.items() if c not in self.simple}
        self.mapping = FieldMapping(rest, cfg.lookups) if rest else None
        # A delete carries the record's identity, maybe not its fields: map only the key and the version.
        ident = [c for c in rest if c in self.key or c == self.version]
        self.delete_mapping = FieldMapping({c: cfg.columns[c] for c in ident}, cfg.lookups) if ident else None
        self.delete_simple = {c: f for c, f in self.simple.items() if c in self.key or c == self.version}
        self._deletes: dict[str, bool] = {}  # event type → whether it means a delete (globs, matched once)
        self.converters: list[Callable[[Any], Any] | None] = [None] * len(self.data_cols)

    # --- the table the sink needs ------------------------------------------------------------------

    def wanted_types(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for c, f in self.cfg.columns.items():
            t = self.cfg.column_types.get(c)
            if t is None:
                t = next((_CONVERT_TYPES[n] for n in reversed(f.convert) if n in _CONVERT_TYPES), "text")
            out[c] = t + (" NOT NULL" if c in self.key else "")
        meta = self.cfg.metadata
        for c, _attr in self.meta_cols:
            out[c] = "text"
        if self.loaded_at:
            out[self.loaded_at] = "timestamptz NOT NULL DEFAULT now()"
        if self.deleted_at:
            out[self.deleted_at] = "timestamptz"
        del meta
        return out

    def create_table(self) -> str:
        return create_table_sql(self.cfg.table, self.wanted_types(), self.key, f"what {self.where} writes")

    def check(self, info: TableInfo | None) -> list[str]:
        """Every way the table differs from what the sink writes, as ``key.path: message`` lines."""
        cfg, where = self.cfg, self.where
        if info is None:
            return [
                f"{where}.table: table {cfg.table} does not exist "
                f"(`integrand postgres schema {where.split('.', 1)[1]}` prints a CREATE TABLE for it)"
            ]
        problems: list[str] = []

        def need(col: str, key_path: str, kinds: frozenset[str] | None = None, what: str = "") -> None:
            c = info.columns.get(col)
            if c is None:
                problems.append(f'{where}.{key_path}: column "{col}" does not exist in table {info.name}')
            elif kinds is not None and c.base_type not in kinds:
                problems.append(f"{where}.{key_path}: column {col} of {info.name} is {c.display}; expected {what}")
            elif converter(c) is None:
                problems.append(f"{where}.{key_path}: column {col} of {info.name} has type {c.display}, not supported")

        for c in self.mapped:
            need(c, f"columns.{c}")
        meta = cfg.metadata
        if meta.loaded_at:
            need(meta.loaded_at, "metadata.loaded_at", TIME_TYPES, "timestamptz or timestamp")
        if meta.source:
            need(meta.source, "metadata.source", TEXT_TYPES, "a text type")
        if meta.event_id:
            need(meta.event_id, "metadata.event_id", TEXT_TYPES, "a text type")
        if meta.version:
            need(meta.version, "metadata.version")
        if self.deleted_at:
            need(self.deleted_at, "deleted_at", TIME_TYPES, "timestamptz or timestamp (deletes = 'soft')")
        if frozenset(self.key) not in info.unique_keys and all(k in info.columns for k in self.key):
            problems.append(
                f"{where}.key: {info.name} has no primary key or unique index on exactly "
                f"({', '.join(self.key)}); ON CONFLICT needs one"
            )
        written = set(self.data_cols) | {c for c in (self.loaded_at, self.deleted_at) if c}
        for col in info.columns.values():
            if col.not_null and not col.has_default and col.name not in written:
                problems.append(
                    f"{where}.columns: column {col.name} of {info.name} is NOT NULL without a default "
                    "and not mapped, so every insert would fail"
                )
        privs = {"SELECT", "INSERT", "UPDATE"} | ({"DELETE"} if cfg.deletes == "hard" else set())
        missing = sorted(privs - info.privileges)
        if missing:
            problems.append(f"{where}.dsn: the role lacks {', '.join(missing)} on {info.name}")
        return problems

    def bind(self, info: TableInfo) -> None:
        """Fix the converters and SQL for the table as it is (call after ``check`` found nothing)."""
        self.table = qualified(info.name)  # as found on the search_path when the config left the schema out
        self.types = {c: info.columns[c].display for c in self.data_cols}
        self.converters = [converter(info.columns[c]) for c in self.data_cols]
        self._compile()
        self._compile_bulk(info)
        q = quote_ident
        cols = [*self.data_cols]
        tail_vals = []
        if self.loaded_at:
            cols.append(self.loaded_at)
            tail_vals.append("now()")
        if self.deleted_at:
            cols.append(self.deleted_at)
            tail_vals.append("NULL")
        col_list = ", ".join(q(c) for c in cols)
        updates = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in cols if c not in self.key)
        guard = ""
        if self.version:
            v = q(self.version)
            guard = f" WHERE t.{v} IS NULL OR excluded.{v} > t.{v}"
        conflict = f" ON CONFLICT ({', '.join(q(k) for k in self.key)}) DO " + (
            f"UPDATE SET {updates}{guard}" if updates else "NOTHING"
        )
        params = ", ".join(f"${i + 1}::{self.types[c]}" for i, c in enumerate(self.data_cols))
        self.upsert_sql = f"INSERT INTO {self.table} AS t ({col_list}) VALUES ({', '.join([params, *tail_vals])})"
        self.upsert_sql += conflict
        # The straight COPY (new keys) writes the data columns only: it must then leave the table as the merge
        # would, so the load time must default to the transaction's now() and deleted_at to NULL.
        self.direct = (
            bool(info.schema and info.relname)
            and (not self.loaded_at or info.columns[self.loaded_at].default in _NOW)
            and (not self.deleted_at or not info.columns[self.deleted_at].has_default)
        )
        self.schema_name, self.rel_name = info.schema, info.relname
        self.stage_name = f"integrand_stage_{self.where.split('.', 1)[1]}"
        self.stage = q(self.stage_name)
        stage_cols = ", ".join(q(c) for c in self.data_cols)
        self.create_stage_sql = (
            f"CREATE TEMP TABLE IF NOT EXISTS {self.stage} ON COMMIT DELETE ROWS AS "
            f"SELECT {stage_cols} FROM {self.table} WITH NO DATA"
        )
        self.merge_sql = (
            f"INSERT INTO {self.table} AS t ({col_list}) SELECT {', '.join([stage_cols, *tail_vals])} "
            f"FROM {self.stage} ORDER BY {', '.join(q(k) for k in self.key)}{conflict}"
        )
        # Deletes: by key, never undoing a newer version; a delete without a version applies. Their
        # parameters are the key, the version and the metadata columns, in ``delete_idx`` order.
        wanted = [*self.key]
        if self.version and self.version not in wanted:
            wanted.append(self.version)
        if self.cfg.deletes == "soft":
            wanted += [c for c, _ in self.meta_cols if c not in wanted]
        self.delete_idx = [self.data_cols.index(c) for c in wanted]
        self._kidx = [self.data_cols.index(k) for k in self.key]
        self._key_of = itemgetter(*self._kidx)

        def p(c: str) -> str:
            return f"${wanted.index(c) + 1}::{self.types[c]}"

        cond = " AND ".join(f"t.{q(k)} = {p(k)}" for k in self.key)
        if self.version:
            v = q(self.version)
            cond += f" AND ({p(self.version)} IS NULL OR t.{v} IS NULL OR t.{v} <= {p(self.version)})"
        if self.cfg.deletes == "hard":
            self.delete_sql = f"DELETE FROM {self.table} AS t WHERE {cond}"
        else:
            d = q(self.deleted_at or "")
            sets = [f"{d} = coalesce(t.{d}, now())"]
            if self.loaded_at:
                sets.append(f"{q(self.loaded_at)} = now()")
            sets += [f"{q(c)} = coalesce({p(c)}, t.{q(c)})" for c in wanted if c not in self.key]
            self.delete_sql = f"UPDATE {self.table} AS t SET {', '.join(sets)} WHERE {cond}"

    # --- rows ------------------------------------------------------------------------------------

    def upsert_order(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(values[i] for i in self._kidx)

    def delete_order(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        return values[: len(self.key)]

    def is_delete(self, event: Event) -> bool:
        found = self._deletes.get(event.type)
        if found is None:
            found = self._deletes[event.type] = any(fnmatchcase(event.type, p) for p in self.cfg.delete_types)
        return found

    def _compile(self) -> None:
        """One function per column (event, FieldMapping output) → its typed value: the row loop does nothing else."""
        self._fns: list[Callable[[Event, dict[str, Any]], Any]] = []
        self._delete_fns: list[Callable[[Event, dict[str, Any]], Any]] = []
        ident = {*self.key, self.version}
        for i, col in enumerate(self.data_cols):
            tconv = self.converters[i]
            where = f"{self.where}.columns.{col}" if col in self.cfg.columns else f"{self.where}.metadata"
            f = self.simple.get(col)
            if f is not None:
                fn = _path_column(col, f, tconv, where, self.types[col])
            elif col in self.cfg.columns:
                fn = _mapped_column(col, tconv, where, self.types[col])
            else:
                attr = dict(self.meta_cols)[col]
                fn = _meta_column(attr, tconv, where, col, self.types[col])
            self._fns.append(fn)
            self._delete_fns.append(fn if col in ident or col not in self.cfg.columns else _none)

    def _compile_bulk(self, info: TableInfo) -> None:
        """Per column: how to read its raw values for a whole batch, and the bulk conversion (columns.py)."""
        self._bulk: list[tuple[_Read, bulkcols.Bulk]] = []
        for i, col in enumerate(self.data_cols):
            tconv = self.converters[i]
            base = info.columns[col].base_type if info.columns[col].type_kind != "e" else "enum"
            f = self.simple.get(col)
            read: _Read
            if f is not None:
                read = _read_path(bulkcols.read_path(f.path or ""))
                slow = bulkcols.chain(f.convert, tconv, empty_is_null=True)
                fast = bulkcols.bulk(base, f.convert, slow, empty_is_null=True)
            elif col in self.cfg.columns:
                read = _read_mapped(col)
                slow = bulkcols.chain((), tconv, empty_is_null=False)
                fast = bulkcols.bulk(base, (), slow, empty_is_null=False)
            else:
                read = _read_path(bulkcols.read_attr(dict(self.meta_cols)[col]))
                slow = bulkcols.chain((), tconv, empty_is_null=False)
                fast = bulkcols.bulk(base, (), slow, empty_is_null=False)
            self._bulk.append((read, fast))

    def prepare(self, events: Sequence[Event], results: list[BaseException | None]) -> Rows:
        """The batch's rows, converted column by column; an event whose row cannot be made gets its error in
        ``results`` (exactly the error ``row`` gives) and no row. Deletes take the per-row way (they are few)."""
        n = len(events)
        flags = [self.is_delete(e) for e in events]
        if True in flags:
            ups = [i for i in range(n) if not flags[i]]
            evs: Sequence[Event] = [events[i] for i in ups]
        else:
            ups, evs = list(range(n)), events
        errors: dict[int, BaseException] = {}
        outs: list[dict[str, Any]] | None = None
        if self.mapping is not None and evs:
            outs = []
            for j, e in enumerate(evs):
                try:
                    outs.append(self.mapping.apply(e))
                except MappingError as ex:
                    errors[j] = ex
                    outs.append(_EMPTY)
        cols: list[list[Any]] = []
        for ci, (read, fast) in enumerate(self._bulk):
            try:
                vals = fast(read(evs, outs))
            except Exception:
                vals = self._column_by_row(ci, evs, outs, errors)  # the exact errors, row by row
            cols.append(vals)
        for ki in self._kidx:
            if None in cols[ki]:
                k = self.data_cols[ki]
                for j, v in enumerate(cols[ki]):
                    if v is None and j not in errors:
                        errors[j] = PermanentError(
                            f"{self.where}.columns.{k}: key column {k} is empty for event {evs[j].id}"
                        )
        values: list[tuple[Any, ...]] = list(zip(*cols, strict=True)) if cols else [()] * len(evs)
        if errors:
            keep = [j for j in range(len(evs)) if j not in errors]
            for j, err in errors.items():
                results[ups[j]] = err
            rows = Rows([ups[j] for j in keep], [False] * len(keep), [values[j] for j in keep])
        else:
            rows = Rows(ups, [False] * len(ups), values)
        if len(ups) < n:
            for i in range(n):
                if flags[i]:
                    try:
                        r = self.row(i, events[i])
                    except PermanentError as ex:
                        results[i] = ex
                        continue
                    if r is not None:
                        rows.index.append(i)
                        rows.delete.append(True)
                        rows.values.append(r.values)
        return rows

    def _column_by_row(
        self, ci: int, evs: Sequence[Event], outs: list[dict[str, Any]] | None, errors: dict[int, BaseException]
    ) -> list[Any]:
        fn = self._fns[ci]
        vals: list[Any] = []
        for j, e in enumerate(evs):
            if j in errors:
                vals.append(None)
                continue
            try:
                vals.append(fn(e, outs[j] if outs is not None else _EMPTY))
            except PermanentError as ex:
                errors[j] = ex
                vals.append(None)
        return vals

    def row(self, index: int, event: Event) -> Row | None:
        """The row for ``event`` in ``data_cols`` order, converted to the column types; None if it is ignored."""
        delete = self.is_delete(event)
        if delete and self.cfg.deletes == "ignore":
            return None
        mapping = self.delete_mapping if delete else self.mapping
        out = mapping.apply(event) if mapping is not None else _EMPTY
        values = tuple([fn(event, out) for fn in (self._delete_fns if delete else self._fns)])
        for i in self._kidx:
            if values[i] is None:
                k = self.data_cols[i]
                raise PermanentError(f"{self.where}.columns.{k}: key column {k} is empty for event {event.id}")
        return Row(index, delete, values, event)


class PostgresSink(Connector[PostgresSinkConfig], Sink):
    """Load events into one PostgreSQL table."""

    Config = PostgresSinkConfig
    batch_size: ClassVar[int] = 1000

    def __init__(self, config: PostgresSinkConfig, ctx: Any):
        super().__init__(config, ctx)
        self.plan = Plan(config, f"sinks.{ctx.name}")
        self.pool: asyncpg.Pool | None = None
        self._ready_lock = asyncio.Lock()
        self.info: TableInfo | None = None
        self.direct = DirectCopy()

    @property
    def app_name(self) -> str:
        return f"integrand sink {self.ctx.name}"

    async def start(self) -> None:
        try:
            await self._ready()
        except (RetryableError, PermanentError, AuthError) as e:
            # Down (or refusing us) at startup is like any other time: deliveries wait, retry or dead-letter
            # with the reason; only a table that does not fit the config stops the daemon (ConfigError).
            self.log.warning(
                "%s: PostgreSQL not usable yet (%s); the table is checked on first delivery", self.plan.where, e
            )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def check_table(self, con: asyncpg.Connection) -> list[str]:
        self.info = await inspect(con, self.config.table)
        return self.plan.check(self.info)

    async def _ready(self) -> asyncpg.Pool:
        if self.pool is not None:
            return self.pool
        async with self._ready_lock:
            if self.pool is not None:
                return self.pool
            con = await connect(self.config, self.ctx.base_dir, self.app_name)
            try:
                problems = await self.check_table(con)
            except Exception as e:
                raise classify(e, "reading the table's schema") from e
            finally:
                with contextlib.suppress(Exception):
                    await con.close()
            if problems:
                raise ConfigError(problems)
            assert self.info is not None
            self.plan.bind(self.info)
            self.pool = await create_pool(
                self.config, self.ctx.base_dir, self.app_name, connection_class=StagingConnection
            )
            return self.pool

    async def begin_load(self, source: str) -> Any:
        """A full load for ``integrand sync --full`` (integrand.sync's BulkLoadSink): staged, merged at the end."""
        from .load import PgLoad

        return await PgLoad.begin(self, source)

    async def deliver(self, event: Event) -> None:
        [res] = await self.deliver_batch([event])
        if res is not None:
            raise res

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        results: list[BaseException | None] = [None] * len(events)
        try:
            await self._ready()
        except ConfigError as e:
            # The table changed under a running daemon: an outage until someone fixes it, not bad data.
            err = RetryableError("; ".join(e.problems))
            self.log.error("%s", err)
            return [err] * len(events)
        except Exception as e:
            return [classify(e, "connecting")] * len(events)
        rows = self.plan.prepare(events, results)
        await self._write_split(rows, results, events)
        return results

    async def _write_split(self, rows: Rows, results: list[BaseException | None], events: Sequence[Event]) -> None:
        """Write ``rows`` in one transaction; on a refused row, halve until it is alone and dead-letter it."""
        if not rows:
            return
        try:
            await self._write_retrying(rows)
        except Exception as e:
            if is_row_error(e) and len(rows) > 1:
                first, second = rows.halves()
                await self._write_split(first, results, events)
                await self._write_split(second, results, events)
                return
            if isinstance(e, asyncpg.PostgresError) and is_row_error(e):
                err: Exception = PermanentError(
                    f"{self.plan.where}: PostgreSQL refused the row for event {events[rows.index[0]].id}: {describe(e)}"
                )
            else:
                err = classify(e, f"{self.plan.where}: writing {len(rows)} row(s) to {self.config.table}")
            for i in rows.index:
                results[i] = err

    async def _write_retrying(self, rows: Rows) -> None:
        """One immediate retry on a lost connection (a pooled connection killed or failed over while idle) or a deadlock."""
        try:
            await self.write(rows)
        except Exception as e:
            if not is_connection_error(e):
                raise
            self.log.warning("%s: transient failure while writing (%s); retrying once", self.plan.where, e)
            await self.write(rows)

    async def write(self, rows: Rows | Sequence[Row], force: Literal["copy", "executemany"] | None = None) -> None:
        """One transaction: the upserts (COPY straight in for new keys, else COPY + merge, or executemany), then
        the deletes."""
        if not isinstance(rows, Rows):
            rows = Rows.of(rows)
        pool = await self._ready()
        plan = self.plan
        if True in rows.delete:
            upserts = _newest_per_key([v for v, d in zip(rows.values, rows.delete, strict=True) if not d], plan)
            deletes = sorted(
                (tuple(v[i] for i in plan.delete_idx) for v, d in zip(rows.values, rows.delete, strict=True) if d),
                key=plan.delete_order,
            )
        else:
            upserts, deletes = _newest_per_key(rows.values, plan), []
        path = force or ("copy" if len(upserts) >= self.config.copy_min_rows else "executemany")
        async with pool.acquire() as con:
            if path == "copy" and upserts and plan.direct and self.direct.now():
                try:
                    async with con.transaction():
                        await con.copy_records_to_table(
                            plan.rel_name, schema_name=plan.schema_name, records=upserts, columns=plan.data_cols
                        )
                        if deletes:
                            await con.executemany(plan.delete_sql, deletes)
                except asyncpg.UniqueViolationError:
                    self.direct.refused()  # a key is there (or being inserted): the merge decides, by version
                except asyncpg.FeatureNotSupportedError:
                    plan.direct = False  # e.g. COPY into a table with row-level security
                else:
                    self.direct.worked()
                    return
            created = False
            async with con.transaction():
                if upserts and path == "copy":
                    # The staging table is created once per session and kept (ON COMMIT DELETE ROWS empties it).
                    if not con.staged():  # type: ignore[attr-defined]
                        await con.execute(plan.create_stage_sql)
                        created = True
                    await con.copy_records_to_table(plan.stage_name, records=upserts, columns=plan.data_cols)
                    await con.execute(plan.merge_sql)
                elif upserts:
                    await con.executemany(plan.upsert_sql, upserts)
                if deletes:
                    await con.executemany(plan.delete_sql, deletes)
            if created:  # only once committed: a rolled-back CREATE left no table
                con.mark_staged()  # type: ignore[attr-defined]


_NOW = frozenset({"now()", "CURRENT_TIMESTAMP", "transaction_timestamp()"})  # what the merge's now() writes


class DirectCopy:
    """When to try the straight COPY of a batch into the table: always while batches are new rows; after one
    was refused (a key already there), not for the next 1, 2, 4 … 64 batches, so updates rarely pay for it."""

    MAX_SKIP = 64

    def __init__(self) -> None:
        self.skip = 0  # batches left to send straight to the merge
        self.backoff = 0  # how many the last refusal set
        self.tried = self.refusals = 0

    def now(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return False
        self.tried += 1
        return True

    def refused(self) -> None:
        self.refusals += 1
        self.backoff = min(self.MAX_SKIP, max(1, 2 * self.backoff))
        self.skip = self.backoff

    def worked(self) -> None:
        self.backoff = 0


class StagingConnection(asyncpg.Connection):
    """A pooled session that remembers whether it already holds the sink's staging table (a temp table lives as
    long as its session; asyncpg's pool does not DISCARD them)."""

    _integrand_staged = False

    def staged(self) -> bool:
        return self._integrand_staged

    def mark_staged(self) -> None:
        self._integrand_staged = True


_EMPTY: dict[str, Any] = {}
# A column's raw values for a batch: (the events, the FieldMapping outputs if any) → one value per event.
_Read = Callable[[Sequence[Event], "list[dict[str, Any]] | None"], list[Any]]


def _read_path(read: Callable[[Sequence[Event]], list[Any]]) -> _Read:
    return lambda evs, outs: read(evs)


def _read_mapped(col: str) -> _Read:
    return lambda evs, outs: [o.get(col) for o in outs or ()]


_FIELDS = bulkcols.FIELDS
_Convert = Callable[[Any], Any] | None


def _none(event: Event, out: dict[str, Any]) -> Any:
    return None


def _stored(v: Any, tconv: _Convert, where: str, col: str, sql_type: str, event: Event) -> Any:
    if v is None or tconv is None:
        return v
    try:
        return tconv(v)
    except (ValueRejected, ValueError, TypeError, OverflowError) as e:
        raise PermanentError(
            f"{where}: cannot store {v!r} in column {col} ({sql_type}) for event {event.id}: {e}"
        ) from None


def _path_column(col: str, f: FieldSpec, tconv: _Convert, where: str, sql_type: str) -> Callable[..., Any]:
    """A bare path with conversions, read as the mapping engine reads it (``dig``, ``CONVERSIONS``), inlined for
    the common case of nested objects: it runs once per column per row."""
    head, *rest = (f.path or "").split(".")
    convs = [(name, CONVERSIONS[name]) for name in f.convert]
    known = head in _FIELDS

    def get(event: Event, out: dict[str, Any]) -> Any:
        v: Any = getattr(event, head) if known else None
        for i, p in enumerate(rest):
            if type(v) is dict:
                v = v.get(p)
            elif v is not None:
                v = dig(v, ".".join(rest[i:]))
                break
            if v is None:
                return None
        if v is None or v == "":
            return None
        for name, conv in convs:
            try:
                v = conv(v)
            except (ValueError, TypeError, OverflowError) as e:
                raise MappingError(f"{where}: cannot convert {v!r} with {name!r} for event {event.id}: {e}") from None
        return _stored(v, tconv, where, col, sql_type, event)

    return get


def _mapped_column(col: str, tconv: _Convert, where: str, sql_type: str) -> Callable[..., Any]:
    def get(event: Event, out: dict[str, Any]) -> Any:
        return _stored(out.get(col), tconv, where, col, sql_type, event)

    return get


def _meta_column(attr: str, tconv: _Convert, where: str, col: str, sql_type: str) -> Callable[..., Any]:
    def get(event: Event, out: dict[str, Any]) -> Any:
        return _stored(getattr(event, attr), tconv, where, col, sql_type, event)

    return get


def _is_simple(f: FieldSpec) -> bool:
    return f.path is not None and f.lookup is None and not f.required and "default" not in f.model_fields_set


def _newest_per_key(rows: Sequence[tuple[Any, ...]], plan: Plan) -> list[tuple[Any, ...]]:
    """One row per key (ON CONFLICT may touch a row only once per statement): the highest version, else the last;
    in key order, so concurrent batches lock the same rows in the same order (no deadlocks)."""
    if len(rows) < 2:
        return list(rows)
    key_of = plan._key_of
    keys = list(map(key_of, rows))
    if len(set(keys)) == len(keys):  # the usual batch (the dispatcher sends one event per entity): just sort
        return sorted(rows, key=key_of)
    kidx = plan._kidx
    vidx = plan.data_cols.index(plan.version) if plan.version else None
    best: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for values in rows:
        k = tuple(values[i] for i in kidx)
        old = best.get(k)
        if old is None or vidx is None or old[vidx] is None or (values[vidx] is not None and values[vidx] >= old[vidx]):
            best[k] = values
    return [best[k] for k in sorted(best)]
