"""The replication protocol in one thread: a logical slot streamed to integrand as the server writes it.

No asyncio driver speaks the walsender protocol (asyncpg has none; psycopg 3 hands over a raw
COPY_BOTH stream whose framing, keepalives and feedback would be ours to write), so one thread per
streaming source runs psycopg2's ``LogicalReplicationConnection`` — libpq underneath, so every DSN
option, TLS mode and authentication method works as for the other connections. The thread only
moves bytes: it reads the ``pgoutput`` messages as they arrive and hands them to the event loop in
batches (a bounded queue: a store that stalls stops the reading, and TCP stops the server), and it
sends the server the position integrand has committed (``confirm``), never more. Decoding stays on
the event loop (:mod:`integrand_postgres.pgoutput`).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import select
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras

from integrand.connector import AuthError, PermanentError, PositionLost, RetryableError

from .pg import ConnectionConfig

# Messages per hand-over to the event loop, and hand-overs that may wait before the thread stops reading.
CHUNK = 2000
QUEUE_DEPTH = 64
TICK = 0.1  # seconds: how often an idle thread looks at its stop flag and the position to confirm

Messages = list[tuple[int, bytes]]  # (LSN of the message, pgoutput bytes)


def libpq_params(cfg: ConnectionConfig, base_dir: Path, application_name: str) -> dict[str, Any]:
    """The source's connection keys as libpq parameters (the DSN itself is passed as is)."""

    def at(p: Path) -> str:
        return str(p if p.is_absolute() else base_dir / p)

    kw: dict[str, Any] = {
        "application_name": application_name[:63],
        "connect_timeout": max(1, int(cfg.connect_timeout)),
    }
    if cfg.ssl is not None:
        kw["sslmode"] = cfg.ssl
    elif cfg.ssl_root_cert is not None:
        kw["sslmode"] = "verify-full"
    if cfg.ssl_root_cert is not None:
        kw["sslrootcert"] = at(cfg.ssl_root_cert)
    if cfg.ssl_cert is not None and cfg.ssl_key is not None:
        kw["sslcert"], kw["sslkey"] = at(cfg.ssl_cert), at(cfg.ssl_key)
    return kw


class WalReader:
    """One replication connection in a thread; ``get`` (on the loop) returns what arrived, ``confirm`` moves the slot."""

    def __init__(self, dsn: str, params: Mapping[str, Any], slot: str, publication: str, start_lsn: int):
        self._dsn, self._params = dsn, dict(params)
        self._slot, self._publication, self._start = slot, publication, start_lsn
        self._q: queue.Queue[Messages | BaseException] = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._confirmed = 0  # written by the loop (a plain int: one writer, one reader)
        self._arrived = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.wal_end = 0  # the server's WAL end as last reported (keepalives, data), once what precedes it is queued
        self._error: BaseException | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"walsender {self._slot}", daemon=True)
        self._thread.start()

    def confirm(self, lsn: int) -> None:
        """Integrand has committed everything up to ``lsn``: the slot may release it (sent within ``TICK``)."""
        self._confirmed = max(self._confirmed, lsn)

    async def get(self, timeout: float) -> Messages:  # noqa: ASYNC109 - an idle deadline, not a cancel scope
        """What arrived since the last call, waiting up to ``timeout`` for something; raises the thread's error."""
        if self._error is not None:
            raise self._error
        if self._q.empty():
            self._arrived.clear()
            if self._q.empty():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), timeout)
        out: Messages = []
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return out
            if isinstance(item, BaseException):
                if out:  # what came before the error first; the error is raised at the next call
                    self._error = item
                    return out
                raise item
            out.extend(item)

    async def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t.is_alive():
            await asyncio.to_thread(t.join, 10)

    # --- the thread -------------------------------------------------------------------------------

    def _hand_over(self, item: Messages | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=TICK)
            except queue.Full:
                continue
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(self._arrived.set)
            return True
        return False

    def _run(self) -> None:
        conn: Any = None
        try:
            conn = psycopg2.connect(
                self._dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection, **self._params
            )
            cur = conn.cursor()
            cur.start_replication(
                slot_name=self._slot,
                decode=False,
                start_lsn=self._start,
                options={"proto_version": "1", "publication_names": self._publication},
                status_interval=10,
            )
            sent = self._start
            while not self._stop.is_set():
                got: Messages = []
                while len(got) < CHUNK:
                    msg = cur.read_message()
                    if msg is None:
                        break
                    got.append((int(msg.data_start), bytes(msg.payload)))
                end = int(cur.wal_end or 0)
                if got and not self._hand_over(got):
                    return
                # Published only once what was read up to it is in the queue: the loop moves the slot to
                # ``wal_end`` when it has nothing of ours before it, so a wal_end ahead of messages not yet
                # handed over would skip them (and confirm them to the server) unread.
                self.wal_end = max(self.wal_end, end)
                c = self._confirmed
                if c > sent:
                    cur.send_feedback(flush_lsn=c, force=True)
                    sent = c
                if not got:
                    select.select([cur], [], [], TICK)
        except BaseException as e:  # handed to the loop, which sorts it (classify)
            if not self._stop.is_set():
                self._hand_over(replication_error(e, self._slot))
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()


def replication_error(e: BaseException, slot: str) -> BaseException:
    """The integrand error for what the replication connection raised, sorted by what to do next."""
    code = getattr(e, "pgcode", None) or ""
    if code == "42704":  # undefined object: the slot is gone
        return PositionLost(f"replication slot {slot} does not exist (dropped?): {e}".strip())
    if code == "55000":  # object not in prerequisite state: the slot was invalidated
        return PositionLost(f"replication slot {slot} can no longer be read: {e}".strip())
    if code.startswith("28"):
        return AuthError(f"replication connection: the server refused the credentials: {e}".strip())
    if code == "42501":
        return PermanentError(
            f"replication connection: permission denied ({e}); the DSN's role needs REPLICATION".strip()
        )
    if isinstance(e, psycopg2.OperationalError | OSError) or code[:2] in ("08", "53", "57", "55", "40", "58"):
        # Includes 55006 "slot is active for PID …": a previous session still holds it; it lets go soon.
        return RetryableError(f"replication connection: {type(e).__name__}: {e}".strip())
    if isinstance(e, psycopg2.Error):
        return PermanentError(f"replication connection: {type(e).__name__}: {e}".strip())
    return RetryableError(f"replication connection: {type(e).__name__}: {e}".strip())
