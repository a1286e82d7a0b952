"""Dead letters and the operator's views: the DLQ (list, show, replay, purge), refused webhooks, counts."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from typing import Any

import orjson

from ..events import Event, VersionError
from .engine import Conn, Engine, _Op
from .ledger import read_entities, superseded
from .queue import _settle_heads
from .records import AuditEntry, DeadLetter, DeliveryDetail, Rejection, ReplayResult

log = logging.getLogger("integrand.store")


REJECTIONS_BUFFERED = 1000  # refused webhooks waiting to be recorded; beyond this the oldest are dropped


class DeadLetters(Engine):
    """What an operator sees and does: dead letters, a delivery's history, refused webhooks, counts."""

    def _init_dead_letters(self) -> None:
        self._rejection_buffer: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=REJECTIONS_BUFFERED)
        self._rejection_flush_queued = False
        self._rejections_keep = 0
        self.rejections_dropped = 0  # refused webhooks not recorded because a flood outran the writer

    def record_rejection(
        self, source: str, status: int, reason: str, remote: str | None, headers: dict[str, str], keep: int
    ) -> None:
        """Remember a refused webhook (without waiting); only the newest ``keep`` are kept.

        Rejections wait in a bounded buffer and are written by one op per commit, however many
        arrive meanwhile: under a flood of bad requests the oldest unwritten ones are dropped (and
        counted in ``rejections_dropped``) rather than growing memory or the writer's queue."""
        if not self._writing() or keep <= 0:
            return
        if len(self._rejection_buffer) == self._rejection_buffer.maxlen:
            self.rejections_dropped += 1
        self._rejection_buffer.append((self.clock(), source, status, reason, remote, orjson.dumps(headers).decode()))
        self._rejections_keep = keep
        if self._rejection_flush_queued:
            return
        self._rejection_flush_queued = True

        async def op(conn: Conn) -> None:
            self._rejection_flush_queued = False
            rows = list(self._rejection_buffer)
            self._rejection_buffer.clear()
            if not rows:
                return
            await conn.insert_rows("INSERT INTO rejections (at, source, status, reason, remote, headers)", rows)
            last = await conn.execute_fetchall("SELECT MAX(id) FROM rejections")
            await conn.execute("DELETE FROM rejections WHERE id <= ?", ((last[0][0] or 0) - self._rejections_keep,))

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
            overtaken: list[int] = []
            if not include_superseded and rows:
                events = {r[0]: Event.from_json(r[4]) for r in rows}
                keys = {
                    (ev.source, ev.entity or "", ev.entity_id) for ev in events.values() if ev.entity_id is not None
                }
                known = await read_entities(conn, keys)
                for r in rows:
                    ev = events[r[0]]
                    if ev.entity_id is None:
                        continue
                    try:
                        if superseded(known.get((ev.source, ev.entity or "", ev.entity_id)), ev):
                            overtaken.append(r[0])
                    except VersionError as e:  # cannot be judged: replayed, as asked
                        log.warning("replay: cannot tell whether delivery %d is superseded: %s", r[0], e)
                rows = [r for r in rows if r[0] not in overtaken]
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
            return ReplayResult(len(rows), overtaken)

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

    async def counts(self) -> dict[tuple[str, str], int]:
        """Deliveries per (sink, state), as the schema's triggers keep them (a few rows, whatever the backlog)."""
        async with self._read().execute("SELECT sink, state, n FROM delivery_counts WHERE n > 0") as cur:
            return {(r[0], r[1]): r[2] for r in await cur.fetchall()}

    async def event_count(self) -> int:
        async with self._read().execute("SELECT COUNT(*) FROM events") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def events_since(
        self, since: float, *, after: int = 0, limit: int = 1000, source: str | None = None
    ) -> list[tuple[int, Event]]:
        """Retained events received at or after ``since``, oldest first, from row ``after`` on (``integrand replay``)."""
        sql = "SELECT id, body FROM events WHERE received_at >= ? AND id > ?"
        params: list[Any] = [since, after]
        if source is not None:
            sql += " AND source = ?"
            params.append(source)
        async with self._read().execute(sql + " ORDER BY id LIMIT ?", (*params, limit)) as cur:
            return [(int(r[0]), Event.from_json(r[1])) for r in await cur.fetchall()]


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


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("could not record a rejected webhook: %s", fut.exception())
