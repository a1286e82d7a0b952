"""Operator views of the store (read only): one event's story, event search, backlog age per sink and source.

A mixin of :class:`integrand.store.Store`, reading through its reader connection; kept apart so the admin
API's queries do not grow the queue's module (see /work/coord/store-requests.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import aiosqlite


@dataclass(frozen=True)
class EventRecord:
    """One stored event: ``row`` is integrand's id for it, ``event_id`` the provider's."""

    row: int
    source: str
    event_id: str
    type: str
    received_at: float
    body: dict[str, Any]
    request_id: str | None = None  # the webhook request it arrived in (None for polled events)


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    sink: str
    state: str
    attempts: int
    created_at: float
    updated_at: float
    next_attempt_at: float
    last_error: str | None


@dataclass(frozen=True)
class StoryEntry:
    at: float
    delivery: int | None
    action: str
    detail: str | None


@dataclass(frozen=True)
class EventStory:
    event: EventRecord
    deliveries: list[DeliveryRecord]
    history: list[StoryEntry]


@dataclass(frozen=True)
class Backlog:
    """Undelivered (ready or leased) deliveries of one sink from one source, and the oldest one's age base."""

    sink: str
    source: str
    pending: int
    oldest_since: float


STATES = ("ready", "leased", "done", "dead")


class OperatorViews:
    """Read-only queries for the admin API and the CLI; ``_read()`` is the store's reader connection."""

    def _read(self) -> aiosqlite.Connection:  # pragma: no cover - provided by Store
        raise NotImplementedError

    async def find_events(self, ident: str, limit: int = 20) -> list[EventRecord]:
        """Events by integrand id (a number), ``source:provider-id``, or the provider's delivery id alone."""
        conn = self._read()
        rows: list[Any] = []
        if ident.isdigit():
            async with conn.execute(_EVENT_SQL + " WHERE id = ?", (int(ident),)) as cur:
                rows.extend(await cur.fetchall())
        source, sep, rest = ident.partition(":")
        if sep and rest:
            async with conn.execute(_EVENT_SQL + " WHERE source = ? AND event_id = ?", (source, rest)) as cur:
                rows.extend(await cur.fetchall())
        async with conn.execute(_EVENT_SQL + " WHERE event_id = ? ORDER BY id LIMIT ?", (ident, limit)) as cur:
            rows.extend(await cur.fetchall())
        seen: set[int] = set()
        out = []
        for r in rows:
            if r[0] not in seen:
                seen.add(r[0])
                out.append(_event(r))
        return out[:limit]

    async def event_story(self, row: int) -> EventStory | None:
        """Everything the store knows about one event: its deliveries and every audit line, in time order."""
        conn = self._read()
        async with conn.execute(_EVENT_SQL + " WHERE id = ?", (row,)) as cur:
            r = await cur.fetchone()
        if r is None:
            return None
        event = _event(r)
        async with conn.execute(
            "SELECT id, sink, state, attempts, created_at, updated_at, next_attempt_at, last_error "
            "FROM deliveries WHERE event = ? ORDER BY id",
            (row,),
        ) as cur:
            deliveries = [DeliveryRecord(*d) for d in await cur.fetchall()]
        async with conn.execute(
            "SELECT at, delivery, action, detail FROM audit WHERE event = ? ORDER BY id", (row,)
        ) as cur:
            audit = [StoryEntry(*a) for a in await cur.fetchall()]
        history = [StoryEntry(event.received_at, None, "received", received_detail(event))]
        # Deliveries are made in the event's own transaction (a replay resets created_at, so not that).
        history += [StoryEntry(event.received_at, d.id, "routed", f"to sink {d.sink}") for d in deliveries]
        history += audit
        for d in deliveries:
            # Success is kept on the delivery row itself (one write per delivery); a purge is 'done' with an error.
            if d.state == "done" and d.last_error is None:
                history.append(StoryEntry(d.updated_at, d.id, "delivered", f"sink={d.sink} attempts={d.attempts}"))
        history.sort(key=lambda e: e.at)
        return EventStory(event, deliveries, history)

    async def list_events(
        self, *, source: str | None = None, since: float | None = None, state: str | None = None, limit: int = 100
    ) -> list[tuple[EventRecord, dict[str, str]]]:
        """Newest events first with each delivery's state by sink; ``state`` keeps events with a delivery in it."""
        where: list[str] = []
        params: list[Any] = []
        if source:
            where.append("e.source = ?")
            params.append(source)
        if since is not None:
            where.append("e.received_at >= ?")
            params.append(since)
        if state:
            where.append("EXISTS (SELECT 1 FROM deliveries x WHERE x.event = e.id AND x.state = ?)")
            params.append(state)
        sql = "SELECT e.id, e.source, e.event_id, e.type, e.received_at, e.body, e.request_id FROM events e"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY e.id DESC LIMIT ?"
        params.append(limit)
        conn = self._read()
        async with conn.execute(sql, params) as cur:
            events = [_event(r) for r in await cur.fetchall()]
        states: dict[int, dict[str, str]] = {e.row: {} for e in events}
        rows = list(states)
        for i in range(0, len(rows), 500):
            chunk = rows[i : i + 500]
            q = f"SELECT event, sink, state FROM deliveries WHERE event IN ({','.join('?' * len(chunk))})"  # noqa: S608
            async with conn.execute(q, chunk) as cur:
                for ev, sink, st in await cur.fetchall():
                    states[ev][sink] = st
        return [(e, states[e.row]) for e in events]

    async def backlog(self) -> list[Backlog]:
        """Pending deliveries per (sink, source) with the time the oldest became pending.

        Counted on the per-entity-order index alone (no table rows read); "oldest" is the lowest
        delivery id of each group, whose pending time is then read for those few rows only (a replayed
        delivery keeps its old id but restarts its time: at the head of a group, it can make the
        backlog look younger than it is, never older)."""
        conn = self._read()
        async with conn.execute(
            "SELECT sink, substr(entity_key, 1, instr(entity_key, '/') - 1), COUNT(*), MIN(id) "
            "FROM deliveries INDEXED BY deliveries_active WHERE active = 1 GROUP BY 1, 2"
        ) as cur:
            groups = list(await cur.fetchall())
        if not groups:
            return []
        ids = [g[3] for g in groups]
        since: dict[int, float] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"SELECT id, created_at FROM deliveries WHERE id IN ({','.join('?' * len(chunk))})"  # noqa: S608
            async with conn.execute(q, chunk) as cur:
                since.update({r[0]: r[1] for r in await cur.fetchall()})
        return [Backlog(g[0], g[1], g[2], since.get(g[3], 0.0)) for g in groups]


_EVENT_SQL = "SELECT id, source, event_id, type, received_at, body, request_id FROM events"


def _event(r: Any) -> EventRecord:
    return EventRecord(r[0], r[1], r[2], r[3], r[4], orjson.loads(r[5]), r[6])


def received_detail(event: EventRecord) -> str:
    """The story's first line: where the event came from, and in which webhook request."""
    via = f" request_id={event.request_id}" if event.request_id else ""
    return f"source={event.source}{via}"
