"""Logical replication mode: a ``pgoutput`` slot read through the SQL slot functions.

Why the SQL functions (``pg_logical_slot_peek_binary_changes`` + ``pg_replication_slot_advance``)
and not the replication protocol: no asyncio driver speaks it (asyncpg has no walsender support;
psycopg 3 only hands over a raw COPY_BOTH stream), and a thread running psycopg2's
``LogicalReplicationConnection`` would add a second, synchronous driver. Peeking is
non-destructive and advancing is an explicit call, which is exactly commit-then-confirm: the
slot moves only after integrand's store has committed the events (``ack``), so a crash anywhere
re-reads from the slot and event ids absorb the repeat. The cost is polling (``poll_interval``
when idle, at once while there is more) instead of a push, and each peek decodes from the slot's
position again, which the prompt advance after every commit keeps short.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg

from integrand.connector import PositionLost, RetryableError, StreamBatch

from .pg import classify, qualified, quote_ident
from .pgoutput import Decoder, Transaction, lsn_int, lsn_text

if TYPE_CHECKING:
    from .source import PostgresSource, PostgresSourceConfig


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
        decoder = Decoder()
        last_advance = time.monotonic()
        last_lag = 0.0
        while True:
            try:
                upto = lsn_int(await con.fetchval("SELECT pg_current_wal_lsn()::text"))
                rows = await con.fetch(
                    "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, "
                    "'proto_version', '1', 'publication_names', $4)",
                    n.slot,
                    lsn_text(upto),
                    cfg.batch_size * 3,  # rows, not changes: a one-row transaction is Begin, Insert, Commit
                    n.publication,
                )
            except asyncpg.ObjectNotInPrerequisiteStateError as e:  # the slot was invalidated meanwhile
                raise PositionLost(f"replication slot {n.slot}: {e}", position=pos) from e
            except asyncpg.UndefinedObjectError as e:
                raise PositionLost(f"replication slot {n.slot} was dropped: {e}", position=pos) from e
            except Exception as e:
                raise classify(e, "reading the replication slot") from e
            txs: list[Transaction] = []
            for r in rows:
                tx = decoder.feed(bytes(r[0]))
                if tx is not None and tx.end_lsn > pos:
                    txs.append(tx)
            decoder.current = None  # a peek ends on a transaction boundary
            now = time.monotonic()
            if now - last_lag >= cfg.lag_every:
                last_lag = now
                st = await slot_state(con, n.slot)
                if st is not None:
                    src.lag_bytes = st[2]
            if txs:
                events = []
                for tx in txs:
                    for t in tx.truncated:
                        src.log.warning("source %s: TRUNCATE of %s is not captured as deletes", src.ctx.name, t)
                    for seq, ch in enumerate(tx.changes):
                        rel = ch.relation
                        from .source import envelope

                        events.append(
                            envelope(
                                source=src.ctx.name,
                                mode="logical",
                                db=keys.database,
                                schema=rel.schema,
                                table=rel.name,
                                op=ch.op,
                                before=ch.before,
                                after=ch.after,
                                key_cols=keys.columns.get((rel.schema, rel.name))
                                or [c for c, _, k in rel.columns if k],
                                version=lsn_version(tx.commit_lsn, seq),
                                event_id=f"lsn{tx.commit_lsn:X}-{seq}",
                                ts_ms=tx.commit_ts_ms,
                                txid=tx.xid,
                                lsn=lsn_text(tx.commit_lsn),
                            )
                        )
                pos = txs[-1].end_lsn
                last_advance = now
                yield StreamBatch(events, position=pos, token=pos)
                if len(rows) >= cfg.batch_size * 3:
                    continue
            elif rows == [] and upto > pos and now - last_advance >= IDLE_ADVANCE:
                # Nothing for us up to `upto`: move the slot there (through the store, like any position),
                # so it neither holds WAL back nor decodes the same stretch on every peek.
                pos = upto
                last_advance = now
                yield StreamBatch([], position=pos, token=pos)
                continue
            await asyncio.sleep(cfg.interval)
    finally:
        src._con = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(con.close(), 5)


async def _advance(con: asyncpg.Connection, slot: str, lsn: int) -> None:
    try:
        await con.execute("SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)", slot, lsn_text(lsn))
    except Exception as e:
        raise classify(e, "confirming the position to the replication slot") from e


async def confirm(src: PostgresSource, batch: StreamBatch) -> None:
    """After integrand's commit: the slot may let go of everything up to the batch's position."""
    con = src._con
    if con is None or batch.token is None:
        return  # the stream closed (the next stream() confirms the stored position first), or a snapshot page
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
