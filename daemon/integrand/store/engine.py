"""The store's engine: one writer task, group commit, checkpoints, the writer lock, the migration runner.

Every state change is an *op* handed to the writer; ops that arrive while a commit is in flight are
applied together in the next transaction (group commit), and each caller is released only after
the commit that holds its rows. The engine knows nothing of queues or dead letters: it runs ops,
each in a savepoint of its own, and *grouped* ops (``GroupedOp``: the queue's enqueues) through
their group's function, merged in one savepoint and, if that fails, one savepoint each, so a bad op
fails alone. The modules above it (queue, dead letters, retention, state) build on it; it imports
none of them. Nothing outside the ``store`` package writes SQL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import aiosqlite

from ..errors import StoreUnavailable

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

    async def update_ids_returning(
        self, head: str, where: str, params: Sequence[Any], ids: Sequence[int], returning: str = "id"
    ) -> list[Any]:
        """``head WHERE where AND id IN (…) RETURNING returning`` for many ids in a few statements: the rows
        the condition held for, changed and named in one step (a check and an update would be two)."""
        out: list[Any] = []
        for start, size in _chunks(len(ids)):
            sql = _in_sql(head, size).replace(" WHERE id IN", f" WHERE {where} AND id IN", 1)
            out.extend(self.raw.execute(f"{sql} RETURNING {returning}", [*params, *ids[start : start + size]]))
        return out


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


class _Op:
    """One caller's change: ``fn`` run in the writer's transaction; ``then`` told its result after the commit."""

    __slots__ = ("alone", "fn", "future", "rows", "then")

    def __init__(
        self,
        fn: Callable[[Conn], Coroutine[Any, Any, Any]] | None,
        rows: int,
        future: asyncio.Future[Any] | None,
        alone: bool = False,
        then: Callable[[Any], None] | None = None,
    ):
        self.fn = fn
        self.rows = rows
        self.future = future
        self.alone = alone  # committed in a transaction of its own: its failure must not fail anyone else's op
        self.then = then

    def committed(self, result: Any) -> None:
        """Told the op's result once its transaction has committed, before its caller is. A subclass overrides
        this rather than passing a bound method of itself as ``then``: that would be a reference cycle, and
        every op (with its events and future) would wait for the garbage collector instead of being freed."""
        if self.then is not None:
            self.then(result)


Op = _Op
GroupFn = Callable[[Conn, list[Any]], Coroutine[Any, Any, list[Any]]]


class GroupedOp(_Op):
    """An op applied together with the others of its ``group`` in the batch: ``group(conn, ops)``
    returns one result per op (the queue merges enqueues into one dedup query and a few inserts)."""

    __slots__ = ("group",)

    def __init__(
        self, group: GroupFn, rows: int, future: asyncio.Future[Any], then: Callable[[Any], None] | None = None
    ):
        super().__init__(None, rows, future, then=then)
        self.group = group


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

    def drain(self) -> list[_Op]:
        out = list(self._items)
        self._items.clear()
        return out

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


class Engine:
    """The SQLite file, its writer task and its reader connection; see the module docstring."""

    MIGRATIONS: ClassVar[Sequence[str]] = ()  # the schema, one script per version (store.schema)

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
        self.deliveries_ready = asyncio.Event()  # set after a commit that made deliveries leasable
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
        self._inflight: list[_Op] = []  # the batch being committed, failed by the watchdog if the writer dies
        self._died: BaseException | None = None
        # Checkpoints run beside the writer (see _maybe_checkpoint), on a thread and connection of their own.
        self._ckpt_thread: ThreadPoolExecutor | None = None
        self._ckpt_conn: sqlite3.Connection | None = None
        self._ckpt_task: asyncio.Future[Any] | None = None
        self._ckpt_started = 0.0
        self._ckpt_inline = False

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
        self._writer.add_done_callback(self._writer_ended)

    async def close(self) -> None:
        if self._writer is not None:
            self._queue.put_nowait(_STOP)
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a writer that died was logged
                await self._writer
            self._writer = None
        await self._close_conns()
        self._drop_lock()

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
            released = _drive(self._opened_as_daemon(conn))
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
        if version != len(self.MIGRATIONS):
            await conn.close()
            raise StoreUnavailable(
                f"store {self.path} has schema version {version}, this integrand reads version {len(self.MIGRATIONS)}"
                + ("; start the daemon once to migrate it" if version < len(self.MIGRATIONS) else "; upgrade integrand")
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
        if current > len(self.MIGRATIONS):
            raise StoreUnavailable(
                f"store {self.path} has schema version {current}, newer than this integrand knows "
                f"({len(self.MIGRATIONS)}); upgrade integrand"
            )
        for version in range(current, len(self.MIGRATIONS)):
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await self._run_script(conn, self.MIGRATIONS[version])
                await conn.execute(f"PRAGMA user_version = {version + 1}")
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            log.info("store schema migrated to version %d", version + 1)

    @staticmethod
    async def _run_script(conn: Conn, script: str) -> None:
        # executescript() would COMMIT first; run statement by statement to stay in one transaction
        # (a trigger's body holds semicolons: a statement ends where SQLite says it is complete).
        stmt = ""
        for part in script.split(";"):
            stmt += part + ";"
            if sqlite3.complete_statement(stmt):
                if stmt.strip(" \n;"):
                    await conn.execute(stmt.strip())
                stmt = ""
        if stmt.strip(" \n;"):
            raise ValueError(f"migration ends inside a statement: {stmt.strip()[:80]}")

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        """The watchdog: if the writer died (a bug), fail its batch and everything queued, and every
        later op at once, with StoreUnavailable (webhooks get 503, readiness fails) instead of hanging."""
        if task.cancelled():
            err: BaseException = asyncio.CancelledError()
        elif task.exception() is None:
            return  # closed
        else:
            err = task.exception()  # type: ignore[assignment]
        log.critical("the store's writer task died; every write now fails until integrand is restarted: %r", err)
        self._died = err
        failure = StoreUnavailable(f"the store's writer stopped: {err!r}")
        for op in [*self._inflight, *self._queue.drain()]:
            if op.future is not None and not op.future.done():
                op.future.set_exception(failure)
        self._inflight = []

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
            self._inflight = batch
            await self._commit(batch)
            self._inflight = []
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
            results = self._apply(batch)
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
                op.committed(result)
                op.future.set_result(result)

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

    def _apply(self, batch: list[_Op]) -> list[Any]:
        """On the loop, inside the open transaction: every op of the batch, each in its own savepoint
        (grouped ops by their group, see ``_apply_group``); a failed op's result is a ``_Failed``."""
        conn = self._conn
        assert conn is not None
        raw = conn.raw
        with _rolled_back_on_error(raw):
            groups: dict[Any, list[GroupedOp]] = {}
            plain = False
            for op in batch:
                if isinstance(op, GroupedOp):
                    groups.setdefault(op.group, []).append(op)
                else:
                    plain = True
            if len(groups) == 1 and not plain:  # the common case under load: a batch of enqueues only
                [(fn, ops)] = groups.items()
                return self._apply_group(conn, fn, ops)
            grouped: dict[int, Any] = {}
            for fn, ops in groups.items():
                for op, res in zip(ops, self._apply_group(conn, fn, ops), strict=True):
                    grouped[id(op)] = res
            results: list[Any] = []
            for op in batch:
                if isinstance(op, GroupedOp):
                    results.append(grouped[id(op)])
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
        return results

    @staticmethod
    def _apply_group(conn: Conn, fn: GroupFn, ops: list[GroupedOp]) -> list[Any]:
        """A group's ops merged by its function (one query for many) in a savepoint; if that fails,
        each op again in a savepoint of its own, so only the bad one fails."""
        raw = conn.raw
        raw.execute("SAVEPOINT grp")
        try:
            merged = _drive(fn(conn, ops))
        except Exception as e:
            if _unavailable(e):  # the whole transaction fails (SQLite may have rolled it back already)
                raise
            raw.execute("ROLLBACK TO grp")
            raw.execute("RELEASE grp")
            if len(ops) == 1:
                return [_Failed(e)]
        else:
            raw.execute("RELEASE grp")
            return merged
        results: list[Any] = []
        for op in ops:
            raw.execute("SAVEPOINT grp")
            try:
                [res] = _drive(fn(conn, [op]))
            except Exception as e:
                if _unavailable(e):
                    raise
                raw.execute("ROLLBACK TO grp")
                raw.execute("RELEASE grp")
                log.error("an operation failed alone in its group commit: %s", e)
                results.append(_Failed(e))
                continue
            raw.execute("RELEASE grp")
            results.append(res)
        return results

    async def _opened_as_daemon(self, conn: Conn) -> int:
        """Run once when a daemon opens the store, in the writer's connection; returns what to log."""
        return 0

    def _writing(self) -> bool:
        return self._writer is not None and not self._writer.done()

    def _unwritable(self) -> StoreUnavailable:
        if self._died is not None:
            return StoreUnavailable(f"the store's writer stopped: {self._died!r}")
        if self.role == "reader":
            return StoreUnavailable(f"store {self.path} is opened read-only")
        return StoreUnavailable("store is not open")

    async def _submit(
        self, fn: Callable[[Conn], Coroutine[Any, Any, T]], rows: int = 1, *, then: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn`` in the writer's next transaction; its result once committed (``then`` is told it first)."""
        if not self._writing():
            raise self._unwritable()
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(fn, rows, fut, then=then))
        return await fut

    async def _submit_grouped(self, op: GroupedOp) -> Any:
        if not self._writing():
            raise self._unwritable()
        assert op.future is not None
        self._queue.put_nowait(op)
        return await op.future

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a webhook-sized write could be stored now (size limit, lock).

        An empty transaction commits even when the store is full, so the probe writes
        PROBE_BYTES and rolls them back, in a transaction of its own.
        """
        if not self._writing():
            raise self._unwritable()
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
