"""The ``postgres-cdc`` source: a database's inserts, updates and deletes as events (change data capture).

Two modes, one envelope (Debezium's: ``op`` c/u/d/r, ``before``, ``after``, ``source``, ``ts_ms``):

* **outbox** (any PostgreSQL, no server settings): ``integrand postgres install SOURCE`` adds an
  outbox table and row triggers. A trigger writes each change to the outbox in the application's
  own transaction and calls ``pg_notify`` with an empty payload, which only wakes the listener;
  the listener reads the outbox in id order, so what changed while integrand was down is there
  when it starts. An outbox row is deleted only after integrand's store has committed its event.
* **logical** (no triggers): a replication slot with ``pgoutput`` and a publication, streamed over
  the replication protocol; see :mod:`integrand_postgres.logical`.

Both list the tables' current rows (``op = "r"``) for reconciliation, ``integrand sync`` and a resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import asyncpg
from pydantic import Field, field_validator, model_validator

from integrand.connector import (
    Connector,
    Duration,
    Event,
    PermanentError,
    PositionLost,
    ReconcilePage,
    ReconcilingSource,
    StreamBatch,
    StreamingSource,
)

from .pg import ConnectionConfig, classify, connect, qualified, quote_ident, split_table

if TYPE_CHECKING:
    from .walsender import WalReader

_NAME = re.compile(r"[^A-Za-z0-9_]")


class PostgresSourceConfig(ConnectionConfig):
    mode: Literal["outbox", "logical"] = "outbox"
    # The tables whose changes are captured: "table" (on the search_path) or "schema.table".
    tables: list[str] = Field(min_length=1)
    # Key columns per table (the entity id of its events); default: the table's primary key.
    keys: dict[str, list[str]] = {}
    batch_size: int = Field(default=500, ge=1, le=100_000)
    # outbox: re-read this often even without a NOTIFY (a safety net; default 1 s); logical: not used (the
    # server pushes changes over the replication connection).
    poll_interval: Duration | None = None
    # outbox mode: the outbox table (default integrand_outbox_<source>, in the first table's schema).
    outbox: str | None = None
    # logical mode: slot and publication names (default integrand_<source>).
    slot: str | None = None
    publication: str | None = None
    # logical mode: how often the slot's lag is read for the metric and the log.
    lag_every: Duration = 10.0

    @property
    def interval(self) -> float:
        if self.poll_interval is not None:
            return self.poll_interval
        return 0.05 if self.mode == "logical" else 1.0

    @field_validator("tables")
    @classmethod
    def _tables(cls, v: list[str]) -> list[str]:
        for t in v:
            if t.count(".") > 1 or not t.strip(".") or t.startswith(".") or t.endswith("."):
                raise ValueError(f"{t!r}: expected 'table' or 'schema.table'")
        if len(set(v)) != len(v):
            raise ValueError("a table is listed twice")
        return v

    @model_validator(mode="after")
    def _keys(self) -> PostgresSourceConfig:
        for t in self.keys:
            if t not in self.tables:
                raise ValueError(f"keys.{t}: not one of the tables")
        return self


@dataclass(frozen=True)
class Names:
    """Everything ``install`` creates, named after the source so two sources never share an outbox."""

    outbox: str
    function: str
    trigger: str
    channel: str
    slot: str
    publication: str


def names(cfg: PostgresSourceConfig, source: str) -> Names:
    base = _NAME.sub("_", source).lower()
    schema, _ = split_table(cfg.tables[0])
    outbox = cfg.outbox or (f"{schema}.integrand_outbox_{base}" if schema else f"integrand_outbox_{base}")
    oschema, _ = split_table(outbox)
    fn = f"integrand_capture_{base}"
    return Names(
        outbox=outbox,
        function=f"{oschema}.{fn}" if oschema else fn,
        trigger=f"integrand_cdc_{base}",
        channel=f"integrand_cdc_{base}",
        slot=cfg.slot or f"integrand_{base}",
        publication=cfg.publication or f"integrand_{base}",
    )


# --- install / uninstall (outbox mode) -----------------------------------------------------------


def install_sql(cfg: PostgresSourceConfig, source: str) -> list[str]:
    n = names(cfg, source)
    ob = qualified(n.outbox)
    return [
        f"""CREATE TABLE IF NOT EXISTS {ob} (
    id bigserial PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    schema_name text NOT NULL,
    table_name text NOT NULL,
    op "char" NOT NULL,
    before jsonb,
    after jsonb
)""",
        # The NOTIFY carries no row data (payloads must stay under 8,000 bytes, and a notification
        # reaches only sessions listening at that moment): it wakes the listener, the outbox has the data.
        # Identical notifications in one transaction are folded into one by PostgreSQL.
        f"""CREATE OR REPLACE FUNCTION {qualified(n.function)}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {ob} (schema_name, table_name, op, before, after) VALUES (
        TG_TABLE_SCHEMA, TG_TABLE_NAME,
        CASE TG_OP WHEN 'INSERT' THEN 'c' WHEN 'UPDATE' THEN 'u' ELSE 'd' END,
        CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
        CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
    PERFORM pg_notify({_literal(n.channel)}, '');
    RETURN NULL;
END
$fn$""",
        *(
            f"CREATE OR REPLACE TRIGGER {quote_ident(n.trigger)} AFTER INSERT OR UPDATE OR DELETE ON {qualified(t)} "
            f"FOR EACH ROW EXECUTE FUNCTION {qualified(n.function)}()"
            for t in cfg.tables
        ),
    ]


def _literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


async def install_outbox(con: asyncpg.Connection, cfg: PostgresSourceConfig, source: str) -> list[str]:
    """Create the outbox, the capture function and one trigger per table, in one transaction (idempotent)."""
    n = names(cfg, source)
    async with con.transaction():
        for sql in install_sql(cfg, source):
            await con.execute(sql)
    return [f"installed: outbox {n.outbox}, function {n.function}()"] + [
        f"installed: trigger {n.trigger} on {t}" for t in cfg.tables
    ]


async def uninstall_outbox(con: asyncpg.Connection, cfg: PostgresSourceConfig, source: str) -> list[str]:
    """Drop the triggers, the function and the outbox (and say how many changes were left unread)."""
    n = names(cfg, source)
    out = []
    async with con.transaction():
        left = await con.fetchval(f"SELECT count(*) FROM {qualified(n.outbox)}") if await _exists(con, n.outbox) else 0
        for t in cfg.tables:
            if await _exists(con, t):
                await con.execute(f"DROP TRIGGER IF EXISTS {quote_ident(n.trigger)} ON {qualified(t)}")
                out.append(f"removed: trigger {n.trigger} on {t}")
        await con.execute(f"DROP FUNCTION IF EXISTS {qualified(n.function)}()")
        await con.execute(f"DROP TABLE IF EXISTS {qualified(n.outbox)}")
        out.append(f"removed: outbox {n.outbox} and function {n.function}()")
    if left:
        out.append(f"note: {left} change(s) in the outbox had not been read by integrand")
    return out


async def _exists(con: asyncpg.Connection, table: str) -> bool:
    return bool(await con.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified(table)))


# --- events --------------------------------------------------------------------------------------

OPS = {"c": "created", "u": "updated", "d": "deleted", "r": "read", "t": "truncated"}


def version_of(n: int) -> str:
    """Zero-padded, so versions compare the same as numbers and as text (the sink's etl_version is text)."""
    return f"{n:020d}"


def ms(at: datetime | float) -> int:
    return int((at.timestamp() if isinstance(at, datetime) else at) * 1000)


@dataclass(frozen=True)
class TableKeys:
    """Key columns of each captured table, by (schema, table), and their SQL types (for keyset paging)."""

    columns: dict[tuple[str, str], list[str]]
    types: dict[tuple[str, str], list[str]]
    database: str


async def table_keys(con: asyncpg.Connection, cfg: PostgresSourceConfig) -> TableKeys:
    cols: dict[tuple[str, str], list[str]] = {}
    types: dict[tuple[str, str], list[str]] = {}
    for t in cfg.tables:
        found = await con.fetchrow(
            "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass($1)",
            qualified(t),
        )
        if found is None:
            raise PositionLost(f"table {t} does not exist")
        oid, schema, name = found
        rows = await con.fetch(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a WHERE a.attrelid = $1 "
            "AND a.attnum > 0 AND NOT a.attisdropped",
            oid,
        )
        typ = {r[0]: r[1] for r in rows}
        key = cfg.keys.get(t)
        if key is None:
            key = [
                r[0]
                for r in await con.fetch(
                    "SELECT a.attname FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, o) "
                    "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                    "WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.o",
                    oid,
                )
            ]
        if not key:
            raise ValueError(f"tables: {t} has no primary key; give its key columns in keys.{t}")
        cols[(schema, name)] = key
        types[(schema, name)] = [typ[k] for k in key]
    db = str(await con.fetchval("SELECT current_database()"))
    return TableKeys(cols, types, db)


def envelope(
    *,
    source: str,
    mode: str,
    db: str,
    schema: str,
    table: str,
    op: str,
    before: Any,
    after: Any,
    key_cols: Sequence[str],
    version: str | None,
    event_id: str,
    ts_ms: int,
    txid: Any = None,
    lsn: str | None = None,
    outbox_id: int | None = None,
    snapshot: bool = False,
) -> Event:
    row = after if after is not None else before
    key = ",".join("" if row is None or row.get(k) is None else str(row.get(k)) for k in key_cols)
    now = int(time.time() * 1000)
    return Event(
        id=event_id,
        source=source,
        type=f"{table}.{OPS[op]}",
        entity=f"{schema}.{table}",
        entity_id=key,
        version=version,
        occurred_at=datetime.fromtimestamp(ts_ms / 1000).astimezone().isoformat(),
        data={
            "op": op,
            "before": before,
            "after": after,
            "source": {
                "connector": "postgresql",
                "mode": mode,
                "db": db,
                "schema": schema,
                "table": table,
                "txId": txid,
                "lsn": lsn,
                "outbox_id": outbox_id,
                "snapshot": snapshot,
                "ts_ms": ts_ms,
            },
            "ts_ms": now,
        },
    )


class PostgresSource(Connector[PostgresSourceConfig], StreamingSource, ReconcilingSource):
    """Capture a database's changes (outbox triggers or logical replication); list its rows for syncs."""

    Config = PostgresSourceConfig
    page_size: ClassVar[int] = 1000
    # Read while earlier batches commit (integrand commits what arrived meanwhile in one transaction): the
    # outbox skips the rows in flight, the slot's position only moves forward.
    read_ahead: ClassVar[int] = 4

    def __init__(self, config: PostgresSourceConfig, ctx: Any):
        super().__init__(config, ctx)
        self.names = names(config, ctx.name)
        self._keys: TableKeys | None = None
        self._con: asyncpg.Connection | None = None  # the reading connection while streaming
        self._reader: WalReader | None = None  # logical mode: the replication connection while streaming
        self._wake = asyncio.Event()
        self.lag_bytes: int | None = None  # logical mode: how far the slot is behind the server's WAL
        # Outbox mode, while streaming: the rows handed to integrand and not yet deleted (read ahead, the next
        # read skips them), and the lock that keeps the read and an ack's delete off the connection at once.
        self._inflight: set[int] = set()
        self._con_lock = asyncio.Lock()

    @property
    def app_name(self) -> str:
        return f"integrand source {self.ctx.name}"

    def stream_lag(self) -> float | None:
        """The slot's lag in bytes of WAL (logical mode), read every ``lag_every``: integrand's stream lag metric."""
        return None if self.lag_bytes is None else float(self.lag_bytes)

    async def _connect(self) -> asyncpg.Connection:
        return await connect(self.config, self.ctx.base_dir, self.app_name)

    async def keys(self, con: asyncpg.Connection) -> TableKeys:
        if self._keys is None:
            self._keys = await table_keys(con, self.config)
        return self._keys

    # --- streaming -------------------------------------------------------------------------------

    def stream(self, position: Any) -> AsyncIterator[StreamBatch]:
        if self.config.mode == "logical":
            from .logical import stream_logical

            return stream_logical(self, position)
        return self._stream_outbox(position)

    async def _stream_outbox(self, position: Any) -> AsyncIterator[StreamBatch]:
        try:
            con = await self._connect()
        except Exception as e:
            raise classify(e, "connecting") from e
        self._con = con
        try:
            if not await _exists(con, self.names.outbox):
                raise PositionLost(
                    f"outbox {self.names.outbox} does not exist; run `integrand postgres install {self.ctx.name}`"
                )
            keys = await self.keys(con)
            # Deleting what the store has committed needs no fsync of its own: a deletion lost in a crash of
            # the database only means those rows are read again, and their event ids make that a no-op.
            await con.execute("SET synchronous_commit = off")
            await con.add_listener(self.names.channel, self._notified)
            cols = "id, txid::text, at, schema_name, table_name, op, before, after"
            sql = f"SELECT {cols} FROM {qualified(self.names.outbox)} ORDER BY id LIMIT $1"
            # Read ahead, the rows integrand holds but has not stored yet are skipped (a hashed subplan).
            skip = (
                f"SELECT {cols} FROM {qualified(self.names.outbox)} "
                "WHERE id NOT IN (SELECT unnest($2::bigint[])) ORDER BY id LIMIT $1"
            )
            inflight: set[int] = set()
            self._inflight = inflight
            high = int(position or 0)  # the position only moves forward (a late commit has a lower id)
            while True:
                self._wake.clear()
                try:
                    # Everything still in the outbox, not only ids above the position: a transaction that
                    # took a lower id may commit after a higher one was read (rows leave only once stored).
                    async with self._con_lock:
                        if inflight:
                            rows = await con.fetch(skip, self.config.batch_size, list(inflight))
                        else:
                            rows = await con.fetch(sql, self.config.batch_size)
                except Exception as e:
                    raise classify(e, "reading the outbox") from e
                if rows:
                    events = [self._outbox_event(r, keys) for r in rows]
                    ids = [int(r[0]) for r in rows]
                    inflight.update(ids)
                    high = max(high, *ids)
                    yield StreamBatch(events, position=high, token=ids)
                    if len(rows) == self.config.batch_size:
                        continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.interval)
        finally:
            self._con = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(con.close(), 5)

    def _notified(self, *_: Any) -> None:
        self._wake.set()

    def _outbox_event(self, r: asyncpg.Record, keys: TableKeys) -> Event:
        oid, txid, at, schema, table, op, before, after = r
        op = op.decode() if isinstance(op, bytes) else str(op)
        # The trigger writes only these; anything else was written into the outbox by hand (found by fuzzing).
        if op not in OPS or not all(v is None or isinstance(v, dict) for v in (before, after)):
            raise PermanentError(
                f"outbox {self.names.outbox} row {oid}: op {op!r} with before/after of types "
                f"{type(before).__name__}/{type(after).__name__} is not what integrand's trigger writes; delete the row"
            )
        return envelope(
            source=self.ctx.name,
            mode="outbox",
            db=keys.database,
            schema=schema,
            table=table,
            op=op,
            before=before,
            after=after,
            key_cols=keys.columns.get((schema, table), []),
            version=version_of(oid),
            event_id=f"ob{oid}-{txid}",
            ts_ms=ms(at),
            txid=int(txid),
            outbox_id=int(oid),
        )

    async def ack(self, batch: StreamBatch) -> None:
        """Committed in integrand's store: now the outbox rows (or the slot's position) may go."""
        if self.config.mode == "logical":
            from .logical import confirm

            await confirm(self, batch)
            return
        con = self._con
        if con is None or not batch.token:
            return  # the stream closed: the rows stay and are read again (same ids: dedup absorbs them)
        try:
            async with self._con_lock:
                await con.execute(
                    f"DELETE FROM {qualified(self.names.outbox)} WHERE id = ANY($1::bigint[])", batch.token
                )
                self._inflight.difference_update(batch.token)
        except Exception as e:
            raise classify(e, "deleting stored changes from the outbox") from e

    # --- listing rows: reconcile, sync, resync --------------------------------------------------------

    async def reconcile(self, since: float | None, cursor: Any) -> ReconcilePage:
        """One page of the tables' current rows (``op = "r"``), table by table in key order; ``since`` is not
        used (rows carry no change time), so every pass lists everything."""
        con = await self._connect()
        try:
            keys = await self.keys(con)
            events, nxt = await self.snapshot_page(con, keys, cursor, self.page_size, version=None)
        except Exception as e:
            raise classify(e, "listing rows") from e
        finally:
            with contextlib.suppress(Exception):
                await con.close()
        return ReconcilePage(events, cursor=nxt, more=nxt is not None)

    async def snapshot_page(
        self, con: asyncpg.Connection, keys: TableKeys, cursor: Any, limit: int, *, version: str | None
    ) -> tuple[list[Event], Any]:
        """Up to ``limit`` rows from ``cursor`` ({"table": i, "after": [key values]}), and the next cursor or None."""
        tables = list(keys.columns)
        ti = int(cursor["table"]) if cursor else 0
        after = cursor.get("after") if cursor else None
        events: list[Event] = []
        now = int(time.time() * 1000)
        while ti < len(tables) and len(events) < limit:
            schema, table = tables[ti]
            kc, kt = keys.columns[(schema, table)], keys.types[(schema, table)]
            order = ", ".join(f"t.{quote_ident(k)}" for k in kc)  # t.: not the ::text output columns of the same name
            where = ""
            args: list[Any] = []
            if after is not None:
                where = f" WHERE ({order}) > ({', '.join(f'${i + 1}::text::{t}' for i, t in enumerate(kt))})"
                args = [str(a) for a in after]
            sql = (
                f"SELECT to_jsonb(t), {', '.join(f'{quote_ident(k)}::text' for k in kc)} "
                f"FROM {quote_ident(schema)}.{quote_ident(table)} AS t{where} ORDER BY {order} LIMIT {limit - len(events)}"
            )
            rows = await con.fetch(sql, *args)
            for r in rows:
                row = r[0]
                events.append(
                    envelope(
                        source=self.ctx.name,
                        mode=self.config.mode,
                        db=keys.database,
                        schema=schema,
                        table=table,
                        op="r",
                        before=None,
                        after=row,
                        key_cols=kc,
                        version=version,
                        event_id=f"snap-{schema}.{table}-{','.join(str(x) for x in r[1:])}-{now}",
                        ts_ms=now,
                        snapshot=True,
                    )
                )
                after = list(r[1:])
            if len(events) < limit:
                ti, after = ti + 1, None
        if ti >= len(tables):
            return events, None
        return events, {"table": ti, "after": after}

    def resync(self, lost: PositionLost) -> AsyncIterator[StreamBatch]:
        if self.config.mode == "logical":
            from .logical import resync_logical

            return resync_logical(self, lost)
        return self._resync_outbox(lost)

    async def _resync_outbox(self, lost: PositionLost) -> AsyncIterator[StreamBatch]:
        """A missing outbox is the one lost position here: say how to install it; there is nothing to resync from."""
        raise PermanentError(str(lost))
        yield  # pragma: no cover - makes this an async generator
