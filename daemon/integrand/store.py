"""The durable queue and state in SQLite: events, deliveries, audit, rejections, connector state.

One writer task owns the write connection. Every state change (enqueue, lease,
ack, retry, replay…) is an *op* handed to it; ops that arrive while a commit is in
flight are applied together in the next transaction (group commit), and each
caller is released only after the commit that holds its rows. Nothing outside
this module writes SQL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import hashlib
import itertools
import logging
import os
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import aiosqlite
import orjson

from .errors import PermanentError, StoreUnavailable
from .events import Event

log = logging.getLogger("integrand.store")
T = TypeVar("T")
ReadConn = aiosqlite.Connection


class _Cursor:
    """A finished sqlite3 cursor dressed as aiosqlite's: awaitable and an async context manager."""

    __slots__ = ("_cur",)

    def __init__(self, cur: sqlite3.Cursor):
        self._cur = cur

    def __await__(self) -> Generator[Any, None, _Cursor]:
        if False:  # pragma: no cover - makes this a generator that returns at once
            yield
        return self

    async def __aenter__(self) -> _Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    async def fetchone(self) -> Any:
        return self._cur.fetchone()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cur.lastrowid


class Conn:
    """The write connection as store ops see it: aiosqlite's API, each statement run synchronously.

    Ops are coroutines that only ever await this object, so they never suspend: the writer runs a
    transaction's ops to completion on the loop (see ``Store._commit``) and hands only its COMMIT
    to the store's thread.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: sqlite3.Connection):
        self.raw = raw

    def execute(self, sql: str, params: Any = ()) -> _Cursor:
        return _Cursor(self.raw.execute(sql, params))

    async def execute_fetchall(self, sql: str, params: Any = ()) -> list[Any]:
        return self.raw.execute(sql, params).fetchall()

    async def executemany(self, sql: str, seq: Iterable[Any]) -> _Cursor:
        return _Cursor(self.raw.executemany(sql, seq))

    async def insert_rows(self, head: str, rows: Sequence[Sequence[Any]], tail: str = "") -> None:
        """``head VALUES (…), (…), … tail`` in a few statements rather than executemany's one step per row.

        The sqlite3 module releases and retakes the GIL around every ``sqlite3_step``; with the
        event loop busy, each of those is a hand-off between threads (two context switches)."""
        for start, size in _chunks(len(rows)):
            chunk = rows[start : start + size]
            self.raw.execute(_values_sql(head, len(chunk[0]), size, tail), [v for row in chunk for v in row])

    async def insert_returning(self, head: str, rows: Sequence[Sequence[Any]], returning: str) -> list[Any]:
        """``insert_rows`` that gives back ``RETURNING returning`` of every row inserted (in no set order)."""
        out: list[Any] = []
        for start, size in _chunks(len(rows)):
            chunk = rows[start : start + size]
            sql = _values_sql(head, len(chunk[0]), size, f" RETURNING {returning}")
            out.extend(self.raw.execute(sql, [v for row in chunk for v in row]).fetchall())
        return out

    async def select_ids(self, head: str, params: Sequence[Any], ids: Sequence[int]) -> list[Any]:
        """``head AND id IN (…)`` (head ends in a WHERE clause) for many ids in a few statements."""
        out: list[Any] = []
        for start, size in _chunks(len(ids)):
            sql = _in_sql(head, size).replace(" WHERE id IN", " AND id IN", 1)
            out.extend(self.raw.execute(sql, [*params, *ids[start : start + size]]).fetchall())
        return out

    async def update_ids(self, head: str, params: Sequence[Any], ids: Sequence[int]) -> None:
        """``head WHERE id IN (…)`` for many ids in a few statements (see ``insert_rows`` for why)."""
        for start, size in _chunks(len(ids)):
            self.raw.execute(_in_sql(head, size), [*params, *ids[start : start + size]])


_CHUNK_SIZES = (256, 64, 16, 4, 1)
CHECKPOINT_EVERY = 1.0  # seconds between background WAL checkpoints while commits are happening
WAL_MAX_FRAMES = 8192  # 32 MiB of 4 KiB pages: past this the writer checkpoints in line once


@contextlib.contextmanager
def _rolled_back_on_error(raw: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """The open transaction is rolled back if the block fails (on the loop or on the store's thread)."""
    try:
        yield raw
    except BaseException:
        with contextlib.suppress(Exception):
            raw.execute("ROLLBACK")
        raise


def _chunks(n: int) -> list[tuple[int, int]]:
    """(start, size) pieces of n rows, sizes from a short fixed list so the statement cache stays small."""
    out, start = [], 0
    while start < n:
        size = next(c for c in _CHUNK_SIZES if c <= n - start)
        out.append((start, size))
        start += size
    return out


@functools.lru_cache(maxsize=256)
def _values_sql(head: str, width: int, count: int, tail: str) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([row] * count)}{tail}"


@functools.lru_cache(maxsize=256)
def _in_sql(head: str, count: int) -> str:
    return f"{head} WHERE id IN ({','.join('?' * count)})"


def _drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a store op to completion on this thread; it must not suspend (it awaits only ``Conn``)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a store op suspended: ops may await only the connection")


MIGRATIONS: list[str] = [
    # 1: the queue
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        event_id TEXT NOT NULL,
        type TEXT NOT NULL,
        entity_key TEXT NOT NULL,
        received_at REAL NOT NULL,
        body BLOB NOT NULL,
        UNIQUE (source, event_id)
    );
    CREATE INDEX events_received ON events (received_at);
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        event INTEGER NOT NULL,
        sink TEXT NOT NULL,
        entity_key TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'done', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        lease_until REAL,
        lease_owner TEXT,
        last_error TEXT
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at, id) WHERE state = 'ready';
    CREATE INDEX deliveries_active ON deliveries (sink, entity_key, id) WHERE state IN ('ready', 'leased');
    CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE state = 'leased';
    CREATE INDEX deliveries_dead ON deliveries (sink, id) WHERE state = 'dead';
    CREATE INDEX deliveries_event ON deliveries (event);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        event INTEGER NOT NULL,
        delivery INTEGER,
        action TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX audit_event ON audit (event);
    CREATE TABLE rejections (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        source TEXT NOT NULL,
        status INTEGER NOT NULL,
        reason TEXT NOT NULL,
        remote TEXT,
        headers TEXT NOT NULL
    );
    CREATE TABLE state (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (scope, key)
    ) WITHOUT ROWID;
    """,
    # 2: the pull side. A cursor (kind 'poll' or 'reconcile') is opaque JSON owned by the connector and
    # is only ever written in the transaction that stores the events it produced. entity_versions is the
    # last version and content hash seen per entity: it drops stale and repeated changes and is what
    # reconciliation compares the remote state with.
    """
    CREATE TABLE cursors (
        source TEXT NOT NULL,
        kind TEXT NOT NULL,
        value BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (source, kind)
    ) WITHOUT ROWID;
    CREATE TABLE entity_versions (
        source TEXT NOT NULL,
        entity TEXT NOT NULL,
        entity_id TEXT NOT NULL,
        version TEXT,
        hash TEXT NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        event_id TEXT NOT NULL,
        seen_at REAL NOT NULL,
        PRIMARY KEY (source, entity, entity_id)
    ) WITHOUT ROWID;
    """,
    # 3: per-entity order keyed on a column that leasing does not touch. The old index's WHERE named
    # `state`, so leasing (ready -> leased) rewrote each delivery's entry, and a lease of 100 dirtied
    # up to 100 pages scattered by entity key. `active` is 1 while a delivery is ready or leased and
    # NULL once it is done or dead: only those two final changes touch the index now.
    """
    ALTER TABLE deliveries ADD COLUMN active INTEGER DEFAULT 1;
    UPDATE deliveries SET active = NULL WHERE state IN ('done', 'dead');
    DROP INDEX deliveries_active;
    CREATE INDEX deliveries_active ON deliveries (sink, entity_key, id) WHERE active = 1;
    """,
    # 4: the head of each entity line is marked, so leasing reads only heads. Finding heads with NOT
    # EXISTS walked every blocked row behind a head in backoff (213 ms for 100,000 changes to one
    # entity). `head` is 1 on the one active delivery of a (sink, entity key) line that may be leased
    # (the oldest, or the one in flight), NULL otherwise; it moves when the head is done or dead.
    """
    ALTER TABLE deliveries ADD COLUMN head INTEGER;
    UPDATE deliveries SET head = 1 WHERE active = 1 AND NOT EXISTS (
        SELECT 1 FROM deliveries p WHERE p.sink = deliveries.sink AND p.entity_key = deliveries.entity_key
        AND p.active = 1 AND p.id < deliveries.id);
    DROP INDEX deliveries_due;
    CREATE INDEX deliveries_heads ON deliveries (next_attempt_at, id) WHERE state = 'ready' AND head = 1;
    """,
    # 5: retention reaches delete markers and the loop guard's memory, by age, through an index each.
    """
    CREATE INDEX entity_tombstones ON entity_versions (seen_at) WHERE deleted = 1;
    CREATE INDEX state_loop_guard_age ON state (updated_at) WHERE substr(scope, 1, 11) = 'loop-guard:';
    """,
]

# Primary result codes that mean "the store cannot commit right now" (the listener answers 503 and the
# sender retries) rather than "this op is wrong": disk or size limit full, locked past busy_timeout,
# I/O error, read-only, cannot open.
_UNAVAILABLE_CODES = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR}
    | {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN}
)


def _sqlite_code(e: BaseException) -> int | None:
    """The primary SQLite result code of an error (extended codes carry it in their low byte)."""
    code = getattr(e, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _unavailable(e: BaseException) -> bool:
    """Whether a SQLite error means the store is unavailable, not that the op failed on its own.

    "no such table" is SQLITE_ERROR like any bad statement; here it means the file was replaced
    or truncated under the daemon, so it is matched by its text."""
    return isinstance(e, sqlite3.Error) and (_sqlite_code(e) in _UNAVAILABLE_CODES or "no such table" in str(e))


class EnqueueResult(NamedTuple):
    """What an enqueue stored; ``stale`` counts changes the entity table shows as older or already seen.

    A NamedTuple rather than a frozen dataclass: one is built per webhook, and a tuple is built in C."""

    accepted: int
    duplicates: int
    stale: int = 0


@dataclass(frozen=True, slots=True)
class EntityVersion:
    """The last change integrand stored for one entity of a source."""

    version: str | None
    hash: str
    deleted: bool
    event_id: str
    seen_at: float


@dataclass(frozen=True, slots=True)
class CursorRow:
    source: str
    kind: str
    value: Any
    updated_at: float


def version_newer(a: str, b: str) -> bool:
    """Whether version ``a`` is newer than ``b``: numerically when both are numbers, else as strings (ISO times)."""
    try:
        return float(a) > float(b)
    except ValueError:
        return a > b


def _superseded(known: EntityVersion | None, version: str | None, h: str) -> bool:
    if known is None or version is None or known.version is None:
        return False
    return version_newer(known.version, version) or (known.version == version and known.hash == h)


def is_delete(ev: Event) -> bool:
    """Whether an event reports that its entity was deleted (type ``….deleted`` or ``meta.deleted``)."""
    return bool(ev.meta.get("deleted")) or ev.type.rsplit(".", 1)[-1] in ("deleted", "delete", "removed")


def data_hash(ev: Event) -> str:
    """A content hash of an event's data (plus its deletedness) to tell a repeat from a change."""
    return hashlib.sha256(
        orjson.dumps(ev.data, option=orjson.OPT_SORT_KEYS) + (b"D" if is_delete(ev) else b"")
    ).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """How many dead deliveries were made ready, and which were left dead as superseded."""

    replayed: int
    superseded: list[int]


@dataclass(frozen=True, slots=True)
class Leased:
    """A delivery leased to this process: deliver it, then report an Outcome."""

    id: int
    event_row: int
    sink: str
    attempts: int
    created_at: float
    event: Event
    token: str = ""  # the lease's fencing token: complete() ignores an outcome whose lease is no longer held


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a leased delivery.

    ``done`` delivered; ``retry`` try again at ``next_attempt_at`` (``count_attempt``
    False when the failure was not the delivery's fault, e.g. a breaker probe);
    ``dead`` dead-lettered; ``release`` handed back untouched (shutdown).
    """

    delivery: Leased
    kind: Literal["done", "retry", "dead", "release"]
    error: str | None = None
    next_attempt_at: float | None = None
    count_attempt: bool = True


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    event_id: str
    source: str
    sink: str
    attempts: int
    updated_at: float
    last_error: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float
    delivery: int | None
    action: str
    detail: str | None


@dataclass(frozen=True, slots=True)
class DeliveryDetail:
    id: int
    sink: str
    state: str
    attempts: int
    created_at: float
    updated_at: float
    next_attempt_at: float
    last_error: str | None
    event: Event
    audit: list[AuditEntry]


@dataclass(frozen=True, slots=True)
class Rejection:
    at: float
    source: str
    status: int
    reason: str
    remote: str | None
    headers: dict[str, str]


class _Op:
    __slots__ = ("alone", "fn", "future", "rows")

    def __init__(
        self,
        fn: Callable[[Conn], Coroutine[Any, Any, Any]] | None,
        rows: int,
        future: asyncio.Future[Any] | None,
        alone: bool = False,
    ):
        self.fn = fn
        self.rows = rows
        self.future = future
        self.alone = alone  # committed in a transaction of its own: its failure must not fail anyone else's op


class UnstorableEvent(PermanentError):
    """An event the store cannot hold (its data is not JSON-serialisable): a connector bug, refused alone."""


class _Prepared(NamedTuple):
    """An event serialised before it is queued, so a bad one fails its own caller, not a group commit."""

    event: Event
    sinks: Sequence[str]
    body: bytes
    hash: str | None  # content hash, for events with an entity only


def _prepare(items: Sequence[tuple[Event, Sequence[str]]]) -> list[_Prepared]:
    out = []
    for ev, sinks in items:
        try:
            body = ev.to_json()
            h = data_hash(ev) if ev.entity_id is not None else None
        except TypeError as e:  # orjson.JSONEncodeError is a TypeError
            raise UnstorableEvent(
                f"event {ev.id!r} of source {ev.source!r} cannot be stored: it is not JSON-serialisable ({e})"
            ) from e
        out.append(_Prepared(ev, sinks, body, h))
    return out


class _EnqueueOp(_Op):
    __slots__ = ("cursor", "items")

    def __init__(
        self,
        items: Sequence[_Prepared],
        future: asyncio.Future[Any],
        cursor: tuple[str, str, bytes] | None = None,
    ):
        super().__init__(None, max(1, len(items)), future)
        self.items = items
        self.cursor = cursor


_STOP = _Op(None, 0, None)


class _Inbox:
    """The writer's queue: one consumer on the loop, so a deque and one waiter do (asyncio.Queue's
    bookkeeping of getters, putters and unfinished tasks costs a few µs on every webhook)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[_Op] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, op: _Op) -> None:
        self._items.append(op)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> _Op:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()

    def get_nowait(self) -> _Op:
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items


class _Failed:
    """An op that failed inside its savepoint; its caller gets ``error``, the batch still commits."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class StoreLocked(StoreUnavailable):
    """Another process holds the store's writer lock (a running daemon, or a CLI command writing)."""


Role = Literal["daemon", "writer", "reader", "client"]


class Store:
    """The SQLite queue, opened in one of four roles.

    ``daemon`` owns the file: it takes the writer lock, releases a dead run's leases and checkpoints.
    ``writer`` is a CLI write command with no daemon running: it takes the same lock (``StoreLocked``
    if a daemon holds it: the command must then go through the daemon). ``reader`` opens the file
    read-only (``mode=ro``): no writer task, no migration, no lock; every write raises. ``client``
    writes beside a running daemon without the lock (kept for compatibility; ids and fencing make
    it safe, but one writer per store is the rule: prefer ``writer`` or the daemon's admin API).
    """

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        busy_timeout: float = 5.0,
        max_size_mb: int | None = None,
        commit_max_rows: int = 4000,
        clock: Callable[[], float] = time.time,
        role: Role = "daemon",
    ):
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self.max_size_mb = max_size_mb
        self.commit_max_rows = commit_max_rows
        self.clock = clock
        self.role = role
        self.owner = uuid.uuid4().hex[:12]
        self._leases = itertools.count(1)  # with ``owner``, a fencing token unique to each lease
        self.deliveries_ready = asyncio.Event()
        self.commits = 0
        self.committed_ops = 0
        self.inline_checkpoints = 0  # WAL checkpoints the writer had to run between commits (see _run_writer)
        self.inline_checkpoint_seconds = 0.0
        # Told the seconds from BEGIN to COMMIT returned and the ops in it, after each group commit:
        # every caller in the group waited that long for its answer (the daemon exports it).
        self.on_commit: Callable[[float, int], None] | None = None
        self._queue = _Inbox()
        self._conn: Conn | None = None  # by the writer only: statements on the loop, COMMIT on self._thread
        self._rconn: ReadConn | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._writer: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._prune_at: tuple[str, Any] = (_PRUNE_PHASES[0], None)  # where the retention pass resumes
        self.pruned = dict.fromkeys(_PRUNE_PHASES, 0)  # rows deleted by retention, by kind
        # Checkpoints run beside the writer (see _maybe_checkpoint), on a thread and connection of their own.
        self._ckpt_thread: ThreadPoolExecutor | None = None
        self._ckpt_conn: sqlite3.Connection | None = None
        self._ckpt_task: asyncio.Future[Any] | None = None
        self._ckpt_started = 0.0
        self._ckpt_inline = False

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self.role == "reader":
            await self._open_read_only()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.role in ("daemon", "writer"):
            self._take_lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="integrand-store")
        try:
            released = await self._in_thread(self._open_writer)
            if released:
                log.info("released %d deliveries leased by a previous run", released)
            self._rconn = await self._connect_reader()
        except BaseException as e:
            await self._close_conns()
            self._drop_lock()
            if isinstance(e, sqlite3.Error):
                raise StoreUnavailable(f"cannot open store {self.path}: {e}") from e
            raise
        self._writer = asyncio.create_task(self._run_writer(), name="store-writer")

    async def close(self) -> None:
        failed: BaseException | None = None
        if self._writer is not None:
            self._queue.put_nowait(_STOP)
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
            except Exception as e:  # the writer died earlier: still close the connections and threads
                failed = e
            self._writer = None
        await self._close_conns()
        self._drop_lock()
        if failed is not None:
            raise failed

    async def _close_conns(self) -> None:
        if self._ckpt_thread is not None:
            if self._ckpt_task is not None:
                with contextlib.suppress(Exception):
                    await self._ckpt_task
            if self._ckpt_conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.get_running_loop().run_in_executor(self._ckpt_thread, self._ckpt_conn.close)
                self._ckpt_conn = None
            self._ckpt_thread.shutdown(wait=True)
            self._ckpt_thread = None
        if self._rconn is not None:
            with contextlib.suppress(Exception):
                await self._rconn.close()
            self._rconn = None
        if self._thread is not None:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._in_thread(self._conn.raw.close)
                self._conn = None
            self._thread.shutdown(wait=True)
            self._thread = None

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _open_writer(self) -> int:
        """On the store's thread: connect, migrate, find the last event id, release dead leases."""
        raw = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._conn = conn = Conn(raw)
        self._writer_pragmas(raw)
        _drive(self._migrate(conn))
        released = 0
        if self.role == "daemon":
            released = _drive(self._release_leases(conn, owner=None))
            # A checkpoint inside COMMIT would stall every webhook waiting on that commit (tens to
            # hundreds of ms on a busy disk); the daemon checkpoints beside the writer instead.
            raw.execute("PRAGMA wal_autocheckpoint = 0")
        # Transactions begin on the loop, which must never wait for a lock: see _begin.
        raw.execute("PRAGMA busy_timeout = 0")
        return released

    def _pragma_statements(self, readonly: bool) -> list[str]:
        """The settings every connection of this store gets (the writer's size limit aside)."""
        out = [f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}"]
        if not readonly:
            out.append("PRAGMA journal_mode = WAL")
        out += [f"PRAGMA synchronous = {self.synchronous}", "PRAGMA temp_store = MEMORY", "PRAGMA cache_size = -32000"]
        if readonly:
            out.append("PRAGMA query_only = ON")
        return out

    def _writer_pragmas(self, raw: sqlite3.Connection) -> None:
        for stmt in self._pragma_statements(readonly=False):
            raw.execute(stmt)
        if self.max_size_mb:
            row = raw.execute("PRAGMA page_size").fetchone()
            page = int(row[0]) if row else 4096
            raw.execute(f"PRAGMA max_page_count = {self.max_size_mb * 1024 * 1024 // page}")

    async def _connect_reader(self) -> ReadConn:
        """Reads (status, DLQ listings, next_due) go through aiosqlite on a connection of their own."""
        conn = await aiosqlite.connect(str(self.path), isolation_level=None)
        for stmt in self._pragma_statements(readonly=True):
            await conn.execute(stmt)
        return conn

    async def _open_read_only(self) -> None:
        """A reader: the file opened ``mode=ro``, nothing created, migrated or released."""
        if not self.path.exists():
            raise StoreUnavailable(f"no store at {self.path} (the daemon creates it when it first starts)")
        try:
            conn = await aiosqlite.connect(
                f"file:{urllib.parse.quote(str(self.path))}?mode=ro", uri=True, isolation_level=None
            )
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot open store {self.path} read-only: {e}") from e
        try:
            for stmt in self._pragma_statements(readonly=True):
                await conn.execute(stmt)
            async with conn.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
        except sqlite3.Error as e:
            await conn.close()
            raise StoreUnavailable(f"cannot read store {self.path}: {e}") from e
        if version != len(MIGRATIONS):
            await conn.close()
            raise StoreUnavailable(
                f"store {self.path} has schema version {version}, this integrand reads version {len(MIGRATIONS)}"
                + ("; start the daemon once to migrate it" if version < len(MIGRATIONS) else "; upgrade integrand")
            )
        self._rconn = conn

    def _take_lock(self) -> None:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if self.role == "daemon":
                raise StoreLocked(
                    f"another integrand is already running on {self.path} (a daemon, or a CLI command writing)"
                ) from None
            raise StoreLocked(
                f"an integrand daemon holds {self.path}: write commands must go through it (or stop it first)"
            ) from None
        self._lock_fd = fd

    def _drop_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _migrate(self, conn: Conn) -> None:
        async with conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if current > len(MIGRATIONS):
            raise StoreUnavailable(
                f"store {self.path} has schema version {current}, newer than this integrand knows "
                f"({len(MIGRATIONS)}); upgrade integrand"
            )
        for version in range(current, len(MIGRATIONS)):
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await self._run_script(conn, MIGRATIONS[version])
                await conn.execute(f"PRAGMA user_version = {version + 1}")
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            log.info("store schema migrated to version %d", version + 1)

    @staticmethod
    async def _run_script(conn: Conn, script: str) -> None:
        # executescript() would COMMIT first; run statement by statement to stay in one transaction.
        for stmt in (s.strip() for s in script.split(";")):
            if stmt:
                await conn.execute(stmt)

    # --- the writer -------------------------------------------------------------------------

    async def _run_writer(self) -> None:
        stopping = False
        held: _Op | None = None
        while not stopping:
            op, held = held or await self._queue.get(), None
            if op is _STOP:
                break
            batch, rows = [op], op.rows
            while not op.alone and rows < self.commit_max_rows and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is _STOP:
                    stopping = True
                    break
                if nxt.alone:
                    held = nxt
                    break
                batch.append(nxt)
                rows += nxt.rows
            if self._ckpt_inline:
                self._ckpt_inline = False
                if self._ckpt_task is not None:  # a PASSIVE checkpoint does not wait for another one
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._ckpt_task)
                started = time.perf_counter()
                try:
                    await self._in_thread(self._checkpoint_in_line)
                except sqlite3.Error as e:
                    log.warning("WAL checkpoint failed: %s", e)
                # Every caller queued meanwhile waited for it: worth seeing beside the commit times.
                self.inline_checkpoints += 1
                self.inline_checkpoint_seconds += time.perf_counter() - started
            await self._commit(batch)
        # Fail whatever is still queued rather than leave callers hanging.
        while not self._queue.empty():
            op = self._queue.get_nowait()
            if op.future is not None and not op.future.done():
                op.future.set_exception(StoreUnavailable("store is closed"))

    async def _commit(self, batch: list[_Op]) -> None:
        """One transaction for the batch: its statements on the loop, its COMMIT (the fsync) on the store's thread.

        The statements are short (microseconds each) and run where the callers are, so the loop and
        the store's thread do not trade the GIL around every statement; only the COMMIT, which waits
        for the disk, leaves the loop, and the loop serves requests meanwhile."""
        started = time.perf_counter()
        try:
            await self._begin()
            results, new_deliveries = self._apply(batch)
            await self._in_thread(self._finish)
        except Exception as e:
            err: BaseException = e
            if _unavailable(e):
                err = StoreUnavailable(f"store cannot commit: {e}")
                log.error("store cannot commit %d operations: %s", len(batch), e)
            elif not isinstance(e, StoreUnavailable):
                log.exception("store operation failed")
            for op in batch:
                if op.future is not None and not op.future.done():
                    op.future.set_exception(err)
            return
        self.commits += 1
        self.committed_ops += len(batch)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(batch))
        if self.role == "daemon":
            self._maybe_checkpoint()
        for op, result in zip(batch, results, strict=True):
            if op.future is None or op.future.done():
                continue
            if isinstance(result, _Failed):
                op.future.set_exception(result.error)
            else:
                op.future.set_result(result)
        if new_deliveries:
            self.deliveries_ready.set()

    def _maybe_checkpoint(self) -> None:
        """Start a PASSIVE checkpoint on its own thread and connection, at most one at a time and one
        per ``CHECKPOINT_EVERY`` seconds: writers go on appending to the WAL while it copies pages."""
        now = time.monotonic()
        if self._ckpt_task is not None or now - self._ckpt_started < CHECKPOINT_EVERY:
            return
        if self._ckpt_thread is None:
            self._ckpt_thread = ThreadPoolExecutor(1, thread_name_prefix="integrand-checkpoint")
        self._ckpt_started = now
        task = asyncio.get_running_loop().run_in_executor(self._ckpt_thread, self._checkpoint)
        self._ckpt_task = task
        task.add_done_callback(self._checkpoint_done)

    def _checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        if self._ckpt_conn is None:
            self._ckpt_conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._ckpt_conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        row = self._ckpt_conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)

    async def truncate_wal(self) -> bool:
        """Copy the whole WAL into the database and truncate it to 0 bytes; True when done. For an idle
        store: after a burst the WAL otherwise keeps its size until shutdown. It waits for a writer in
        progress (on the checkpoint thread, never the loop), and gives up (False) if one outlasts the wait."""
        if self._ckpt_thread is None:
            self._ckpt_thread = ThreadPoolExecutor(1, thread_name_prefix="integrand-checkpoint")
        busy, _, _ = await asyncio.get_running_loop().run_in_executor(self._ckpt_thread, self._checkpoint, "TRUNCATE")
        return busy == 0

    def _checkpoint_done(self, task: asyncio.Future[Any]) -> None:
        self._ckpt_task = None
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("WAL checkpoint failed (retried after the next commit): %s", task.exception())
            return
        _busy, wal_frames, _copied = task.result()
        if wal_frames > WAL_MAX_FRAMES:
            # Under a steady flood, commits keep adding frames while a checkpoint copies, so the WAL
            # is never all copied and never restarts: grow no further, checkpoint once in line.
            self._ckpt_inline = True

    def _checkpoint_in_line(self) -> None:
        """On the store's thread, between transactions: nothing is appended meanwhile, so the WAL
        is copied through and the next transaction starts it over from the beginning."""
        assert self._conn is not None
        self._conn.raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def _begin(self) -> None:
        """Take the write lock on the loop when it is free (it nearly always is); when another process
        holds it (a CLI command), wait for it on the store's thread, up to ``busy_timeout``."""
        assert self._conn is not None
        try:
            self._conn.raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _sqlite_code(e) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            await self._in_thread(self._begin_waiting)

    def _begin_waiting(self) -> None:
        assert self._conn is not None
        raw = self._conn.raw
        raw.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        try:
            raw.execute("BEGIN IMMEDIATE")
        finally:
            raw.execute("PRAGMA busy_timeout = 0")

    def _finish(self) -> None:
        """On the store's thread: COMMIT, which writes the WAL and (synchronous=FULL) fsyncs it."""
        assert self._conn is not None
        with _rolled_back_on_error(self._conn.raw) as raw:
            raw.execute("COMMIT")

    def _apply(self, batch: list[_Op]) -> tuple[list[Any], bool]:
        """On the loop, inside the open transaction: every op of the batch, each in its own savepoint."""
        conn = self._conn
        assert conn is not None
        raw = conn.raw
        results: list[Any] = []
        new_deliveries = False
        with _rolled_back_on_error(raw):
            enqueues = [op for op in batch if isinstance(op, _EnqueueOp)]
            enq_results: list[Any] = []
            if enqueues:
                enq_results, new_deliveries = self._apply_enqueues_isolated(conn, enqueues)
            it = iter(enq_results)
            for op in batch:
                if isinstance(op, _EnqueueOp):
                    results.append(next(it))
                    continue
                assert op.fn is not None
                # A savepoint per op: one caller's failing op must not take the others' rows with it.
                raw.execute("SAVEPOINT op")
                try:
                    results.append(_drive(op.fn(conn)))
                except sqlite3.Error as e:
                    if _unavailable(e):
                        raise
                    raw.execute("ROLLBACK TO op")
                    results.append(_Failed(e))
                except Exception as e:
                    raw.execute("ROLLBACK TO op")
                    results.append(_Failed(e))
                raw.execute("RELEASE op")
        return results, new_deliveries

    def _apply_enqueues_isolated(self, conn: Conn, ops: list[_EnqueueOp]) -> tuple[list[Any], bool]:
        """The group's enqueues merged (one dedup query, multi-row inserts) in a savepoint; if that
        fails, each enqueue again in a savepoint of its own, so only the bad one fails."""
        raw = conn.raw
        raw.execute("SAVEPOINT enq")
        try:
            merged = _drive(self._apply_enqueues(conn, ops))
        except Exception as e:
            if _unavailable(e) or len(ops) == 1:
                raw.execute("ROLLBACK TO enq")
                raw.execute("RELEASE enq")
                if _unavailable(e):
                    raise
                return [_Failed(e)], False
            raw.execute("ROLLBACK TO enq")
        else:
            raw.execute("RELEASE enq")
            return list(merged[0]), merged[1]
        raw.execute("RELEASE enq")
        results: list[Any] = []
        new_deliveries = False
        for op in ops:
            raw.execute("SAVEPOINT enq")
            try:
                [res], new = _drive(self._apply_enqueues(conn, [op]))
            except Exception as e:
                raw.execute("ROLLBACK TO enq")
                raw.execute("RELEASE enq")
                if _unavailable(e):
                    raise
                log.error("an enqueue failed alone in its group commit: %s", e)
                results.append(_Failed(e))
                continue
            raw.execute("RELEASE enq")
            results.append(res)
            new_deliveries |= new
        return results, new_deliveries

    async def _apply_enqueues(self, conn: Conn, ops: list[_EnqueueOp]) -> tuple[list[EnqueueResult], bool]:
        by_source: dict[str, set[str]] = {}
        for op in ops:
            for it in op.items:
                by_source.setdefault(it.event.source, set()).add(it.event.id)
        seen: set[tuple[str, str]] = set()
        for source, ids in by_source.items():
            id_list = list(ids)
            for i in range(0, len(id_list), 500):
                chunk = id_list[i : i + 500]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT event_id FROM events WHERE source = ? AND event_id IN ({marks})"  # noqa: S608
                seen.update((source, r[0]) for r in await conn.execute_fetchall(sql, (source, *chunk)))
        entities = await self._entity_versions_for(conn, [it.event for op in ops for it in op.items])
        now = self.clock()
        event_rows: list[tuple[Any, ...]] = []
        delivery_rows: list[tuple[Any, ...]] = []
        entity_rows: list[tuple[Any, ...]] = []
        cursor_rows: list[tuple[Any, ...]] = []
        fanout: list[tuple[str, str, str, Sequence[str], bool]] = []
        results = []
        for op in ops:
            accepted = dup = stale = 0
            for ev, sinks, body, h in op.items:
                k = (ev.source, ev.id)
                if k in seen:
                    dup += 1
                    continue
                seen.add(k)
                if ev.entity_id is not None:
                    ek = (ev.source, ev.entity or "", ev.entity_id)
                    assert h is not None
                    known = entities.get(ek)
                    # An older version never overwrites a newer one; the same version with the
                    # same content is a repeat (look-back overlap, a webhook then a poll).
                    if _superseded(known, ev.version, h):
                        stale += 1
                        continue
                    entities[ek] = EntityVersion(ev.version, h, is_delete(ev), ev.id, now)
                    entity_rows.append((*ek, ev.version, h, int(is_delete(ev)), ev.id, now))
                accepted += 1
                event_rows.append((ev.source, ev.id, ev.type, ev.entity_key, now, body))
                fanout.append((ev.source, ev.id, ev.entity_key, sinks, ev.entity_id is not None))
            if op.cursor is not None:
                cursor_rows.append((*op.cursor, now))
            results.append(EnqueueResult(accepted, dup, stale))
        if event_rows:
            # SQLite assigns the ids (another process may have inserted events since we last looked).
            row_of = {
                (r[1], r[2]): r[0]
                for r in await conn.insert_returning(
                    "INSERT INTO events (source, event_id, type, entity_key, received_at, body)",
                    event_rows,
                    "id, source, event_id",
                )
            }
            # A new delivery heads its line unless the line already has an active delivery (or an
            # earlier one in this batch); an event without an entity is a line of its own.
            busy = await _busy_lines(conn, {(sink, f[2]) for f in fanout if f[4] for sink in f[3]})
            for source, event_id, ekey, sinks, ordered in fanout:
                row = row_of[(source, event_id)]
                for sink in sinks:
                    head: int | None = 1
                    if ordered:
                        line = (sink, ekey)
                        if line in busy:
                            head = None
                        else:
                            busy.add(line)
                    delivery_rows.append((row, sink, ekey, "ready", now, now, now, head))
        if delivery_rows:
            await conn.insert_rows(
                "INSERT INTO deliveries (event, sink, entity_key, state, created_at, next_attempt_at, updated_at, head)",
                delivery_rows,
            )
        if entity_rows:
            await conn.insert_rows(
                "INSERT INTO entity_versions (source, entity, entity_id, version, hash, deleted, event_id, seen_at)",
                entity_rows,
                " ON CONFLICT (source, entity, entity_id) DO UPDATE SET "
                "version = excluded.version, hash = excluded.hash, deleted = excluded.deleted, "
                "event_id = excluded.event_id, seen_at = excluded.seen_at",
            )
        if cursor_rows:
            await conn.executemany(_CURSOR_UPSERT, cursor_rows)
        return results, bool(delivery_rows)

    @staticmethod
    async def _entity_versions_for(conn: Conn, events: Sequence[Event]) -> dict[tuple[str, str, str], EntityVersion]:
        keys = {(ev.source, ev.entity or "", ev.entity_id) for ev in events if ev.entity_id is not None}
        return await _read_entities(conn, keys)

    def _unwritable(self) -> StoreUnavailable:
        if self.role == "reader":
            return StoreUnavailable(f"store {self.path} is opened read-only")
        return StoreUnavailable("store is not open")

    async def _submit(self, fn: Callable[[Conn], Coroutine[Any, Any, T]], rows: int = 1) -> T:
        if self._writer is None:
            raise self._unwritable()
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(fn, rows, fut))
        return await fut

    # --- the queue --------------------------------------------------------------------------

    async def enqueue(self, items: Sequence[tuple[Event, Sequence[str]]]) -> EnqueueResult:
        """Store events with one delivery per sink; returns once committed. Duplicates are no-ops."""
        if self._writer is None:
            raise self._unwritable()
        if not items:
            return EnqueueResult(0, 0)
        fut: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_EnqueueOp(_prepare(items), fut))
        return await fut

    async def enqueue_with_cursor(
        self, items: Sequence[tuple[Event, Sequence[str]]], source: str, cursor: Any, kind: str = "poll"
    ) -> EnqueueResult:
        """Store a poll's events and its new cursor in one transaction: both or neither survive a crash."""
        if self._writer is None:
            raise self._unwritable()
        prepared, blob = _prepare(items), orjson.dumps(cursor)
        fut: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_EnqueueOp(prepared, fut, (source, kind, blob)))
        return await fut

    async def lease(
        self,
        limit: int,
        lease_seconds: float,
        *,
        exclude: Iterable[str] = (),
        only: str | None = None,
        due_only: bool = True,
    ) -> list[Leased]:
        """Lease up to ``limit`` due deliveries that head their (sink, entity) line, oldest first.

        ``due_only=False`` takes the heads that fall due soonest even if not due yet: a breaker's
        probe tests the sink, and the backoffs it would wait out were caused by the outage."""
        excluded = sorted(exclude)

        async def op(conn: Conn) -> list[Leased]:
            now = self.clock()
            token = f"{self.owner}.{next(self._leases)}"
            where = ["d.state = 'ready'", "d.head = 1"]
            if due_only:
                where.append("d.next_attempt_at <= :now")
            params: dict[str, Any] = {
                "now": now,
                "until": now + lease_seconds,
                "owner": token,
                "limit": limit,
            }
            if only is not None:
                where.append("d.sink = :only")
                params["only"] = only
            if excluded:
                marks = []
                for i, s in enumerate(excluded):
                    params[f"x{i}"] = s
                    marks.append(f":x{i}")
                where.append(f"d.sink NOT IN ({','.join(marks)})")
            sql = f"""
                UPDATE deliveries SET state = 'leased', lease_until = :until, lease_owner = :owner, updated_at = :now
                WHERE id IN (
                    SELECT d.id FROM deliveries d
                    WHERE {" AND ".join(where)}
                    ORDER BY d.next_attempt_at, d.id
                    LIMIT :limit)
                RETURNING id, event, sink, attempts, created_at
            """  # noqa: S608 - only placeholders are interpolated
            rows = list(await conn.execute_fetchall(sql, params))
            if not rows:
                return []
            bodies: dict[int, bytes] = {}
            event_ids = sorted({r[1] for r in rows})
            for i in range(0, len(event_ids), 500):
                chunk = event_ids[i : i + 500]
                sql = f"SELECT id, body FROM events WHERE id IN ({','.join('?' * len(chunk))})"  # noqa: S608
                bodies.update({r[0]: r[1] for r in await conn.execute_fetchall(sql, chunk)})
            rows.sort(key=lambda r: r[0])
            return [Leased(r[0], r[1], r[2], r[3], r[4], Event.from_json(bodies[r[1]]), token) for r in rows]

        return await self._submit(op, rows=limit)

    async def complete(self, outcomes: Sequence[Outcome]) -> None:
        """Record what happened to leased deliveries, with an audit line each."""
        if not outcomes:
            return

        async def op(conn: Conn) -> bool:
            now = self.clock()
            held = await _still_held(conn, outcomes)
            done: list[int] = []
            retry: list[tuple[Any, ...]] = []
            dead: list[tuple[Any, ...]] = []
            release: list[tuple[Any, ...]] = []
            audit: list[tuple[Any, ...]] = []
            for o in outcomes:
                d = o.delivery
                if d.id not in held:
                    continue
                if o.kind == "done":
                    done.append(d.id)
                elif o.kind == "retry":
                    inc = 1 if o.count_attempt else 0
                    retry.append((inc, o.next_attempt_at or now, now, o.error, d.id))
                    audit.append((now, d.event_row, d.id, "retry" if inc else "deferred", o.error))
                elif o.kind == "dead":
                    dead.append((now, o.error, d.id))
                    audit.append((now, d.event_row, d.id, "dead", o.error))
                else:
                    release.append((now, d.id))
            if done:
                await conn.update_ids(
                    "UPDATE deliveries SET state = 'done', active = NULL, head = NULL, attempts = attempts + 1, "
                    "updated_at = ?, "
                    "lease_until = NULL, lease_owner = NULL, last_error = NULL",
                    (now,),
                    done,
                )
            if retry:
                await conn.executemany(
                    "UPDATE deliveries SET state = 'ready', attempts = attempts + ?, next_attempt_at = ?, "
                    "updated_at = ?, last_error = ?, lease_until = NULL, lease_owner = NULL WHERE id = ?",
                    retry,
                )
            if dead:
                await conn.executemany(
                    "UPDATE deliveries SET state = 'dead', active = NULL, head = NULL, attempts = attempts + 1, "
                    "updated_at = ?, "
                    "last_error = ?, lease_until = NULL, lease_owner = NULL WHERE id = ?",
                    dead,
                )
            if release:
                await conn.executemany(
                    "UPDATE deliveries SET state = 'ready', updated_at = ?, lease_until = NULL, lease_owner = NULL "
                    "WHERE id = ?",
                    release,
                )
            if audit:
                await conn.insert_rows("INSERT INTO audit (at, event, delivery, action, detail)", audit)
            finished = [o.delivery for o in outcomes if o.delivery.id in held and o.kind in ("done", "dead")]
            promoted = await _promote_heads(conn, finished)
            return bool(release or retry or promoted)

        if await self._submit(op, rows=len(outcomes)):
            self.deliveries_ready.set()  # after the commit, not inside the op: a rolled-back retry is no news

    async def _release_leases(self, conn: Conn, owner: str | None, expired_before: float | None = None) -> int:
        now = self.clock()
        sql = "UPDATE deliveries SET state = 'ready', lease_until = NULL, lease_owner = NULL, updated_at = ? "
        sql += "WHERE state = 'leased'"
        params: list[Any] = [now]
        if owner is not None:  # every token of this run is ``owner.n``
            sql += " AND substr(lease_owner, 1, ?) = ?"
            params += [len(owner) + 1, owner + "."]
        if expired_before is not None:
            sql += " AND lease_until < ?"
            params.append(expired_before)
        cur = await conn.execute(sql, params)
        return cur.rowcount

    async def release_owned(self) -> int:
        """Hand back every lease this process holds (clean shutdown)."""
        return await self._submit(lambda c: self._release_leases(c, owner=self.owner))

    async def reclaim_expired(self) -> int:
        """Make deliveries whose lease ran out ready again (their worker died or hung)."""
        n = await self._submit(lambda c: self._release_leases(c, owner=None, expired_before=self.clock()))
        if n:
            log.warning("reclaimed %d deliveries whose lease expired", n)
            self.deliveries_ready.set()
        return n

    async def expedite(self, sink: str) -> int:
        """Make a sink's waiting retries due now (its breaker just closed: it is back)."""

        async def op(conn: Conn) -> int:
            now = self.clock()
            cur = await conn.execute(
                "UPDATE deliveries SET next_attempt_at = ? WHERE state = 'ready' AND sink = ? AND next_attempt_at > ?",
                (now, sink, now),
            )
            return cur.rowcount

        n = await self._submit(op)
        if n:
            self.deliveries_ready.set()
        return n

    async def next_due(self, exclude: Iterable[str] = ()) -> float | None:
        """When the earliest leasable delivery falls due (None if none): heads of their entity line only,
        and not on the ``exclude``d (paused) sinks, so a blocked or paused delivery never causes a busy wait."""
        excluded = sorted(exclude)
        not_in = f"AND d.sink NOT IN ({','.join('?' * len(excluded))}) " if excluded else ""
        sql = f"""
            SELECT d.next_attempt_at FROM deliveries d WHERE d.state = 'ready' AND d.head = 1 {not_in}
            ORDER BY d.next_attempt_at LIMIT 1
        """  # noqa: S608 - only placeholders are interpolated
        async with self._read().execute(sql, excluded) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row else None

    # --- retention ---------------------------------------------------------------------------

    async def prune(self, older_than: float, chunk: int = 200) -> int:
        """One step of a retention pass; call in a loop until it returns 0 (the pass is over).

        A pass deletes fully delivered events received before ``older_than`` (with their deliveries
        and audit), then delete markers (``entity_versions`` tombstones) and loop-guard state not
        touched since. Each step examines at most ``chunk`` rows in one writer hold and resumes
        where the last one stopped, so events kept by dead letters are walked once per pass, a
        chunk at a time, never all in one hold. Returns the rows deleted by this call (>0), or 0."""
        if self._prune_at[0] == "over":  # the last call finished a pass: say so, the next call starts one
            self._prune_at = (_PRUNE_PHASES[0], None)
            return 0
        while True:
            phase, pos = self._prune_at
            step = functools.partial(_PRUNE_STEPS[phase], older_than=older_than, after=pos, chunk=chunk)
            deleted, nxt = await self._submit(step, rows=chunk)
            self.pruned[phase] += deleted
            if nxt is None:  # this phase is over: on to the next, or the pass is over
                following = _PRUNE_PHASES[_PRUNE_PHASES.index(phase) + 1 :]
                if not following:
                    self._prune_at = ("over", None) if deleted else (_PRUNE_PHASES[0], None)
                    return deleted
                self._prune_at = (following[0], None)
            else:
                self._prune_at = (phase, nxt)
            if deleted:
                return deleted

    # --- rejections -------------------------------------------------------------------------

    def record_rejection(
        self, source: str, status: int, reason: str, remote: str | None, headers: dict[str, str], keep: int
    ) -> None:
        """Remember a refused webhook (without waiting); only the newest ``keep`` are kept."""
        if self._writer is None or keep <= 0:
            return

        async def op(conn: Conn) -> None:
            cur = await conn.execute(
                "INSERT INTO rejections (at, source, status, reason, remote, headers) VALUES (?, ?, ?, ?, ?, ?)",
                (self.clock(), source, status, reason, remote, orjson.dumps(headers).decode()),
            )
            last = cur.lastrowid or 0
            if last % 100 == 0:
                await conn.execute("DELETE FROM rejections WHERE id <= ?", (last - keep,))

        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_log_failure)
        self._queue.put_nowait(_Op(op, 1, fut))

    async def rejections(self, limit: int = 50, source: str | None = None) -> list[Rejection]:
        sql = "SELECT at, source, status, reason, remote, headers FROM rejections"
        params: list[Any] = []
        if source:
            sql += " WHERE source = ?"
            params.append(source)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        async with self._read().execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [Rejection(r[0], r[1], r[2], r[3], r[4], orjson.loads(r[5])) for r in rows]

    # --- dead letters -------------------------------------------------------------------------

    async def dead_letters(self, sink: str | None = None, limit: int = 1000) -> list[DeadLetter]:
        sql = (
            "SELECT d.id, e.event_id, e.source, d.sink, d.attempts, d.updated_at, d.last_error "
            "FROM deliveries d JOIN events e ON e.id = d.event WHERE d.state = 'dead'"
        )
        params: list[Any] = []
        if sink:
            sql += " AND d.sink = ?"
            params.append(sink)
        sql += " ORDER BY d.id LIMIT ?"
        params.append(limit)
        async with self._read().execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], r[6] or "") for r in rows]

    async def delivery(self, delivery_id: int) -> DeliveryDetail | None:
        conn = self._read()
        async with conn.execute(
            "SELECT d.id, d.sink, d.state, d.attempts, d.created_at, d.updated_at, d.next_attempt_at, "
            "d.last_error, e.body, e.id FROM deliveries d JOIN events e ON e.id = d.event WHERE d.id = ?",
            (delivery_id,),
        ) as cur:
            r = await cur.fetchone()
        if r is None:
            return None
        async with conn.execute(
            "SELECT at, delivery, action, detail FROM audit WHERE event = ? AND (delivery = ? OR delivery IS NULL) "
            "ORDER BY id",
            (r[9], delivery_id),
        ) as cur:
            audit = [AuditEntry(a[0], a[1], a[2], a[3]) for a in await cur.fetchall()]
        if r[2] == "done" and r[7] is None:  # done with an error is a purge, not a delivery
            # Success is recorded on the delivery row itself (one write per delivery, not two): the
            # history shows it from there.
            audit.append(AuditEntry(r[5], delivery_id, "delivered", f"sink={r[1]} attempts={r[3]}"))
        return DeliveryDetail(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], Event.from_json(r[8]), audit)

    async def replay(
        self, ids: Sequence[int] | None = None, sink: str | None = None, *, include_superseded: bool = True
    ) -> ReplayResult:
        """Make dead deliveries ready again with attempts reset; the audit keeps their history.

        With ``include_superseded=False`` a delivery whose entity has since been seen at a newer
        version stays dead (replaying it would put old data over new at the sink); events
        without a version are never judged superseded."""

        async def op(conn: Conn) -> ReplayResult:
            now = self.clock()
            rows = await _dead_rows(conn, ids, sink)
            superseded: list[int] = []
            if not include_superseded and rows:
                events = {r[0]: Event.from_json(r[4]) for r in rows}
                known = await self._entity_versions_for(conn, list(events.values()))
                for r in rows:
                    ev = events[r[0]]
                    if ev.entity_id is None or ev.version is None:
                        continue
                    k = known.get((ev.source, ev.entity or "", ev.entity_id))
                    if k is not None and k.version is not None and version_newer(k.version, ev.version):
                        superseded.append(r[0])
                rows = [r for r in rows if r[0] not in superseded]
            if rows:
                await conn.executemany(
                    "UPDATE deliveries SET state = 'ready', active = 1, head = NULL, attempts = 0, next_attempt_at = ?, "
                    "updated_at = ?, created_at = ? WHERE id = ?",
                    [(now, now, now, r[0]) for r in rows],
                )
                await _settle_heads(conn, {(r[5], r[6]) for r in rows})
                await conn.executemany(
                    "INSERT INTO audit (at, event, delivery, action, detail) VALUES (?, ?, ?, 'replayed', ?)",
                    [(now, r[1], r[0], f"after {r[2]} attempts; last error: {r[3]}") for r in rows],
                )
            return ReplayResult(len(rows), superseded)

        result = await self._submit(op)
        if result.replayed:
            self.deliveries_ready.set()
        return result

    async def purge(self, ids: Sequence[int] | None = None, sink: str | None = None) -> int:
        """Drop dead deliveries for good (an audit line records it)."""

        async def op(conn: Conn) -> int:
            now = self.clock()
            rows = await _dead_rows(conn, ids, sink)
            await conn.executemany(
                "UPDATE deliveries SET state = 'done', active = NULL, updated_at = ?, last_error = 'purged from the DLQ' "
                "WHERE id = ?",
                [(now, r[0]) for r in rows],
            )
            await conn.executemany(
                "INSERT INTO audit (at, event, delivery, action, detail) VALUES (?, ?, ?, 'purged', NULL)",
                [(now, r[1], r[0]) for r in rows],
            )
            return len(rows)

        return await self._submit(op)

    # --- connector state ----------------------------------------------------------------------

    async def state_get(self, scope: str, key: str) -> Any:
        async with self._read().execute("SELECT value FROM state WHERE scope = ? AND key = ?", (scope, key)) as cur:
            row = await cur.fetchone()
        return orjson.loads(row[0]) if row else None

    async def state_set(self, scope: str, key: str, value: Any) -> None:
        blob = orjson.dumps(value)

        async def op(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO state (scope, key, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (scope, key, blob, self.clock()),
            )

        await self._submit(op)

    # --- cursors and entity versions -----------------------------------------------------------

    async def cursor_get(self, source: str, kind: str = "poll") -> Any:
        """A source's committed cursor (None if it has none: the next poll starts from the beginning)."""
        async with self._read().execute(
            "SELECT value FROM cursors WHERE source = ? AND kind = ?", (source, kind)
        ) as cur:
            row = await cur.fetchone()
        return orjson.loads(row[0]) if row else None

    async def cursor_set(self, source: str, value: Any, kind: str = "poll") -> None:
        """Set a cursor by hand (``integrand cursor set``); None resets it (backfill from the start)."""
        blob = orjson.dumps(value)

        async def op(conn: Conn) -> None:
            if value is None:
                await conn.execute("DELETE FROM cursors WHERE source = ? AND kind = ?", (source, kind))
            else:
                await conn.execute(_CURSOR_UPSERT, (source, kind, blob, self.clock()))

        await self._submit(op)

    async def cursors(self) -> list[CursorRow]:
        async with self._read().execute(
            "SELECT source, kind, value, updated_at FROM cursors ORDER BY source, kind"
        ) as cur:
            return [CursorRow(r[0], r[1], orjson.loads(r[2]), r[3]) for r in await cur.fetchall()]

    async def entity_versions(
        self, source: str, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], EntityVersion]:
        """What the entity table holds for (entity, entity_id) pairs of one source; missing ones are absent."""
        found = await _read_entities(self._read(), {(source, e, i) for e, i in keys})
        return {(k[1], k[2]): v for k, v in found.items()}

    # --- status -------------------------------------------------------------------------------

    async def counts(self) -> dict[tuple[str, str], int]:
        """Deliveries per (sink, state)."""
        async with self._read().execute("SELECT sink, state, COUNT(*) FROM deliveries GROUP BY sink, state") as cur:
            return {(r[0], r[1]): r[2] for r in await cur.fetchall()}

    async def event_count(self) -> int:
        async with self._read().execute("SELECT COUNT(*) FROM events") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a webhook-sized write could be stored now (size limit, lock).

        An empty transaction commits even when the store is full, so the probe writes
        PROBE_BYTES and rolls them back, in a transaction of its own.
        """
        if self._writer is None:
            raise StoreUnavailable("store is not open")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(_probe_write, 1, fut, alone=True))
        try:
            await fut
        except StoreUnavailable:
            raise
        except Exception as e:
            raise StoreUnavailable(str(e)) from e

    def _read(self) -> ReadConn:
        if self._rconn is None:
            raise StoreUnavailable("store is not open")
        return self._rconn


PROBE_BYTES = 64 * 1024


async def _probe_write(conn: Conn) -> None:
    await conn.execute("SAVEPOINT probe")
    await conn.execute(
        "INSERT INTO state (scope, key, value, updated_at) VALUES ('integrand.probe', 'ping', zeroblob(?), 0)",
        (PROBE_BYTES,),
    )
    await conn.execute("ROLLBACK TO probe")
    await conn.execute("RELEASE probe")


_CURSOR_UPSERT = (
    "INSERT INTO cursors (source, kind, value, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (source, kind) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
)


async def _read_entities(
    conn: Conn | ReadConn, keys: set[tuple[str, str, str]]
) -> dict[tuple[str, str, str], EntityVersion]:
    out: dict[tuple[str, str, str], EntityVersion] = {}
    by_group: dict[tuple[str, str], list[str]] = {}
    for source, entity, eid in keys:
        by_group.setdefault((source, entity), []).append(eid)
    for (source, entity), ids in by_group.items():
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            sql = (
                "SELECT entity_id, version, hash, deleted, event_id, seen_at FROM entity_versions "  # noqa: S608
                f"WHERE source = ? AND entity = ? AND entity_id IN ({','.join('?' * len(chunk))})"
            )
            async with conn.execute(sql, (source, entity, *chunk)) as cur:
                for r in await cur.fetchall():
                    out[(source, entity, r[0])] = EntityVersion(r[1], r[2], bool(r[3]), r[4], r[5])
    return out


async def _dead_rows(conn: Conn, ids: Sequence[int] | None, sink: str | None) -> list[Any]:
    """Dead deliveries (all, these ids, and/or this sink) as (id, event, attempts, last_error, body, sink, entity key)."""
    sql = (
        "SELECT d.id, d.event, d.attempts, d.last_error, e.body, d.sink, d.entity_key FROM deliveries d "
        "JOIN events e ON e.id = d.event WHERE d.state = 'dead'"
    )
    params: list[Any] = []
    if ids is not None:
        sql += f" AND d.id IN ({','.join('?' * len(ids))})"
        params.extend(ids)
    if sink:
        sql += " AND d.sink = ?"
        params.append(sink)
    return list(await conn.execute_fetchall(sql, params))


_PRUNE_PHASES = ("events", "tombstones", "loop_guard")
LOOP_GUARD_SCOPE = "loop-guard:"  # state scopes starting so are the loop guard's memory, pruned by age


async def _prune_events(conn: Conn, older_than: float, after: Any, chunk: int) -> tuple[int, tuple[float, int] | None]:
    """Examine up to ``chunk`` events received before ``older_than`` past ``after``; delete the delivered ones."""
    at, last = after if after is not None else (float("-inf"), 0)
    # Two index seeks, (received_at = at, id > last) then (received_at > at): a group commit gives
    # thousands of events the same received_at, and a row-value range would walk them all again.
    rows = await conn.execute_fetchall(
        "SELECT p.id, p.received_at, EXISTS (SELECT 1 FROM deliveries d WHERE d.event = p.id AND d.state != 'done') "
        "FROM (SELECT id, received_at FROM (SELECT id, received_at FROM events WHERE received_at = :at AND id > :last "
        "AND received_at < :cutoff ORDER BY id LIMIT :n) UNION ALL SELECT id, received_at FROM (SELECT id, received_at "
        "FROM events WHERE received_at > :at AND received_at < :cutoff ORDER BY received_at, id LIMIT :n) LIMIT :n) p",
        {"at": at, "last": last, "cutoff": older_than, "n": chunk},
    )
    ids = [r[0] for r in rows if not r[2]]
    if ids:
        marks = ",".join("?" * len(ids))
        for table, col in (("deliveries", "event"), ("audit", "event"), ("events", "id")):
            await conn.execute(f"DELETE FROM {table} WHERE {col} IN ({marks})", ids)  # noqa: S608
    return len(ids), ((rows[-1][1], rows[-1][0]) if len(rows) == chunk else None)


async def _prune_tombstones(conn: Conn, older_than: float, after: Any, chunk: int) -> tuple[int, Any]:
    """Delete up to ``chunk`` delete markers older than ``older_than`` (the stale guard's window is retention's)."""
    cur = await conn.execute(
        "DELETE FROM entity_versions WHERE (source, entity, entity_id) IN (SELECT source, entity, entity_id "
        "FROM entity_versions WHERE deleted = 1 AND seen_at < ? LIMIT ?)",
        (older_than, chunk),
    )
    return cur.rowcount, (True if cur.rowcount == chunk else None)


async def _prune_loop_guard(conn: Conn, older_than: float, after: Any, chunk: int) -> tuple[int, Any]:
    """Delete up to ``chunk`` loop-guard entries not written since ``older_than``."""
    cur = await conn.execute(
        "DELETE FROM state WHERE (scope, key) IN (SELECT scope, key FROM state "
        "WHERE substr(scope, 1, 11) = 'loop-guard:' AND updated_at < ? LIMIT ?)",
        (older_than, chunk),
    )
    return cur.rowcount, (True if cur.rowcount == chunk else None)


_PRUNE_STEPS: dict[str, Callable[..., Coroutine[Any, Any, tuple[int, Any]]]] = {
    "events": _prune_events,
    "tombstones": _prune_tombstones,
    "loop_guard": _prune_loop_guard,
}


async def _busy_lines(conn: Conn, lines: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (sink, entity key) lines already have an active delivery."""
    by_sink: dict[str, list[str]] = {}
    for sink, key in lines:
        by_sink.setdefault(sink, []).append(key)
    out: set[tuple[str, str]] = set()
    for sink, keys in by_sink.items():
        keys.sort()
        for start, size in _chunks(len(keys)):
            marks = ",".join("?" * size)
            rows = await conn.execute_fetchall(
                f"SELECT DISTINCT entity_key FROM deliveries WHERE sink = ? AND entity_key IN ({marks}) AND active = 1",  # noqa: S608
                [sink, *keys[start : start + size]],
            )
            out.update((sink, r[0]) for r in rows)
    return out


async def _promote_heads(conn: Conn, finished: Sequence[Leased]) -> int:
    """The next delivery of each entity line whose head just finished becomes its head (unordered
    events have lines of one)."""
    by_sink: dict[str, list[str]] = {}
    for d in finished:
        if d.event.entity_id is not None:
            by_sink.setdefault(d.sink, []).append(d.event.entity_key)
    n = 0
    for sink, keys in by_sink.items():
        keys = sorted(set(keys))
        for start, size in _chunks(len(keys)):
            marks = ",".join("?" * size)
            cur = await conn.execute(
                "UPDATE deliveries SET head = 1 WHERE id IN (SELECT MIN(id) FROM deliveries "  # noqa: S608
                f"WHERE sink = ? AND entity_key IN ({marks}) AND active = 1 GROUP BY entity_key)",
                [sink, *keys[start : start + size]],
            )
            n += cur.rowcount
    return n


async def _settle_heads(conn: Conn, lines: set[tuple[str, str]]) -> None:
    """Make the oldest active delivery of each line its head, unless one of the line is in flight
    (then that one stays head: a replayed delivery is never leased beside its successor)."""
    for sink, key in sorted(lines):
        rows = await conn.execute_fetchall(
            "SELECT id, state, head FROM deliveries WHERE sink = ? AND entity_key = ? AND active = 1 "
            "AND (head = 1 OR id = (SELECT MIN(id) FROM deliveries WHERE sink = ? AND entity_key = ? AND active = 1))",
            (sink, key, sink, key),
        )
        if any(r[1] == "leased" and r[2] == 1 for r in rows):
            continue
        oldest = min(r[0] for r in rows)
        for r in rows:
            want = 1 if r[0] == oldest else None
            if r[2] != want:
                await conn.execute("UPDATE deliveries SET head = ? WHERE id = ?", (want, r[0]))


async def _still_held(conn: Conn, outcomes: Sequence[Outcome]) -> set[int]:
    """The deliveries whose lease the outcome's token still holds; the others are logged and ignored.

    A worker whose lease expired may report after its delivery was reclaimed and leased again (or
    finished) by another: applying its outcome would put the delivery back without its place in line."""
    by_token: dict[str, list[int]] = {}
    for o in outcomes:
        by_token.setdefault(o.delivery.token, []).append(o.delivery.id)
    held: set[int] = set()
    for token, ids in by_token.items():
        rows = await conn.select_ids(
            "SELECT id FROM deliveries WHERE state = 'leased' AND lease_owner = ?", [token], ids
        )
        held.update(r[0] for r in rows)
    stale = [o for o in outcomes if o.delivery.id not in held]
    for o in stale:
        log.warning(
            "stale %s for delivery %d ignored: its lease (%s) expired and was taken over",
            o.kind,
            o.delivery.id,
            o.delivery.token or "no token",
        )
    return held


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("could not record a rejected webhook: %s", fut.exception())
