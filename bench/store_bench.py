"""The queue alone: integrand's Store beside huey's SqliteStorage and persist-queue's SQLiteAckQueue.

Each queue gets the same work, all with ``PRAGMA synchronous = FULL`` (read back and
recorded): 20,000 payloads of 1 KB enqueued one per call by concurrent producers,
then taken and acknowledged until empty by concurrent consumers. Then the backlog
test: with 2,000 and with 20,000 waiting (written by an earlier process), the rate of
taking+acking the first 1,000, and of draining the whole backlog.

How each library gets synchronous=FULL:
- integrand: ``Store(synchronous="full")`` runs ``PRAGMA synchronous = FULL`` on its connections.
- huey: ``SqliteStorage(fsync=True)`` runs ``pragma synchronous=2`` (huey/storage.py, _create_connection).
- persist-queue: has no option (it only sets ``journal_mode=WAL``, persistqueue/sqlbase.py
  _new_db_connection); SQLite's default is FULL and we also run ``PRAGMA synchronous=FULL``
  on both of its connections. Each value is read back with ``PRAGMA synchronous`` (2 = FULL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

PRODUCERS = 64
CONSUMERS = 4
LEASE_BATCH = 100
PAYLOAD_BYTES = 1024
# persist-queue's get() scans past every acked row, so draining 20,000 takes minutes: drains stop
# after this long and report the rate over what they took (it only gets slower, so this flatters it).
DRAIN_CAP_S = 60.0
BACKLOG_DRAIN_CAP_S = 30.0

QUEUES = {
    "integrand": "integrand Store (group commit; lease/complete 100 at a time)",
    "huey": "huey SqliteStorage (enqueue / dequeue, one per transaction)",
    "persistqueue": "persist-queue SQLiteAckQueue (put / get / ack, one per transaction)",
}


def payload(i: int) -> dict[str, Any]:
    """A JSON object that serializes to exactly PAYLOAD_BYTES."""
    base = orjson.dumps({"id": i, "pad": ""})
    return {"id": i, "pad": "x" * (PAYLOAD_BYTES - len(base))}


# --- integrand -------------------------------------------------------------------------------


def _event(i: int, tag: str) -> Any:
    from integrand.events import Event

    return Event(id=f"{tag}-{i}", source="bench", type="bench.event", data=payload(i))


async def _integrand_open(path: Path) -> Any:
    from integrand.store import Store

    store = Store(path, synchronous="full")
    await store.open()
    return store


async def _integrand_sync(store: Any) -> int:
    async with store._conn.execute("PRAGMA synchronous") as cur:
        row = await cur.fetchone()
    return int(row[0])


async def _integrand_drain(store: Any, limit: int | None, cap: float = DRAIN_CAP_S) -> int:
    """Lease and complete with CONSUMERS tasks until empty (or ``limit`` taken, or ``cap`` s); returns how many."""
    from integrand.store import Outcome

    taken = 0

    async def consumer() -> None:
        nonlocal taken
        deadline = time.monotonic() + cap
        while (limit is None or taken < limit) and time.monotonic() < deadline:
            want = LEASE_BATCH if limit is None else min(LEASE_BATCH, limit - taken)
            if want <= 0:
                return
            taken += want  # reserve before awaiting so consumers do not overshoot the limit
            rows = await store.lease(want, 60.0)
            taken -= want - len(rows)
            if not rows:
                return
            await store.complete([Outcome(r, "done") for r in rows])

    await asyncio.gather(*(consumer() for _ in range(CONSUMERS)))
    return taken


async def integrand_e2e(workdir: Path, n: int) -> dict[str, Any]:
    store = await _integrand_open(workdir / "integrand.db")
    try:
        sync = await _integrand_sync(store)

        async def producer(p: int) -> None:
            for i in range(p, n, PRODUCERS):
                await store.enqueue([(_event(i, "e2e"), ["sink"])])

        t0 = time.perf_counter()
        await asyncio.gather(*(producer(p) for p in range(PRODUCERS)))
        t1 = time.perf_counter()
        taken = await _integrand_drain(store, None)
        t2 = time.perf_counter()
    finally:
        await store.close()
    return _e2e_result(n, taken, t0, t1, t2, sync)


async def integrand_backlog(workdir: Path, backlog: int, take: int) -> dict[str, Any]:
    store = await _integrand_open(workdir / "integrand.db")
    try:
        for start in range(0, backlog, 1000):
            await store.enqueue([(_event(i, "bl"), ["sink"]) for i in range(start, min(backlog, start + 1000))])
    finally:
        await store.close()
    _settle()
    store = await _integrand_open(workdir / "integrand.db")
    try:
        t0 = time.perf_counter()
        taken = await _integrand_drain(store, take)
        t1 = time.perf_counter()
        rest = await _integrand_drain(store, None, BACKLOG_DRAIN_CAP_S)
        t2 = time.perf_counter()
    finally:
        await store.close()
    return _backlog_result(backlog, taken, rest, t0, t1, t2)


def _settle() -> None:
    """Let the kernel write back the untimed fill before the clock starts: the 24 MB a 20,000-event
    backlog leaves dirty would otherwise be flushed during the measured window, slowing its fsyncs,
    and the 2,000-event case (a tenth of that) would be compared under different disk load."""
    os.sync()


def _run_async(coro: Any) -> Any:
    """integrand's store as `integrand run` runs it: on uvloop, with the daemon's GIL switch interval
    (the other queues run on threads of their own and keep the interpreter's default)."""
    import uvloop

    from integrand.cli import GIL_SWITCH_INTERVAL

    before = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        return uvloop.run(coro)
    finally:
        sys.setswitchinterval(before)


# --- huey ------------------------------------------------------------------------------------


def _huey_open(workdir: Path) -> Any:
    from huey.storage import SqliteStorage

    return SqliteStorage(name="bench", filename=str(workdir / "huey.db"), fsync=True)


def _huey_drain(storage: Any, limit: int | None, cap: float = DRAIN_CAP_S) -> int:
    counter = _Counter(limit, cap)

    def consumer() -> None:
        while counter.reserve():
            if storage.dequeue() is None:
                counter.unreserve()
                return

    _threads(consumer, CONSUMERS)
    return counter.value


def huey_e2e(workdir: Path, n: int) -> dict[str, Any]:
    storage = _huey_open(workdir)
    try:
        sync = int(storage.sql("pragma synchronous", results=True)[0][0])

        def producer(p: int) -> None:
            for i in range(p, n, PRODUCERS):
                storage.enqueue(orjson.dumps(payload(i)))

        t0 = time.perf_counter()
        _threads(producer, PRODUCERS)
        t1 = time.perf_counter()
        taken = _huey_drain(storage, None)
        t2 = time.perf_counter()
    finally:
        storage.close()
    return _e2e_result(n, taken, t0, t1, t2, sync)


def huey_backlog(workdir: Path, backlog: int, take: int) -> dict[str, Any]:
    storage = _huey_open(workdir)
    try:
        # Filled in one transaction with huey's own INSERT (storage.enqueue), untimed.
        with storage.db(commit=True) as curs:
            curs.executemany(
                "insert into task (queue, data, priority) values (?, ?, ?)",
                [(storage.name, orjson.dumps(payload(i)), 0) for i in range(backlog)],
            )
    finally:
        storage.close()
    _settle()
    storage = _huey_open(workdir)
    try:
        t0 = time.perf_counter()
        taken = _huey_drain(storage, take)
        t1 = time.perf_counter()
        rest = _huey_drain(storage, None, BACKLOG_DRAIN_CAP_S)
        t2 = time.perf_counter()
    finally:
        storage.close()
    return _backlog_result(backlog, taken, rest, t0, t1, t2)


# --- persist-queue -----------------------------------------------------------------------------


def _pq_open(workdir: Path) -> Any:
    from persistqueue import SQLiteAckQueue

    q = SQLiteAckQueue(str(workdir / "pq"), multithreading=True)
    for conn in {id(q._getter): q._getter, id(q._putter): q._putter}.values():
        conn.execute("PRAGMA synchronous=FULL")
    return q


def _pq_sync(q: Any) -> int:
    values = {int(c.execute("PRAGMA synchronous").fetchone()[0]) for c in (q._getter, q._putter)}
    return min(values)


def _pq_drain(q: Any, limit: int | None, cap: float = DRAIN_CAP_S) -> int:
    from persistqueue.exceptions import Empty

    counter = _Counter(limit, cap)

    def consumer() -> None:
        while counter.reserve():
            try:
                item = q.get(block=False, raw=True)
            except Empty:
                counter.unreserve()
                return
            q.ack(id=item["pqid"])

    _threads(consumer, CONSUMERS)
    return counter.value


def pq_e2e(workdir: Path, n: int) -> dict[str, Any]:
    q = _pq_open(workdir)
    try:
        sync = _pq_sync(q)

        def producer(p: int) -> None:
            for i in range(p, n, PRODUCERS):
                q.put(orjson.dumps(payload(i)))

        t0 = time.perf_counter()
        _threads(producer, PRODUCERS)
        t1 = time.perf_counter()
        taken = _pq_drain(q, None)
        t2 = time.perf_counter()
    finally:
        q.close()
    return _e2e_result(n, taken, t0, t1, t2, sync)


def pq_backlog(workdir: Path, backlog: int, take: int) -> dict[str, Any]:
    q = _pq_open(workdir)
    try:
        # Filled in one transaction with persist-queue's own INSERT and serializer (q.put), untimed.
        with q._putter as tran:
            tran.executemany(
                q._sql_insert,
                [(q._serializer.dumps(orjson.dumps(payload(i))), time.time()) for i in range(backlog)],
            )
    finally:
        q.close()
    _settle()
    q = _pq_open(workdir)
    try:
        t0 = time.perf_counter()
        taken = _pq_drain(q, take)
        t1 = time.perf_counter()
        rest = _pq_drain(q, None, BACKLOG_DRAIN_CAP_S)
        t2 = time.perf_counter()
    finally:
        q.close()
    return _backlog_result(backlog, taken, rest, t0, t1, t2)


# --- shared ----------------------------------------------------------------------------------


class _Counter:
    """How many items consumer threads have taken, stopping at ``limit`` or after ``cap`` seconds."""

    def __init__(self, limit: int | None, cap: float):
        self.limit = limit
        self.deadline = time.monotonic() + cap
        self.value = 0
        self.lock = threading.Lock()

    def reserve(self) -> bool:
        with self.lock:
            if (self.limit is not None and self.value >= self.limit) or time.monotonic() >= self.deadline:
                return False
            self.value += 1
            return True

    def unreserve(self) -> None:
        with self.lock:
            self.value -= 1


def _threads(fn: Callable[..., None], n: int) -> None:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            fn(i) if fn.__code__.co_argcount else fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _e2e_result(n: int, taken: int, t0: float, t1: float, t2: float, sync: int) -> dict[str, Any]:
    """Rates; a drain stopped by DRAIN_CAP_S counts at the rate it had (end to end: n at that rate)."""
    if taken != n and t2 - t1 < DRAIN_CAP_S:
        raise RuntimeError(f"drained {taken} of {n} events")
    drain_rate = taken / (t2 - t1)
    return {
        "n": n,
        "taken": taken,
        "capped": taken != n,
        "synchronous": sync,
        "enqueue_s": t1 - t0,
        "drain_s": t2 - t1,
        "enqueue_rate": n / (t1 - t0),
        "drain_rate": drain_rate,
        "e2e_rate": n / ((t1 - t0) + n / drain_rate),
    }


def _backlog_result(backlog: int, taken: int, rest: int, t0: float, t1: float, t2: float) -> dict[str, Any]:
    if taken + rest != backlog and t2 - t1 < BACKLOG_DRAIN_CAP_S:
        raise RuntimeError(f"drained {taken + rest} of a backlog of {backlog}")
    return {
        "taken": taken,
        "seconds": t1 - t0,
        "rate": taken / (t1 - t0),
        "drained": taken + rest,
        "capped": taken + rest != backlog,
        "drain_all_rate": (taken + rest) / (t2 - t0),
    }


def e2e_once(queue: str, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"integrand-bench-{queue}-") as tmp:
        workdir = Path(tmp)
        if queue == "integrand":
            return dict(_run_async(integrand_e2e(workdir, n)))
        if queue == "huey":
            return huey_e2e(workdir, n)
        return pq_e2e(workdir, n)


def backlog_once(queue: str, backlog: int, take: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"integrand-bench-{queue}-") as tmp:
        workdir = Path(tmp)
        if queue == "integrand":
            return dict(_run_async(integrand_backlog(workdir, backlog, take)))
        if queue == "huey":
            return huey_backlog(workdir, backlog, take)
        return pq_backlog(workdir, backlog, take)


if __name__ == "__main__":  # a quick look: python bench/store_bench.py
    with contextlib.suppress(KeyboardInterrupt):
        for q in QUEUES:
            print(q, e2e_once(q, 2000), backlog_once(q, 2000, 500))
