"""The PostgreSQL store backend: the same ``StoreBackend`` as SQLite, on a database several nodes share.

How each guarantee holds with many nodes on one database:

- an enqueue returns after the COMMIT that holds it; concurrent enqueues of one node are applied by
  one writer task in one transaction (group commit); a failing batch is retried op by op, so a bad op
  fails alone;
- dedup is the ``UNIQUE (source, event_id)`` key (``ON CONFLICT DO NOTHING``), so two nodes receiving
  the same webhook store it once;
- every transaction that reads or moves an entity line (enqueue: the stale guard and the line's head;
  complete: the next head; replay) first takes ``pg_advisory_xact_lock`` on the entity key, in sorted
  order (no deadlocks): the ledger's rule (``ledger.judge``) is applied to what is committed;
- leasing takes only line heads, ``FOR UPDATE SKIP LOCKED``: a unique index allows one head per
  (sink, entity key), so one delivery per line is in flight cluster-wide; leases expire and carry a
  fencing token (``owner.n``) that ``complete`` checks;
- a commit that makes deliveries leasable sends ``NOTIFY``; every node LISTENs and sets
  ``deliveries_ready``, so idle dispatchers wake instead of polling;
- a cursor, resume position or state commit made by a singleton's tasks (a source this node holds the
  lease of, ``integrand.ownership``) checks the lease's fencing token in the same transaction, with the
  lease row locked ``FOR SHARE`` so it cannot change hands before the commit: a stale token is refused
  (``LeaseLost``), nothing of the commit stored. Leases and node heartbeats use the database's clock.

Connection errors are ``StoreUnavailable`` (webhooks get 503). The DSN is never logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar

import asyncpg
import orjson

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from ..errors import LeaseLost, StoreUnavailable
from ..events import Event, VersionError, version_key
from .deadletters import REJECTIONS_BUFFERED
from .fence import CURRENT, Fence
from .ledger import is_delete, judge, superseded
from .pg_schema import MIGRATION_LOCK, PG_MIGRATIONS
from .pg_views import PgOperatorViews
from .queue import _again, _prepare, _Prepared, _serialised
from .records import (
    AuditEntry,
    CursorRow,
    DeadLetter,
    DeliveryDetail,
    EnqueueResult,
    EntityVersion,
    Leased,
    Outcome,
    Rejection,
    ReplayResult,
    UnstorableEvent,
)
from .retention import _PRUNE_PHASES, SAGA_SCOPE, saga_event

log = logging.getLogger("integrand.store")
T = TypeVar("T")
PgConn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
PgRole = Literal["daemon", "writer", "reader", "client"]

CHANNEL = "integrand_deliveries_ready"
LEASES_CHANNEL = "integrand_leases"  # a singleton's lease was handed back: the other nodes may take it now

# Errors that mean "the database cannot be reached or cannot commit now", not "this op is wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.InsufficientResourcesError,
    # What asyncpg raises when a transaction's rollback meets a connection the server has just terminated.
    asyncpg.exceptions.InternalClientError,
)
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*_UNAVAILABLE, asyncpg.PostgresError)
_RETRIED: tuple[type[BaseException], ...] = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)

_LOCK_KEYS = (
    "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h "
    "FROM unnest($1::text[]) AS k ORDER BY 1) AS s"
)


class _EnqueueOp:
    __slots__ = ("cursor", "fence", "future", "items", "request_id")

    def __init__(
        self, items: Sequence[_Prepared], cursor: tuple[str, str, bytes] | None, request_id: str | None = None
    ):
        self.items = items
        self.cursor = cursor
        self.request_id = request_id  # the webhook request these events arrived in (their story shows it)
        self.fence = CURRENT.get()  # the caller's: a singleton's task commits under its lease
        self.future: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()


class PgStore(PgOperatorViews):
    """The PostgreSQL backend; ``server_settings`` are passed to every connection (tests set ``search_path``)."""

    def __init__(
        self,
        dsn: str,
        *,
        clock: Callable[[], float] = time.time,
        role: PgRole = "daemon",
        commit_max_rows: int = 4000,
        pool_size: int = 8,
        server_settings: dict[str, str] | None = None,
    ):
        self._dsn = dsn
        self.path = _display(dsn)  # what logs and `integrand status` show: no password
        self.clock = clock
        self.role = role
        self.commit_max_rows = commit_max_rows
        self.pool_size = pool_size
        self.server_settings = dict(server_settings or {})
        self.owner = uuid.uuid4().hex[:12]
        self.deliveries_ready = asyncio.Event()
        self.leases_freed = asyncio.Event()  # set on a NOTIFY from a node handing a lease back (ownership.py)
        self.on_commit: Callable[[float, int], None] | None = None
        self.commits = 0
        self.committed_ops = 0
        self._failing_commits = 0  # group commits failed since the last that succeeded (logged once per outage)
        self.rejections_dropped = 0
        self._leases = itertools.count(1)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._inbox: collections.deque[_EnqueueOp] = collections.deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._relisten: asyncio.Task[None] | None = None
        self._closing = False
        self._rejections: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=REJECTIONS_BUFFERED)
        self._rejections_keep = 0
        self._rejection_task: asyncio.Task[None] | None = None
        self._prune_at: tuple[str, Any] = ("events", None)
        self.pruned = dict.fromkeys(_PRUNE_PHASES, 0)  # rows deleted by retention

    # --- life cycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        settings = dict(self.server_settings)
        if self.role == "reader":
            settings["default_transaction_read_only"] = "on"
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self.pool_size,
                server_settings=settings,
                timeout=10,
                reset=_keep_session,
            )
            assert self._pool is not None
            if self.role == "reader":
                if await self._pool.fetchval("SELECT to_regclass('integrand_schema')") is None:
                    raise StoreUnavailable("no integrand store in this PostgreSQL database (start the daemon once)")
            else:
                await self._migrate()
                await self._listen()
                self._writer = asyncio.create_task(self._run_writer(), name="pg-store-writer")
        except BaseException as e:
            await self._close_conns()
            if isinstance(e, StoreUnavailable):
                raise
            if isinstance(e, _CONNECT_ERRORS):
                raise StoreUnavailable(f"cannot open the PostgreSQL store: {type(e).__name__}: {e}") from None
            raise

    async def close(self) -> None:
        if self._rejection_task is not None:  # refused webhooks buffered before the close are written
            with contextlib.suppress(Exception):
                await self._rejection_task
        self._closing = True
        if self._writer is not None:
            self._wake.set()
            with contextlib.suppress(Exception):
                await self._writer
            self._writer = None
        if self._rejection_task is not None:
            with contextlib.suppress(Exception):
                await self._rejection_task
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(BaseException):
                await self._relisten
        await self._close_conns()

    async def _close_conns(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=5)
            self._listener = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 10)
            self._pool = None

    async def _migrate(self) -> None:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS integrand_schema (version INTEGER NOT NULL)")
            current = await conn.fetchval("SELECT max(version) FROM integrand_schema") or 0
            if current > len(PG_MIGRATIONS):
                raise StoreUnavailable(
                    f"the PostgreSQL store has schema version {current}, newer than this integrand knows "
                    f"({len(PG_MIGRATIONS)}); upgrade integrand"
                )
            for version in range(current, len(PG_MIGRATIONS)):
                await conn.execute(PG_MIGRATIONS[version])
                await conn.execute("INSERT INTO integrand_schema (version) VALUES ($1)", version + 1)
                log.info("PostgreSQL store schema migrated to version %d", version + 1)

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._dsn, server_settings=self.server_settings, timeout=10)
        await conn.add_listener(CHANNEL, self._notified)
        await conn.add_listener(LEASES_CHANNEL, lambda *_: self.leases_freed.set())
        conn.add_termination_listener(self._listener_lost)
        self._listener = conn

    def _listener_lost(self, _conn: object) -> None:
        """The LISTEN connection dropped (a restart, a failover): listen again, with backoff, until closed."""
        if not self._closing and (self._relisten is None or self._relisten.done()):
            self._relisten = asyncio.create_task(self._listen_again(), name="pg-store-relisten")

    async def _listen_again(self) -> None:
        delay = 0.2
        while not self._closing:
            try:
                await self._listen()
            except _CONNECT_ERRORS as e:
                log.warning(
                    "PostgreSQL store: cannot LISTEN again yet (%s); retrying in %.1f s", type(e).__name__, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.deliveries_ready.set()  # notifications sent meanwhile were lost: look once
            return

    def _notified(self, *_args: object) -> None:
        self.deliveries_ready.set()

    def _check_writable(self) -> None:
        if self.role == "reader":
            raise StoreUnavailable("the PostgreSQL store is opened read-only")
        if self._pool is None or self._closing:
            raise StoreUnavailable("store is not open")

    def _pool_or_fail(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise StoreUnavailable("store is not open")
        return self._pool

    async def _tx(self, fn: Callable[[PgConn], Awaitable[T]]) -> T:
        """``fn`` in a transaction of its own, retried on a deadlock or serialization failure."""
        self._check_writable()
        pool = self._pool_or_fail()
        for attempt in range(5):
            try:
                conn = await pool.acquire()
            except _UNAVAILABLE as e:
                raise StoreUnavailable(f"the PostgreSQL store cannot commit: {type(e).__name__}: {e}") from None
            try:
                async with conn.transaction():
                    return await fn(conn)
            except _RETRIED:
                if attempt == 4:
                    raise
            except _UNAVAILABLE as e:
                # A connection the server dropped mid-transaction is in no known state: never hand it out again.
                conn.terminate()
                raise StoreUnavailable(f"the PostgreSQL store cannot commit: {type(e).__name__}: {e}") from None
            finally:
                with contextlib.suppress(*_UNAVAILABLE):
                    await pool.release(conn)
        raise AssertionError("unreachable")

    async def _one(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """A write that is one statement, committed on its own: no BEGIN and COMMIT round trips around it."""
        self._check_writable()
        pool = self._pool_or_fail()
        try:
            conn = await pool.acquire()
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"the PostgreSQL store cannot commit: {type(e).__name__}: {e}") from None
        try:
            for attempt in range(5):
                try:
                    return list(await conn.fetch(sql, *args))
                except _RETRIED:
                    if attempt == 4:
                        raise
        except _UNAVAILABLE as e:
            conn.terminate()  # in no known state: never handed out again
            raise StoreUnavailable(f"the PostgreSQL store cannot commit: {type(e).__name__}: {e}") from None
        finally:
            with contextlib.suppress(*_UNAVAILABLE):
                await pool.release(conn)
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return list(await self._pool_or_fail().fetch(sql, *args))
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"the PostgreSQL store cannot be read: {type(e).__name__}: {e}") from None

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the database answers in a writable transaction."""
        self._check_writable()
        try:
            await self._tx(lambda c: c.execute("SELECT 1"))
        except StoreUnavailable:
            raise
        except Exception as e:
            raise StoreUnavailable(str(e)) from e

    # --- the queue --------------------------------------------------------------------------------

    async def enqueue(
        self, items: Sequence[tuple[Event, Sequence[str]]], *, request_id: str | None = None
    ) -> EnqueueResult:
        """Store events with one delivery per sink; returns once committed. Duplicates are no-ops."""
        self._check_writable()
        if not items:
            return EnqueueResult(0, 0)
        return await self._submit(_EnqueueOp(_prepare(items), None, request_id))

    async def enqueue_with_cursor(
        self, items: Sequence[tuple[Event, Sequence[str]]], source: str, cursor: Any, kind: str = "poll"
    ) -> EnqueueResult:
        """Store a poll's events and its new cursor in one transaction: both or neither survive a crash."""
        self._check_writable()
        prepared, blob = _prepare(items), orjson.dumps(cursor)
        return await self._submit(_EnqueueOp(prepared, (source, kind, blob)))

    async def _submit(self, op: _EnqueueOp) -> EnqueueResult:
        if self._writer is None or self._writer.done():
            raise StoreUnavailable("the PostgreSQL store's writer is not running")
        self._inbox.append(op)
        self._wake.set()
        return await op.future

    async def _run_writer(self) -> None:
        """Group commit: every enqueue waiting when a transaction starts goes into it."""
        while True:
            if not self._inbox:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[_EnqueueOp] = []
            rows = 0
            while self._inbox and rows < self.commit_max_rows:
                op = self._inbox.popleft()
                batch.append(op)
                rows += max(1, len(op.items))
            await self._commit(batch)

    async def _commit(self, batch: list[_EnqueueOp]) -> None:
        started = time.perf_counter()
        # A singleton's commits (a fence to check) and anything with a cursor or an entity take a transaction.
        plain = all(
            op.cursor is None and op.fence is None and all(it.event.entity_id is None for it in op.items)
            for op in batch
        )
        try:
            if plain:
                results, new = await self._enqueue_plain(batch)
            else:
                results, new = await self._tx(lambda c: self._apply_enqueues(c, batch))
        except StoreUnavailable as e:
            # Once per outage, not per commit: while PostgreSQL is away every sender retries, and each batch fails.
            if not self._failing_commits:
                log.error(
                    "the PostgreSQL store cannot commit %d enqueues: %s (until it can, each is refused)", len(batch), e
                )
            self._failing_commits += 1
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(e)
            return
        except Exception as e:
            if len(batch) > 1:  # one bad op must not fail the others: each alone
                for op in batch:
                    await self._commit([op])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return
        if self._failing_commits:
            log.warning("the PostgreSQL store commits again (%d group commits had failed)", self._failing_commits)
            self._failing_commits = 0
        self.commits += 1
        self.committed_ops += len(batch)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(batch))
        if new:
            self.deliveries_ready.set()
        for op, res in zip(batch, results, strict=True):
            if not op.future.done():
                op.future.set_result(res)

    async def _enqueue_plain(self, ops: list[_EnqueueOp]) -> tuple[list[EnqueueResult], bool]:
        """Webhooks without entities (no stale guard, no line heads, no cursor, no fence): the events, their deliveries
        and the NOTIFY in one statement committed on its own, one round trip for the whole group commit.
        What ON CONFLICT skipped was stored before: a duplicate, audited as such afterwards."""
        now = self.clock()
        flat: list[tuple[_EnqueueOp, _Prepared, bytes]] = []
        seen: set[tuple[str, str]] = set()
        repeats: list[tuple[str, str, str | None]] = []  # received again: (source, event id, request id)
        in_batch: list[int] = []
        for op in ops:
            dup = 0
            for it in op.items:
                k = (it.event.source, it.event.id)
                if k in seen:
                    dup += 1
                    repeats.append((*k, op.request_id))
                    continue
                seen.add(k)
                flat.append((op, it, _serialised(it.event)[0]))
            in_batch.append(dup)
        rows: dict[tuple[str, str], int] = {}
        if flat:
            d_src, d_id, d_sink, d_key = [], [], [], []
            for _, it, _body in flat:
                for sink in it.sinks:
                    d_src.append(it.event.source)
                    d_id.append(it.event.id)
                    d_sink.append(sink)
                    d_key.append(it.event.entity_key)
            for r in await self._one(
                "WITH e AS (INSERT INTO events (source, event_id, type, entity_key, received_at, body, request_id) "
                "SELECT s, i, t, k, $5, b, r FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
                "$6::bytea[], $7::text[]) AS x(s, i, t, k, b, r) ON CONFLICT (source, event_id) DO NOTHING "
                "RETURNING id, source, event_id), "
                "d AS (INSERT INTO deliveries (event, sink, entity_key, ordered, state, created_at, next_attempt_at, "
                "updated_at, active, head) SELECT e.id, y.sink, y.k, false, 'ready', $5, $5, $5, true, true "
                "FROM e JOIN unnest($8::text[], $9::text[], $10::text[], $11::text[]) AS y(s, i, sink, k) "
                "ON e.source = y.s AND e.event_id = y.i) "
                "SELECT id, source, event_id, pg_notify($12, '') FROM e",
                [it.event.source for _, it, _ in flat],
                [it.event.id for _, it, _ in flat],
                [it.event.type for _, it, _ in flat],
                [it.event.entity_key for _, it, _ in flat],
                now,
                [body for _, _, body in flat],
                [op.request_id for op, _, _ in flat],
                d_src,
                d_id,
                d_sink,
                d_key,
                CHANNEL,
            ):
                rows[(r[1], r[2])] = r[0]
        results: list[EnqueueResult] = []
        by_op: dict[int, list[_Prepared]] = {}
        for op, it, _ in flat:
            by_op.setdefault(id(op), []).append(it)
        for op, dup in zip(ops, in_batch, strict=True):
            mine = by_op.get(id(op), [])
            before = [it for it in mine if (it.event.source, it.event.id) not in rows]  # stored before this batch
            repeats += [(it.event.source, it.event.id, op.request_id) for it in before]
            results.append(EnqueueResult(len(mine) - len(before), dup + len(before), 0))
        if repeats:
            try:  # the events are committed: a lost line of their story must not turn the answer into a 503
                await self._one(
                    "INSERT INTO audit (at, event, delivery, action, detail) SELECT $1, e.id, NULL, 'deduplicated', "
                    "x.t FROM unnest($2::text[], $3::text[], $4::text[]) AS x(s, i, t) "
                    "JOIN events e ON e.source = x.s AND e.event_id = x.i",
                    now,
                    [r[0] for r in repeats],
                    [r[1] for r in repeats],
                    [_again(r[2]) for r in repeats],
                )
            except StoreUnavailable as e:
                log.warning("could not record %d repeated webhooks in their events' story: %s", len(repeats), e)
        return results, any(it.sinks for (op, it, _) in flat if (it.event.source, it.event.id) in rows)

    async def _apply_enqueues(self, conn: PgConn, ops: list[_EnqueueOp]) -> tuple[list[EnqueueResult], bool]:
        now = self.clock()
        lock_keys = sorted({it.event.entity_key for op in ops for it in op.items if it.event.entity_id is not None})
        if lock_keys:
            await conn.execute(_LOCK_KEYS, lock_keys)
        # After the entity locks, which may be waited for: the fence is judged as of the writes that follow.
        for fence in {id(op.fence): op.fence for op in ops if op.fence is not None}.values():
            await _check_fence(conn, fence)
        pairs = {(it.event.source, it.event.id) for op in ops for it in op.items}
        stored: dict[tuple[str, str], int] = {}
        # Without entities nothing needs to know beforehand which events are stored already (no stale guard,
        # no line heads): the INSERT's ON CONFLICT tells, and repeats are looked up after it, only if any.
        look_first = bool(lock_keys)
        if pairs and look_first:
            srcs, ids = zip(*pairs, strict=True)
            for r in await conn.fetch(
                "SELECT e.id, e.source, e.event_id FROM events e JOIN unnest($1::text[], $2::text[]) AS k(s, i) "
                "ON e.source = k.s AND e.event_id = k.i",
                list(srcs),
                list(ids),
            ):
                stored[(r[1], r[2])] = r[0]
        keys = {(it.event.source, it.event.entity or "", it.event.entity_id) for op in ops for it in op.items}
        entities = await _read_entities(conn, {k for k in keys if k[2] is not None})  # type: ignore[misc]
        seen: set[tuple[str, str]] = set(stored)
        repeats: list[tuple[str, str, str | None]] = []
        accepted_by_op: list[list[_Prepared]] = []
        request_of: dict[tuple[str, str], str | None] = {}
        entity_rows: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        cursor_rows: dict[tuple[str, str], bytes] = {}
        counts: list[list[int]] = []
        bodies: dict[tuple[str, str], bytes] = {}
        for op in ops:
            accepted: list[_Prepared] = []
            dup = stale = 0
            for it in op.items:
                ev = it.event
                k = (ev.source, ev.id)
                if k in seen:
                    dup += 1
                    if op.cursor is None:
                        repeats.append((*k, op.request_id))
                    continue
                seen.add(k)
                # Serialised here, like the SQLite writer does: a failure fails this merged batch, which is
                # then retried op by op, so only the bad event's caller gets UnstorableEvent.
                bodies[k], h = _serialised(ev)
                if ev.entity_id is not None:
                    ek = (ev.source, ev.entity or "", ev.entity_id)
                    assert h is not None
                    known = entities.get(ek)
                    deleted = is_delete(ev)
                    try:
                        is_stale, keep = judge(known, it.version, h, deleted)
                    except VersionError as e:
                        assert known is not None and known.version is not None and it.version is not None
                        raise UnstorableEvent(
                            f"event {ev.id!r} of source {ev.source!r} cannot be stored: its version {ev.version!r} "
                            f"is a {version_key(it.version)[0]} but entity {ev.entity or ''}:{ev.entity_id} was last "
                            f"seen at version {known.version!r}, a {version_key(known.version)[0]}: a source must "
                            "give one form of version"
                        ) from e
                    if is_stale:
                        stale += 1
                        continue
                    entities[ek] = EntityVersion(keep, h, deleted, ev.id, now)
                    entity_rows[ek] = (keep, h, deleted, ev.id)
                accepted.append(it)
                request_of[k] = op.request_id
            if op.cursor is not None:
                cursor_rows[(op.cursor[0], op.cursor[1])] = op.cursor[2]
            accepted_by_op.append(accepted)
            counts.append([dup, stale])
        flat = [it for acc in accepted_by_op for it in acc]
        row_of: dict[tuple[str, str], int] = {}
        if flat:
            for r in await conn.fetch(
                "INSERT INTO events (source, event_id, type, entity_key, received_at, body, request_id) "
                "SELECT s, i, t, k, $5, b, r FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $6::bytea[], "
                "$7::text[]) AS x(s, i, t, k, b, r) ON CONFLICT (source, event_id) DO NOTHING "
                "RETURNING id, source, event_id",
                [it.event.source for it in flat],
                [it.event.id for it in flat],
                [it.event.type for it in flat],
                [it.event.entity_key for it in flat],
                now,
                [bodies[(it.event.source, it.event.id)] for it in flat],
                [request_of[(it.event.source, it.event.id)] for it in flat],
            ):
                row_of[(r[1], r[2])] = r[0]
        if not look_first and len(row_of) < len(flat):  # stored before this batch: duplicates, found afterwards
            again = [(op, it) for op, acc in zip(ops, accepted_by_op, strict=True) for it in acc]
            again = [(op, it) for op, it in again if (it.event.source, it.event.id) not in row_of]
            for r in await conn.fetch(
                "SELECT e.id, e.source, e.event_id FROM events e JOIN unnest($1::text[], $2::text[]) AS k(s, i) "
                "ON e.source = k.s AND e.event_id = k.i",
                [it.event.source for _, it in again],
                [it.event.id for _, it in again],
            ):
                stored[(r[1], r[2])] = r[0]
            repeats += [(it.event.source, it.event.id, op.request_id) for op, it in again if op.cursor is None]
        results: list[EnqueueResult] = []
        for acc, (dup, stale) in zip(accepted_by_op, counts, strict=True):
            raced = sum(1 for it in acc if (it.event.source, it.event.id) not in row_of)  # stored by another node
            results.append(EnqueueResult(len(acc) - raced, dup + raced, stale))
        lines = {(sink, it.event.entity_key) for it in flat if it.event.entity_id is not None for sink in it.sinks}
        busy: set[tuple[str, str]] = set()
        if lines:
            ls, lk = zip(*lines, strict=True)
            busy = {
                (r[0], r[1])
                for r in await conn.fetch(
                    "SELECT DISTINCT d.sink, d.entity_key FROM deliveries d JOIN unnest($1::text[], $2::text[]) "
                    "AS l(s, k) ON d.sink = l.s AND d.entity_key = l.k WHERE d.active",
                    list(ls),
                    list(lk),
                )
            }
        d_event: list[int] = []
        d_sink: list[str] = []
        d_key: list[str] = []
        d_ordered: list[bool] = []
        d_head: list[bool | None] = []
        for it in flat:
            row = row_of.get((it.event.source, it.event.id))
            if row is None:
                continue
            ordered = it.event.entity_id is not None
            for sink in it.sinks:
                head: bool | None = True
                if ordered:
                    line = (sink, it.event.entity_key)
                    if line in busy:
                        head = None
                    else:
                        busy.add(line)
                d_event.append(row)
                d_sink.append(sink)
                d_key.append(it.event.entity_key)
                d_ordered.append(ordered)
                d_head.append(head)
        if d_event:
            await conn.execute(  # the deliveries and the NOTIFY that wakes every node's dispatcher: one round trip
                "WITH d AS (INSERT INTO deliveries (event, sink, entity_key, ordered, state, created_at, "
                "next_attempt_at, updated_at, active, head) SELECT e, s, k, o, 'ready', $6, $6, $6, true, h "
                "FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bool[], $5::bool[]) AS x(e, s, k, o, h)) "
                "SELECT pg_notify($7, '')",
                d_event,
                d_sink,
                d_key,
                d_ordered,
                d_head,
                now,
                CHANNEL,
            )
        if repeats:
            rows = {**stored, **row_of}
            dup_rows = [(rows[(src, eid)], _again(rid)) for src, eid, rid in repeats if (src, eid) in rows]
            if dup_rows:
                await conn.execute(
                    "INSERT INTO audit (at, event, delivery, action, detail) SELECT $1, e, NULL, 'deduplicated', t "
                    "FROM unnest($2::bigint[], $3::text[]) AS x(e, t)",
                    now,
                    [r[0] for r in dup_rows],
                    [r[1] for r in dup_rows],
                )
        if entity_rows:
            ks = list(entity_rows)
            vs = [entity_rows[k] for k in ks]
            await conn.execute(
                "INSERT INTO entity_versions (source, entity, entity_id, version, hash, deleted, event_id, seen_at) "
                "SELECT s, e, i, v, h, d, x, $8 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
                "$5::text[], $6::bool[], $7::text[]) AS r(s, e, i, v, h, d, x) "
                "ON CONFLICT (source, entity, entity_id) DO UPDATE SET version = excluded.version, "
                "hash = excluded.hash, deleted = excluded.deleted, event_id = excluded.event_id, "
                "seen_at = excluded.seen_at",
                [k[0] for k in ks],
                [k[1] for k in ks],
                [k[2] for k in ks],
                [v[0] for v in vs],
                [v[1] for v in vs],
                [v[2] for v in vs],
                [v[3] for v in vs],
                now,
            )
        for (source, kind), blob in cursor_rows.items():
            await conn.execute(_CURSOR_UPSERT, source, kind, blob, now)
        return results, bool(d_event)

    async def lease(
        self,
        limit: int,
        lease_seconds: float,
        *,
        exclude: Iterable[str] = (),
        only: str | None = None,
        due_only: bool = True,
    ) -> list[Leased]:
        """Lease up to ``limit`` due line heads, oldest first, skipping rows another node is leasing."""
        excluded = sorted(exclude)

        now = self.clock()
        token = f"{self.owner}.{next(self._leases)}"
        # One statement, committed on its own: the rows, their leases and the events' bodies in one round trip.
        rows = await self._one(
            "WITH c AS (SELECT id FROM deliveries WHERE state = 'ready' AND head "
            "AND (NOT $5::bool OR next_attempt_at <= $1) AND ($6::text IS NULL OR sink = $6) "
            "AND sink <> ALL($7::text[]) ORDER BY next_attempt_at, id LIMIT $4 FOR UPDATE SKIP LOCKED) "
            "UPDATE deliveries d SET state = 'leased', lease_until = $2, lease_owner = $3, updated_at = $1 "
            "FROM c WHERE d.id = c.id RETURNING d.id, d.event, d.sink, d.attempts, d.created_at, "
            "(SELECT e.body FROM events e WHERE e.id = d.event)",
            now,
            now + lease_seconds,
            token,
            limit,
            due_only,
            only,
            excluded,
        )
        out = [Leased(r[0], r[1], r[2], r[3], r[4], Event.from_json(r[5]), token) for r in rows]
        out.sort(key=lambda d: d.id)
        return out

    async def complete(self, outcomes: Sequence[Outcome]) -> None:
        """Record what happened to leased deliveries (only those whose token still holds the lease)."""
        if not outcomes:
            return
        if all(o.kind == "done" and o.delivery.event.entity_id is None for o in outcomes):
            # The common batch (delivered, no entity line to move on, nothing to audit): one statement.
            done = await self._one(
                "UPDATE deliveries d SET state = 'done', active = NULL, head = NULL, attempts = d.attempts + 1, "
                "updated_at = $1, lease_until = NULL, lease_owner = NULL, last_error = NULL "
                "FROM unnest($2::bigint[], $3::text[]) AS u(id, tok) "
                "WHERE d.id = u.id AND d.state = 'leased' AND d.lease_owner = u.tok RETURNING d.id",
                self.clock(),
                [o.delivery.id for o in outcomes],
                [o.delivery.token for o in outcomes],
            )
            held = {r[0] for r in done}
            for o in outcomes:
                if o.delivery.id not in held:
                    log.warning(
                        "stale done for delivery %d ignored: its lease (%s) expired and was taken over",
                        o.delivery.id,
                        o.delivery.token or "no token",
                    )
            return

        async def op(conn: PgConn) -> bool:
            now = self.clock()
            keys = sorted({o.delivery.event.entity_key for o in outcomes if o.delivery.event.entity_id is not None})
            if keys:
                await conn.execute(_LOCK_KEYS, keys)
            held: set[int] = set()
            by_token: dict[str, list[int]] = {}
            for o in outcomes:
                by_token.setdefault(o.delivery.token, []).append(o.delivery.id)
            for token, ids in by_token.items():
                held.update(
                    r[0]
                    for r in await conn.fetch(
                        "SELECT id FROM deliveries WHERE id = ANY($1::bigint[]) AND state = 'leased' "
                        "AND lease_owner = $2 FOR UPDATE",
                        ids,
                        token,
                    )
                )
            changed = False
            audit: list[tuple[Any, ...]] = []
            rows: list[int] = []
            kinds: list[str] = []
            incs: list[int] = []
            dues: list[float | None] = []
            errors: list[str | None] = []
            for o in outcomes:
                d = o.delivery
                if d.id not in held:
                    log.warning(
                        "stale %s for delivery %d ignored: its lease (%s) expired and was taken over",
                        o.kind,
                        d.id,
                        d.token or "no token",
                    )
                    continue
                inc = 1 if o.kind in ("done", "dead") or (o.kind == "retry" and o.count_attempt) else 0
                rows.append(d.id)
                kinds.append(o.kind)
                incs.append(inc)
                dues.append((o.next_attempt_at or now) if o.kind == "retry" else None)
                errors.append(o.error)
                if o.kind == "retry":
                    audit.append((d.event_row, d.id, "retry" if inc else "deferred", o.error))
                elif o.kind == "dead":
                    audit.append((d.event_row, d.id, "dead", o.error))
                if o.kind in ("retry", "release"):
                    changed = True
            if rows:  # one statement for the whole batch, not one round trip per delivery
                await conn.execute(_COMPLETE, now, rows, kinds, incs, dues, errors)
            if audit:
                await _audit(conn, now, audit)
            finished = [
                o.delivery
                for o in outcomes
                if o.delivery.id in held and o.kind in ("done", "dead") and o.delivery.event.entity_id is not None
            ]
            if finished:
                promoted = await conn.fetch(
                    "UPDATE deliveries SET head = true WHERE id IN (SELECT min(d.id) FROM deliveries d "
                    "JOIN unnest($1::text[], $2::text[]) AS l(s, k) ON d.sink = l.s AND d.entity_key = l.k "
                    "WHERE d.active GROUP BY d.sink, d.entity_key) AND head IS NULL RETURNING id",
                    [d.sink for d in finished],
                    [d.event.entity_key for d in finished],
                )
                changed = changed or bool(promoted)
            if changed:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return changed

        if await self._tx(op):
            self.deliveries_ready.set()

    async def _release(self, owner: str | None, expired_before: float | None) -> int:
        async def op(conn: PgConn) -> int:
            rows = await conn.fetch(
                "UPDATE deliveries SET state = 'ready', lease_until = NULL, lease_owner = NULL, updated_at = $1 "
                "WHERE state = 'leased' AND ($2::text IS NULL OR starts_with(lease_owner, $2)) "
                "AND ($3::float8 IS NULL OR lease_until < $3) RETURNING id",
                self.clock(),
                None if owner is None else owner + ".",
                expired_before,
            )
            if rows:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return len(rows)

        return await self._tx(op)

    async def release_owned(self) -> int:
        """Hand back every lease this node holds (clean shutdown); other nodes' leases are theirs."""
        return await self._release(self.owner, None)

    async def reclaim_expired(self) -> int:
        """Make deliveries whose lease ran out ready again (their node died or hung)."""
        n = await self._release(None, self.clock())
        if n:
            log.warning("reclaimed %d deliveries whose lease expired", n)
            self.deliveries_ready.set()
        return n

    async def expedite(self, sink: str) -> int:
        """Make a sink's waiting retries due now (its breaker just closed)."""

        async def op(conn: PgConn) -> int:
            now = self.clock()
            rows = await conn.fetch(
                "UPDATE deliveries SET next_attempt_at = $1 WHERE state = 'ready' AND sink = $2 "
                "AND next_attempt_at > $1 RETURNING id",
                now,
                sink,
            )
            if rows:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return len(rows)

        n = await self._tx(op)
        if n:
            self.deliveries_ready.set()
        return n

    async def next_due(self, exclude: Iterable[str] = ()) -> float | None:
        rows = await self._fetch(
            "SELECT min(next_attempt_at) FROM deliveries WHERE state = 'ready' AND head AND sink <> ALL($1::text[])",
            sorted(exclude),
        )
        return None if rows[0][0] is None else float(rows[0][0])

    # --- cursors and the ledger -------------------------------------------------------------------

    async def cursor_get(self, source: str, kind: str = "poll") -> Any:
        fence = CURRENT.get()
        if fence is not None and not fence.locally_valid():
            # A poll starts by reading its cursor: a node that cannot be sure it still holds the source's
            # lease (it was paused, or could not renew) must not ask the provider again.
            why = f"lease {fence.lease} (token {fence.token}) lapsed before this node could renew it"
            fence.refused(why)
            raise LeaseLost(f"{why}; another node may hold it", lease=fence.lease, token=fence.token)
        rows = await self._fetch("SELECT value FROM cursors WHERE source = $1 AND kind = $2", source, kind)
        return orjson.loads(rows[0][0]) if rows else None

    async def cursor_set(self, source: str, value: Any, kind: str = "poll") -> None:
        blob = orjson.dumps(value)
        fence = CURRENT.get()

        async def op(conn: PgConn) -> None:
            if fence is not None:
                await _check_fence(conn, fence)
            if value is None:
                await conn.execute("DELETE FROM cursors WHERE source = $1 AND kind = $2", source, kind)
            else:
                await conn.execute(_CURSOR_UPSERT, source, kind, blob, self.clock())

        await self._tx(op)

    async def cursors(self) -> list[CursorRow]:
        rows = await self._fetch("SELECT source, kind, value, updated_at FROM cursors ORDER BY source, kind")
        return [CursorRow(r[0], r[1], orjson.loads(r[2]), r[3]) for r in rows]

    async def entity_versions(
        self, source: str, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], EntityVersion]:
        pool = self._pool_or_fail()
        async with pool.acquire() as conn:
            found = await _read_entities(conn, {(source, e, i) for e, i in keys})
        return {(k[1], k[2]): v for k, v in found.items()}

    # --- dead letters and operator views ----------------------------------------------------------

    async def dead_letters(self, sink: str | None = None, limit: int = 1000) -> list[DeadLetter]:
        rows = await self._fetch(
            "SELECT d.id, e.event_id, e.source, d.sink, d.attempts, d.updated_at, d.last_error FROM deliveries d "
            "JOIN events e ON e.id = d.event WHERE d.state = 'dead' AND ($1::text IS NULL OR d.sink = $1) "
            "ORDER BY d.id LIMIT $2",
            sink or None,
            limit,
        )
        return [DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], r[6] or "") for r in rows]

    async def delivery(self, delivery_id: int) -> DeliveryDetail | None:
        rows = await self._fetch(
            "SELECT d.id, d.sink, d.state, d.attempts, d.created_at, d.updated_at, d.next_attempt_at, "
            "d.last_error, e.body, e.id FROM deliveries d JOIN events e ON e.id = d.event WHERE d.id = $1",
            delivery_id,
        )
        if not rows:
            return None
        r = rows[0]
        audit = [
            AuditEntry(a[0], a[1], a[2], a[3])
            for a in await self._fetch(
                "SELECT at, delivery, action, detail FROM audit WHERE event = $1 "
                "AND (delivery = $2 OR delivery IS NULL) ORDER BY id",
                r[9],
                delivery_id,
            )
        ]
        if r[2] == "done" and r[7] is None:
            audit.append(AuditEntry(r[5], delivery_id, "delivered", f"sink={r[1]} attempts={r[3]}"))
        return DeliveryDetail(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], Event.from_json(r[8]), audit)

    async def replay(
        self, ids: Sequence[int] | None = None, sink: str | None = None, *, include_superseded: bool = True
    ) -> ReplayResult:
        """Make dead deliveries ready again (attempts reset); superseded ones stay dead if asked."""

        async def op(conn: PgConn) -> ReplayResult:
            now = self.clock()
            rows = await _dead_rows(conn, ids, sink)
            keys = sorted({r[6] for r in rows})
            if keys:
                await conn.execute(_LOCK_KEYS, keys)
                rows = await _dead_rows(conn, ids, sink)  # as committed once the lines are ours
            overtaken: list[int] = []
            if not include_superseded and rows:
                events = {r[0]: Event.from_json(r[4]) for r in rows}
                known = await _read_entities(
                    conn,
                    {(e.source, e.entity or "", e.entity_id) for e in events.values() if e.entity_id is not None},
                )
                for r in rows:
                    ev = events[r[0]]
                    if ev.entity_id is None:
                        continue
                    try:
                        if superseded(known.get((ev.source, ev.entity or "", ev.entity_id)), ev):
                            overtaken.append(r[0])
                    except VersionError as e:
                        log.warning("replay: cannot tell whether delivery %d is superseded: %s", r[0], e)
                rows = [r for r in rows if r[0] not in overtaken]
            if rows:
                await conn.execute(
                    "UPDATE deliveries SET state = 'ready', active = true, head = NULL, attempts = 0, "
                    "next_attempt_at = $1, updated_at = $1, created_at = $1 WHERE id = ANY($2::bigint[])",
                    now,
                    [r[0] for r in rows],
                )
                for line in sorted({(r[5], r[6]) for r in rows}):
                    await _settle_head(conn, *line)
                await _audit(
                    conn, now, [(r[1], r[0], "replayed", f"after {r[2]} attempts; last error: {r[3]}") for r in rows]
                )
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return ReplayResult(len(rows), overtaken)

        result = await self._tx(op)
        if result.replayed:
            self.deliveries_ready.set()
        return result

    async def purge(self, ids: Sequence[int] | None = None, sink: str | None = None) -> int:
        async def op(conn: PgConn) -> int:
            now = self.clock()
            rows = await _dead_rows(conn, ids, sink)
            if rows:
                await conn.execute(
                    "UPDATE deliveries SET state = 'done', active = NULL, updated_at = $1, "
                    "last_error = 'purged from the DLQ' WHERE id = ANY($2::bigint[]) AND state = 'dead'",
                    now,
                    [r[0] for r in rows],
                )
                await _audit(conn, now, [(r[1], r[0], "purged", None) for r in rows])
            return len(rows)

        return await self._tx(op)

    def record_rejection(
        self, source: str, status: int, reason: str, remote: str | None, headers: dict[str, str], keep: int
    ) -> None:
        """Remember a refused webhook without waiting: a bounded buffer, flushed by one task at a time."""
        if self.role == "reader" or self._pool is None or self._closing or keep <= 0:
            return
        if len(self._rejections) == self._rejections.maxlen:
            self.rejections_dropped += 1
        self._rejections.append((self.clock(), source, status, reason, remote, orjson.dumps(headers).decode()))
        self._rejections_keep = keep
        if self._rejection_task is None or self._rejection_task.done():
            self._rejection_task = asyncio.create_task(self._flush_rejections())

    async def _flush_rejections(self) -> None:
        rows = list(self._rejections)
        self._rejections.clear()

        async def op(conn: PgConn) -> None:
            await conn.executemany(
                "INSERT INTO rejections (at, source, status, reason, remote, headers) VALUES ($1, $2, $3, $4, $5, $6)",
                rows,
            )
            await conn.execute(
                "DELETE FROM rejections WHERE id <= (SELECT max(id) FROM rejections) - $1", self._rejections_keep
            )

        try:
            await self._tx(op)
        except Exception as e:
            log.warning("could not record a rejected webhook: %s", e)

    async def rejections(self, limit: int = 50, source: str | None = None) -> list[Rejection]:
        rows = await self._fetch(
            "SELECT at, source, status, reason, remote, headers FROM rejections "
            "WHERE ($1::text IS NULL OR source = $1) ORDER BY id DESC LIMIT $2",
            source or None,
            limit,
        )
        return [Rejection(r[0], r[1], r[2], r[3], r[4], orjson.loads(r[5])) for r in rows]

    async def events_since(
        self, since: float, *, after: int = 0, limit: int = 1000, source: str | None = None
    ) -> list[tuple[int, Event]]:
        """Retained events received at or after ``since``, oldest first, from row ``after`` on (``integrand replay``)."""
        rows = await self._fetch(
            "SELECT id, body FROM events WHERE received_at >= $1 AND id > $2 AND ($3::text IS NULL OR source = $3) "
            "ORDER BY id LIMIT $4",
            since,
            after,
            source,
            limit,
        )
        return [(int(r[0]), Event.from_json(r[1])) for r in rows]

    async def counts(self) -> dict[tuple[str, str], int]:
        rows = await self._fetch("SELECT sink, state, count(*) FROM deliveries GROUP BY sink, state")
        return {(r[0], r[1]): r[2] for r in rows}

    async def event_count(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM events")
        return int(rows[0][0])

    # --- retention and connector state ------------------------------------------------------------

    async def prune(self, older_than: float, chunk: int = 200) -> int:
        """One step of a retention pass (the contract of ``Retention.prune``): >0 rows deleted, 0 at its end."""
        phases = _PRUNE_PHASES
        if self._prune_at[0] == "over":
            self._prune_at = (phases[0], None)
            return 0
        while True:
            phase, pos = self._prune_at
            step = functools.partial(_PRUNE[phase], older_than, pos, chunk)
            deleted, nxt = await self._tx(step)
            self.pruned[phase] += deleted
            if nxt is None:
                following = phases[phases.index(phase) + 1 :]
                if not following:
                    self._prune_at = ("over", None) if deleted else (phases[0], None)
                    return deleted
                self._prune_at = (following[0], None)
            else:
                self._prune_at = (phase, nxt)
            if deleted:
                return deleted

    async def state_get(self, scope: str, key: str) -> Any:
        rows = await self._fetch("SELECT value FROM state WHERE scope = $1 AND key = $2", scope, key)
        return orjson.loads(rows[0][0]) if rows else None

    async def state_set(self, scope: str, key: str, value: Any) -> None:
        blob = orjson.dumps(value)
        fence = CURRENT.get()

        async def op(conn: PgConn) -> None:
            if fence is not None:
                await _check_fence(conn, fence)
            await conn.execute(
                "INSERT INTO state (scope, key, value, updated_at) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                scope,
                key,
                blob,
                self.clock(),
            )

        await self._tx(op)

    # --- nodes and singleton leases (integrand.ownership) -----------------------------------------

    async def heartbeat(self, node: NodeInfo) -> tuple[float, list[NodeRow]]:
        """Record that ``node`` is alive now (the database's clock); every node row as it stands, and now."""

        async def op(conn: PgConn) -> tuple[float, list[NodeRow]]:
            await conn.execute(
                "INSERT INTO nodes (node_id, store_owner, host, pid, version, started_at, heartbeat_at) "
                "VALUES ($1, $2, $3, $4, $5, integrand_now(), integrand_now()) ON CONFLICT (node_id) DO UPDATE SET "
                "store_owner = excluded.store_owner, host = excluded.host, pid = excluded.pid, "
                "version = excluded.version, heartbeat_at = excluded.heartbeat_at, "
                "started_at = CASE WHEN nodes.store_owner = excluded.store_owner THEN nodes.started_at "
                "ELSE excluded.started_at END",
                node.node_id,
                self.owner,
                node.host,
                node.pid,
                node.version,
            )
            return await _nodes(conn)

        return await self._tx(op)

    async def nodes(self) -> tuple[float, list[NodeRow]]:
        """The nodes' rows and the database's now (for ``integrand status``; read-only)."""
        pool = self._pool_or_fail()
        try:
            async with pool.acquire() as conn:
                if await conn.fetchval("SELECT to_regclass('nodes')") is None:
                    return time.time(), []  # a store from before version 3: no node has run on it yet
                return await _nodes(conn)
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"the PostgreSQL store cannot be read: {type(e).__name__}: {e}") from None

    async def leases(self) -> list[LeaseRow]:
        rows = await self._fetch(
            "SELECT name, owner, token, expires_at - integrand_now(), acquired_at, renewed_at FROM leases ORDER BY name"
        )
        return [LeaseRow(r[0], r[1], int(r[2]), float(r[3]), r[4], r[5]) for r in rows]

    async def acquire_lease(self, name: str, node_id: str, ttl: float) -> int | None:
        """Take lease ``name`` if nobody holds it (or its holder let it lapse): its new, larger token, else None."""
        rows = await self._tx(
            lambda c: c.fetch(
                "INSERT INTO leases AS l (name, owner, token, expires_at, acquired_at, renewed_at) "
                "VALUES ($1, $2, 1, integrand_now() + $3, integrand_now(), integrand_now()) ON CONFLICT (name) DO UPDATE SET "
                "owner = excluded.owner, token = l.token + 1, expires_at = excluded.expires_at, "
                "acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at "
                "WHERE l.expires_at <= integrand_now() RETURNING token",
                name,
                node_id,
                ttl,
            )
        )
        return int(rows[0][0]) if rows else None

    async def renew_leases(self, held: dict[str, int], ttl: float) -> set[str]:
        """Extend the leases this node holds (name → token) that have not lapsed; the names still held."""
        if not held:
            return set()
        names = sorted(held)
        rows = await self._tx(
            lambda c: c.fetch(
                "UPDATE leases l SET expires_at = integrand_now() + $3, renewed_at = integrand_now() "
                "FROM unnest($1::text[], $2::bigint[]) AS h(n, t) "
                "WHERE l.name = h.n AND l.token = h.t AND l.expires_at > integrand_now() RETURNING l.name",
                names,
                [held[n] for n in names],
                ttl,
            )
        )
        return {r[0] for r in rows}

    async def release_lease(self, name: str, token: int) -> bool:
        """Give a lease up now (a clean stop, a rebalance): another node may take it at once."""
        rows = await self._tx(
            lambda c: c.fetch(
                "WITH r AS (UPDATE leases SET owner = NULL, expires_at = integrand_now() WHERE name = $1 "
                "AND token = $2 RETURNING 1) SELECT pg_notify($3, $1) FROM r",
                name,
                token,
                LEASES_CHANNEL,
            )
        )
        return bool(rows)

    async def forget_node(self, node_id: str, *, dead_after: float | None) -> int:
        """Remove a node's row; with ``dead_after``, only if its heartbeat is that many seconds old, and then
        its leased deliveries are made ready again at once (it died: no need to wait for their leases)."""

        async def op(conn: PgConn) -> int:
            rows = await conn.fetch(
                "DELETE FROM nodes WHERE node_id = $1 AND ($2::float8 IS NULL OR heartbeat_at < "
                "integrand_now() - $2) RETURNING store_owner",
                node_id,
                dead_after,
            )
            if not rows or dead_after is None:
                return 0
            freed = await conn.fetch(
                "UPDATE deliveries SET state = 'ready', lease_until = NULL, lease_owner = NULL, updated_at = $1 "
                "WHERE state = 'leased' AND starts_with(lease_owner, $2) RETURNING id",
                self.clock(),
                rows[0][0] + ".",
            )
            if freed:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return len(freed)

        n = await self._tx(op)
        if n:
            self.deliveries_ready.set()
        return n


@dataclass(frozen=True)
class NodeInfo:
    """What a node says about itself in the ``nodes`` table."""

    node_id: str
    host: str
    pid: int
    version: str


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    host: str
    pid: int
    version: str
    started_at: float
    heartbeat_age: float  # seconds since its last heartbeat, by the database's clock


@dataclass(frozen=True)
class LeaseRow:
    name: str
    owner: str | None
    token: int
    expires_in: float  # seconds until it lapses (negative: lapsed), by the database's clock
    acquired_at: float
    renewed_at: float


async def _nodes(conn: PgConn) -> tuple[float, list[NodeRow]]:
    now = float(await conn.fetchval("SELECT integrand_now()"))
    rows = await conn.fetch("SELECT node_id, host, pid, version, started_at, heartbeat_at FROM nodes ORDER BY node_id")
    return now, [NodeRow(r[0], r[1], r[2], r[3], r[4], max(0.0, now - r[5])) for r in rows]


async def _check_fence(conn: PgConn, fence: Fence) -> None:
    """Refuse this transaction unless ``fence`` still holds its lease (row locked until the commit)."""
    ok = await conn.fetchval(
        "SELECT 1 FROM leases WHERE name = $1 AND token = $2 AND expires_at > integrand_now() FOR SHARE",
        fence.lease,
        fence.token,
    )
    if ok:
        return
    row = await conn.fetchrow(
        "SELECT owner, token, expires_at > integrand_now() FROM leases WHERE name = $1", fence.lease
    )
    now_held = (
        f"node {row[0]} holds it with token {row[1]}" if row is not None and row[2] and row[0] else "nobody holds it"
    )
    why = f"lease {fence.lease}: token {fence.token} is stale ({now_held})"
    if fence.lost:  # queued before this node handed the lease back or lost it: already stopped, nothing new
        log.info("commit refused by the fencing token: %s (queued before this node gave the singleton up)", why)
    else:
        log.warning("commit refused by the fencing token: %s; this node stops the singleton", why)
    fence.refused(why)
    raise LeaseLost(f"commit refused: {why}", lease=fence.lease, token=fence.token)


async def _keep_session(_conn: object) -> None:
    """A pool connection handed back is not reset (asyncpg's default sends ``pg_advisory_unlock_all(); CLOSE
    ALL; UNLISTEN *; RESET ALL`` each time: one more round trip and four statements per transaction). The
    store keeps no session state on pool connections: its locks are transaction-scoped
    (``pg_advisory_xact_lock``), it sets nothing with ``SET`` and LISTENs on a connection of its own. An
    open transaction is still rolled back by the pool before this is called."""


def _display(dsn: str) -> str:
    """A DSN fit to show: scheme, host, port and database, never the user's password or the query."""
    u = urllib.parse.urlsplit(dsn)
    if not u.scheme.startswith("postgres"):
        return "a PostgreSQL database (DSN not shown)"
    host = u.hostname or "localhost"
    return f"{u.scheme or 'postgresql'}://{host}{':' + str(u.port) if u.port else ''}{u.path}"


# What ``complete`` records, per delivery: done and dead end its line's turn (active and head cleared),
# retry waits for its due time, release hands the lease back; a counted attempt adds one.
_COMPLETE = (
    "UPDATE deliveries d SET "
    "state = CASE u.k WHEN 'done' THEN 'done' WHEN 'dead' THEN 'dead' ELSE 'ready' END, "
    "active = CASE WHEN u.k IN ('done', 'dead') THEN NULL ELSE d.active END, "
    "head = CASE WHEN u.k IN ('done', 'dead') THEN NULL ELSE d.head END, "
    "attempts = d.attempts + u.inc, "
    "next_attempt_at = CASE WHEN u.k = 'retry' THEN u.due ELSE d.next_attempt_at END, "
    "updated_at = $1, "
    "last_error = CASE u.k WHEN 'done' THEN NULL WHEN 'release' THEN d.last_error ELSE u.err END, "
    "lease_until = NULL, lease_owner = NULL "
    "FROM unnest($2::bigint[], $3::text[], $4::int[], $5::float8[], $6::text[]) AS u(id, k, inc, due, err) "
    "WHERE d.id = u.id"
)

_CURSOR_UPSERT = (
    "INSERT INTO cursors (source, kind, value, updated_at) VALUES ($1, $2, $3, $4) "
    "ON CONFLICT (source, kind) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
)


async def _read_entities(conn: PgConn, keys: set[tuple[str, str, str]]) -> dict[tuple[str, str, str], EntityVersion]:
    if not keys:
        return {}
    s, e, i = zip(*keys, strict=True)
    rows = await conn.fetch(
        "SELECT v.source, v.entity, v.entity_id, v.version, v.hash, v.deleted, v.event_id, v.seen_at "
        "FROM entity_versions v JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(s, e, i) "
        "ON v.source = k.s AND v.entity = k.e AND v.entity_id = k.i",
        list(s),
        list(e),
        list(i),
    )
    return {(r[0], r[1], r[2]): EntityVersion(r[3], r[4], r[5], r[6], r[7]) for r in rows}


async def _audit(conn: PgConn, now: float, rows: Sequence[tuple[Any, ...]]) -> None:
    await conn.executemany(
        "INSERT INTO audit (at, event, delivery, action, detail) VALUES ($1, $2, $3, $4, $5)",
        [(now, *r) for r in rows],
    )


async def _dead_rows(conn: PgConn, ids: Sequence[int] | None, sink: str | None) -> list[asyncpg.Record]:
    """Dead deliveries as (id, event, attempts, last_error, body, sink, entity key)."""
    return list(
        await conn.fetch(
            "SELECT d.id, d.event, d.attempts, d.last_error, e.body, d.sink, d.entity_key FROM deliveries d "
            "JOIN events e ON e.id = d.event WHERE d.state = 'dead' AND ($1::bigint[] IS NULL OR d.id = ANY($1)) "
            "AND ($2::text IS NULL OR d.sink = $2) ORDER BY d.id",
            None if ids is None else list(ids),
            sink or None,
        )
    )


async def _settle_head(conn: PgConn, sink: str, key: str) -> None:
    """The oldest active delivery of a line becomes its head, unless one of the line is in flight."""
    rows = await conn.fetch(
        "SELECT id, state, head FROM deliveries WHERE sink = $1 AND entity_key = $2 AND active", sink, key
    )
    if not rows or any(r[1] == "leased" and r[2] for r in rows):
        return
    oldest = min(r[0] for r in rows)
    # Two statements: the unique index on heads is checked row by row.
    await conn.execute(
        "UPDATE deliveries SET head = NULL WHERE sink = $1 AND entity_key = $2 AND active AND head AND id <> $3",
        sink,
        key,
        oldest,
    )
    await conn.execute("UPDATE deliveries SET head = true WHERE id = $1 AND head IS NULL", oldest)


async def _prune_events(older_than: float, after: Any, chunk: int, conn: PgConn) -> tuple[int, Any]:
    at, last = after if after is not None else (float("-inf"), 0)
    rows = await conn.fetch(
        "SELECT p.id, p.received_at, EXISTS (SELECT 1 FROM deliveries d WHERE d.event = p.id AND d.state <> 'done') "
        "FROM events p WHERE (p.received_at, p.id) > ($1, $2) AND p.received_at < $3 "
        "ORDER BY p.received_at, p.id LIMIT $4",
        at,
        last,
        older_than,
        chunk,
    )
    ids = [r[0] for r in rows if not r[2]]
    if ids:
        await conn.execute("DELETE FROM deliveries WHERE event = ANY($1::bigint[])", ids)
        await conn.execute("DELETE FROM audit WHERE event = ANY($1::bigint[])", ids)
        await conn.execute("DELETE FROM events WHERE id = ANY($1::bigint[])", ids)
    return len(ids), ((rows[-1][1], rows[-1][0]) if len(rows) == chunk else None)


async def _prune_tombstones(older_than: float, after: Any, chunk: int, conn: PgConn) -> tuple[int, Any]:
    n = len(
        await conn.fetch(
            "DELETE FROM entity_versions WHERE (source, entity, entity_id) IN (SELECT source, entity, entity_id "
            "FROM entity_versions WHERE deleted AND seen_at < $1 LIMIT $2) RETURNING 1",
            older_than,
            chunk,
        )
    )
    return n, (True if n == chunk else None)


async def _prune_loop_guard(older_than: float, after: Any, chunk: int, conn: PgConn) -> tuple[int, Any]:
    n = len(
        await conn.fetch(
            "DELETE FROM state WHERE (scope, key) IN (SELECT scope, key FROM state "
            "WHERE substr(scope, 1, 11) = 'loop-guard:' AND updated_at < $1 LIMIT $2) RETURNING 1",  # LOOP_GUARD_SCOPE
            older_than,
            chunk,
        )
    )
    return n, (True if n == chunk else None)


async def _prune_sagas(older_than: float, after: Any, chunk: int, conn: PgConn) -> tuple[int, Any]:
    """Saga records not written since ``older_than`` whose event retention has deleted (see retention.py)."""
    rows = await conn.fetch(
        "SELECT key, updated_at FROM state WHERE scope = $1 AND key > $2 ORDER BY key LIMIT $3",
        SAGA_SCOPE,
        after or "",
        chunk,
    )
    old = [(r[0], saga_event(r[0])) for r in rows if r[1] < older_than]
    named = [(k, n) for k, n in old if n is not None]
    gone: list[str] = []
    if named:
        found = await conn.fetch(
            "SELECT s.key FROM unnest($1::text[], $2::text[], $3::text[]) AS s(key, source, event_id) "
            "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.source = s.source AND e.event_id = s.event_id)",
            [k for k, _ in named],
            [n[0] for _, n in named],
            [n[1] for _, n in named],
        )
        gone = [r[0] for r in found]
    if gone:
        await conn.execute("DELETE FROM state WHERE scope = $1 AND key = ANY($2::text[])", SAGA_SCOPE, gone)
    return len(gone), (rows[-1][0] if len(rows) == chunk else None)


_PRUNE: dict[str, Callable[[float, Any, int, PgConn], Awaitable[tuple[int, Any]]]] = {
    "events": _prune_events,
    "tombstones": _prune_tombstones,
    "loop_guard": _prune_loop_guard,
    "sagas": _prune_sagas,
}
