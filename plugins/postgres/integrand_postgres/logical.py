"""Logical replication mode: a ``pgoutput`` slot streamed over the replication protocol (walsender.py).

Why the replication protocol and not the SQL slot functions (which the first version polled with
``pg_logical_slot_peek_binary_changes``): a peek is a poll (latency of the poll interval at best),
and every peek decodes again from the slot's restart point, which the server moves only at its
running-transactions records (every 15 s on PostgreSQL 15): at 1,000 changes/s each peek re-decoded
up to 15 s of WAL, and p99 latency was 0.7 s. Streamed, the server decodes each change once and
pushes it as it commits. Why psycopg2 in a thread: no asyncio driver speaks the protocol (see
walsender.py). Commit-then-confirm is kept: the thread tells the server the position only after
integrand's store has committed it (``confirm`` from ``ack``), so a crash anywhere re-streams from
the slot and event ids absorb the repeat. The SQL functions are still used around the stream:
the slot's state, lag and an explicit advance at start (a crash between commit and confirm).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg

from integrand.connector import Event, PositionLost, RetryableError, StreamBatch

from .pg import classify, qualified, quote_ident
from .pgoutput import Decoder, Transaction, lsn_int, lsn_text
from .walsender import WalReader, libpq_params

if TYPE_CHECKING:
    from .source import PostgresSource, PostgresSourceConfig, TableKeys


# While nothing of ours is in the WAL, the slot is still moved up to the server's position this often.
IDLE_ADVANCE = 1.0


def lsn_version(lsn: int, seq: int) -> str:
    """Transactions in commit order (LSN), changes in order within one: a number (integrand orders versions that
    are numbers or times), zero-padded to a fixed width so that it also orders as text (the sink's etl_version)."""
    return f"{lsn * 1_000_000 + seq:026d}"


async def install_logical(con: asyncpg.Connection, cfg: PostgresSourceConfig, source: str) -> list[str]:
    from .source import names

    n = names(cfg, source)
    out = []
    if not await con.fetchval("SELECT true FROM pg_publication WHERE pubname = $1", n.publication):
        tables = ", ".join(qualified(t) for t in cfg.tables)
        await con.execute(f"CREATE PUBLICATION {quote_ident(n.publication)} FOR TABLE {tables}")
        out.append(f"installed: publication {n.publication} for {', '.join(cfg.tables)}")
    if not await con.fetchval("SELECT true FROM pg_replication_slots WHERE slot_name = $1", n.slot):
        lsn = await con.fetchval("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", n.slot)
        out.append(f"installed: replication slot {n.slot} (pgoutput) at {lsn}")
    return out or [f"already installed: publication {n.publication}, slot {n.slot}"]


async def uninstall_logical(con: asyncpg.Connection, cfg: PostgresSourceConfig, source: str) -> list[str]:
    from .source import names

    n = names(cfg, source)
    out = []
    if await con.fetchval("SELECT true FROM pg_replication_slots WHERE slot_name = $1", n.slot):
        await con.execute("SELECT pg_drop_replication_slot($1)", n.slot)
        out.append(f"removed: replication slot {n.slot} (the WAL it held back can be recycled)")
    await con.execute(f"DROP PUBLICATION IF EXISTS {quote_ident(n.publication)}")
    out.append(f"removed: publication {n.publication}")
    return out


async def slot_state(con: asyncpg.Connection, slot: str) -> tuple[str | None, int, int] | None:
    """(wal_status, confirmed_flush, lag in bytes) of the slot, or None if there is no such slot."""
    row = await con.fetchrow(
        "SELECT wal_status, confirmed_flush_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
        "FROM pg_replication_slots WHERE slot_name = $1",
        slot,
    )
    if row is None:
        return None
    return row[0], lsn_int(row[1]) if row[1] else 0, int(row[2] or 0)


async def stream_logical(src: PostgresSource, position: Any) -> AsyncIterator[StreamBatch]:
    cfg, n = src.config, src.names
    try:
        con = await src._connect()
    except Exception as e:
        raise classify(e, "connecting") from e
    src._con = con
    reader: WalReader | None = None
    try:
        state = await slot_state(con, n.slot)
        if state is None:
            raise PositionLost(f"replication slot {n.slot} does not exist (dropped?)", position=position)
        wal_status, confirmed, lag = state
        if wal_status == "lost":
            raise PositionLost(
                f"replication slot {n.slot} was invalidated (wal_status = lost: the WAL it needed is gone)",
                position=position,
                detail="max_slot_wal_keep_size was exceeded while integrand was behind",
            )
        src.lag_bytes = lag
        pos = int(position) if position is not None else confirmed
        if position is not None and pos < confirmed:
            raise PositionLost(
                f"replication slot {n.slot} is at {lsn_text(confirmed)}, ahead of integrand's position "
                f"{lsn_text(pos)}: changes in between were confirmed but are not in the store (restored from a backup?)",
                position=position,
            )
        if pos > confirmed:  # committed to the store, not yet confirmed (a crash between the two): confirm now
            await _advance(con, n.slot, pos)
        keys = await src.keys(con)
        reader = WalReader(
            cfg.dsn.reveal(), libpq_params(cfg, src.ctx.base_dir, src.app_name), n.slot, n.publication, pos
        )
        reader.start()
        src._reader = reader
        decoder = Decoder()
        ready: list[Transaction] = []  # whole transactions not yet handed to the store
        last_advance = time.monotonic()
        last_lag = 0.0
        while True:
            # Everything that arrived while the last batch was being committed (group commit), else wait for more.
            # The WAL end is read first: every message before it is then in the queue, so get() returns it.
            wal_end = reader.wal_end
            msgs = await reader.get(0 if ready else IDLE_ADVANCE)
            try:
                for _lsn, data in msgs:
                    tx = decoder.feed(data)
                    if tx is not None and tx.end_lsn > pos:
                        ready.append(tx)
            except Exception as e:
                raise RetryableError(f"replication slot {n.slot}: cannot decode a pgoutput message: {e}") from e
            now = time.monotonic()
            if now - last_lag >= cfg.lag_every:
                last_lag = now
                with contextlib.suppress(Exception):
                    st = await slot_state(con, n.slot)
                    if st is not None:
                        src.lag_bytes = st[2]
            if ready:
                take, size = 0, 0  # whole transactions, about batch_size changes
                while take < len(ready) and size < cfg.batch_size:
                    size += len(ready[take].changes)
                    take += 1
                txs, ready = ready[:take], ready[take:]
                events = _events(src, keys, txs)
                pos = txs[-1].end_lsn
                last_advance = now
                yield StreamBatch(events, position=pos, token=pos)
            elif decoder.current is None and wal_end > pos and now - last_advance >= IDLE_ADVANCE:
                # Nothing of ours up to the server's WAL end: move the slot there (through the store, like any
                # position), so it does not hold WAL back.
                pos = wal_end
                last_advance = now
                yield StreamBatch([], position=pos, token=pos)
    finally:
        src._con = None
        src._reader = None
        if reader is not None:
            await reader.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(con.close(), 5)


def _events(src: PostgresSource, keys: TableKeys, txs: list[Transaction]) -> list[Event]:
    from .source import envelope

    events: list[Event] = []
    for tx in txs:
        for seq, ch in enumerate(tx.changes):
            rel = ch.relation
            truncate = ch.op == "t"
            ev = envelope(
                source=src.ctx.name,
                mode="logical",
                db=keys.database,
                schema=rel.schema,
                table=rel.name,
                op=ch.op,
                before=ch.before,
                after=ch.after,
                key_cols=[]
                if truncate
                else keys.columns.get((rel.schema, rel.name)) or [c for c, _, k in rel.columns if k],
                version=lsn_version(tx.commit_lsn, seq),
                event_id=f"lsn{tx.commit_lsn:X}-{seq}",
                ts_ms=tx.commit_ts_ms,
                txid=tx.xid,
                lsn=lsn_text(tx.commit_lsn),
            )
            if truncate:
                # The whole table, not one row: no entity id; what the TRUNCATE said beside the usual envelope.
                ev = dataclasses.replace(
                    ev,
                    entity_id=None,
                    data={**ev.data, "truncate": {"cascade": ch.cascade, "restart_identity": ch.restart_identity}},
                )
            events.append(ev)
    return events


async def _advance(con: asyncpg.Connection, slot: str, lsn: int) -> None:
    try:
        await con.execute("SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)", slot, lsn_text(lsn))
    except Exception as e:
        raise classify(e, "confirming the position to the replication slot") from e


async def confirm(src: PostgresSource, batch: StreamBatch) -> None:
    """After integrand's commit: the slot may let go of everything up to the batch's position."""
    if batch.token is None:
        return  # a snapshot page
    reader = src._reader
    if reader is not None:  # streaming: the replication connection holds the slot and sends the feedback
        reader.confirm(int(batch.token))
        return
    con = src._con
    if con is None:
        return  # the stream closed (the next stream() confirms the stored position first)
    state = await slot_state(con, src.names.slot)
    if state is not None and state[1] >= int(batch.token):
        return
    await _advance(con, src.names.slot, int(batch.token))


async def resync_logical(src: PostgresSource, lost: PositionLost) -> AsyncIterator[StreamBatch]:
    """A new slot (and publication if missing), then every row as ``op = "r"`` at the slot's starting point,
    then streaming resumes from there: a change after the slot's creation is never missed, at worst seen twice."""
    cfg, n = src.config, src.names
    con = await src._connect()
    try:
        try:
            st = await slot_state(con, n.slot)
            if st is not None:  # an invalidated slot: replaced
                await con.execute("SELECT pg_drop_replication_slot($1)", n.slot)
            await install_logical(con, cfg, src.ctx.name)
            state = await slot_state(con, n.slot)
            if state is None:
                raise RetryableError(f"replication slot {n.slot} vanished while being created")
            start = state[1]
            src.log.warning(
                "source %s: new replication slot %s at %s; listing every row of %s as a snapshot",
                src.ctx.name,
                n.slot,
                lsn_text(start),
                ", ".join(cfg.tables),
            )
            src._keys = None
            keys = await src.keys(con)
        except PositionLost:
            raise
        except Exception as e:
            raise classify(e, "re-creating the replication slot") from e
        cursor: Any = None
        while True:
            events, cursor = await src.snapshot_page(con, keys, cursor, cfg.batch_size, version=lsn_version(start, 0))
            if cursor is None:
                yield StreamBatch(events, position=start, token=start)
                return
            # Until the last page the old position stays: a crash mid-snapshot finds the new slot ahead of
            # it at the next start, which is a lost position again, so the snapshot is taken again in full.
            yield StreamBatch(events, position=lost.position, token=None)
    finally:
        with contextlib.suppress(Exception):
            await con.close()
