"""Retention: delivered events past the retention window, old delete markers, the loop guard's memory, sagas' records.

A pass examines at most a chunk of rows per writer hold and resumes where it stopped, so dead letters
(kept until purged) are walked a chunk at a time, never all in one hold.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

from .engine import Conn, Engine

_PRUNE_PHASES = ("events", "tombstones", "loop_guard", "sagas")

LOOP_GUARD_SCOPE = "loop-guard:"  # state scopes starting so are the loop guard's memory, pruned by age
SAGA_SCOPE = "saga"  # the sagas' records (integrand.sagarunner.SCOPE), key SOURCE:EVENT_ID~NAME


def saga_event(key: str) -> tuple[str, str] | None:
    """The (source, event id) a saga record's key names: ``SOURCE:EVENT_ID~NAME`` (a name has no ``~``)."""
    head = key.rpartition("~")[0]
    source, _, event_id = head.partition(":")
    return (source, event_id) if source and event_id else None


async def _prune_events(conn: Conn, older_than: float, after: Any, chunk: int) -> tuple[int, Any]:
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
    # Deleting costs ten times what examining does (an event, its deliveries and audit, every index and
    # the counts' triggers): a hold deletes at most a quarter of a chunk and resumes after the last one.
    ids: list[int] = []
    stop = len(rows)
    for i, r in enumerate(rows):
        if not r[2]:
            ids.append(r[0])
            if len(ids) == max(1, chunk // 4):
                stop = i + 1
                break
    if ids:
        marks = ",".join("?" * len(ids))
        for table, col in (("deliveries", "event"), ("audit", "event"), ("events", "id")):
            await conn.execute(f"DELETE FROM {table} WHERE {col} IN ({marks})", ids)  # noqa: S608
    last = rows[stop - 1] if rows else None
    more = stop < len(rows) or len(rows) == chunk
    return len(ids), ((last[1], last[0]) if more and last is not None else None)


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


async def _prune_sagas(conn: Conn, older_than: float, after: Any, chunk: int) -> tuple[int, Any]:
    """Examine up to ``chunk`` saga records past ``after`` (by key); delete those not written since
    ``older_than`` whose event retention has deleted (delivered, then past the window; a dead letter's
    event stays until purged, and with it the record its replay resumes from)."""
    rows = await conn.execute_fetchall(
        "SELECT key, updated_at FROM state WHERE scope = ? AND key > ? ORDER BY key LIMIT ?",
        (SAGA_SCOPE, after or "", chunk),
    )
    gone = []
    for key, updated_at in rows:
        named = saga_event(key)
        if updated_at >= older_than or named is None:
            continue
        found = await conn.execute_fetchall("SELECT 1 FROM events WHERE source = ? AND event_id = ?", named)
        if not found:
            gone.append((SAGA_SCOPE, key))
    if gone:
        await conn.executemany("DELETE FROM state WHERE scope = ? AND key = ?", gone)
    return len(gone), (rows[-1][0] if len(rows) == chunk else None)


_PRUNE_STEPS: dict[str, Callable[..., Coroutine[Any, Any, tuple[int, Any]]]] = {
    "events": _prune_events,
    "tombstones": _prune_tombstones,
    "loop_guard": _prune_loop_guard,
    "sagas": _prune_sagas,
}


class Retention(Engine):
    """``prune``, one step of a retention pass at a time."""

    def _init_retention(self) -> None:
        self._prune_at: tuple[str, Any] = (_PRUNE_PHASES[0], None)  # where the retention pass resumes
        self.pruned = dict.fromkeys(_PRUNE_PHASES, 0)  # rows deleted by retention, by kind

    async def prune(self, older_than: float, chunk: int = 200) -> int:
        """One step of a retention pass; call in a loop until it returns 0 (the pass is over).

        A pass deletes fully delivered events received before ``older_than`` (with their deliveries
        and audit), then delete markers (``entity_versions`` tombstones) and loop-guard state not
        touched since, then the records of sagas not touched since whose event is gone. Each step examines at most ``chunk`` rows in one writer hold and resumes
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
