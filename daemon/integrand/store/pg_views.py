"""The operator views (``store_views.OperatorViews``) on the PostgreSQL store: the same records, its SQL."""

from __future__ import annotations

from typing import Any

import orjson

from ..store_views import Backlog, DeliveryRecord, EventRecord, EventStory, StoryEntry, received_detail

_EVENT_SQL = "SELECT id, source, event_id, type, received_at, body, request_id FROM events"


def _event(r: Any) -> EventRecord:
    return EventRecord(r[0], r[1], r[2], r[3], r[4], orjson.loads(r[5]), r[6])


class PgOperatorViews:
    """Read-only queries for the admin API and the CLI; ``_fetch`` is the store's pooled read."""

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:  # pragma: no cover - provided by PgStore
        raise NotImplementedError

    async def find_events(self, ident: str, limit: int = 20) -> list[EventRecord]:
        """Events by integrand id (a number), ``source:provider-id``, or the provider's delivery id alone."""
        rows: list[Any] = []
        if ident.isdigit():
            rows += await self._fetch(_EVENT_SQL + " WHERE id = $1", int(ident))
        source, sep, rest = ident.partition(":")
        if sep and rest:
            rows += await self._fetch(_EVENT_SQL + " WHERE source = $1 AND event_id = $2", source, rest)
        rows += await self._fetch(_EVENT_SQL + " WHERE event_id = $1 ORDER BY id LIMIT $2", ident, limit)
        seen: set[int] = set()
        out = []
        for r in rows:
            if r[0] not in seen:
                seen.add(r[0])
                out.append(_event(r))
        return out[:limit]

    async def event_story(self, row: int) -> EventStory | None:
        """Everything the store knows about one event: its deliveries and every audit line, in time order."""
        found = await self._fetch(_EVENT_SQL + " WHERE id = $1", row)
        if not found:
            return None
        event = _event(found[0])
        deliveries = [
            DeliveryRecord(*d)
            for d in await self._fetch(
                "SELECT id, sink, state, attempts, created_at, updated_at, next_attempt_at, last_error "
                "FROM deliveries WHERE event = $1 ORDER BY id",
                row,
            )
        ]
        audit = [
            StoryEntry(*a)
            for a in await self._fetch(
                "SELECT at, delivery, action, detail FROM audit WHERE event = $1 ORDER BY id", row
            )
        ]
        history = [StoryEntry(event.received_at, None, "received", received_detail(event))]
        history += [StoryEntry(event.received_at, d.id, "routed", f"to sink {d.sink}") for d in deliveries]
        history += audit
        for d in deliveries:
            if d.state == "done" and d.last_error is None:
                history.append(StoryEntry(d.updated_at, d.id, "delivered", f"sink={d.sink} attempts={d.attempts}"))
        history.sort(key=lambda e: e.at)
        return EventStory(event, deliveries, history)

    async def list_events(
        self, *, source: str | None = None, since: float | None = None, state: str | None = None, limit: int = 100
    ) -> list[tuple[EventRecord, dict[str, str]]]:
        """Newest events first with each delivery's state by sink; ``state`` keeps events with a delivery in it."""
        events = [
            _event(r)
            for r in await self._fetch(
                "SELECT e.id, e.source, e.event_id, e.type, e.received_at, e.body, e.request_id FROM events e "
                "WHERE ($1::text IS NULL OR e.source = $1) AND ($2::float8 IS NULL OR e.received_at >= $2) "
                "AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM deliveries x WHERE x.event = e.id AND x.state = $3)) "
                "ORDER BY e.id DESC LIMIT $4",
                source or None,
                since,
                state or None,
                limit,
            )
        ]
        states: dict[int, dict[str, str]] = {e.row: {} for e in events}
        if states:
            for ev, sink, st in await self._fetch(
                "SELECT event, sink, state FROM deliveries WHERE event = ANY($1::bigint[])", list(states)
            ):
                states[ev][sink] = st
        return [(e, states[e.row]) for e in events]

    async def backlog(self) -> list[Backlog]:
        """Pending deliveries per (sink, source) with the time the oldest (lowest id) became pending."""
        rows = await self._fetch(
            "SELECT g.sink, g.source, g.n, d.created_at FROM (SELECT sink, split_part(entity_key, '/', 1) AS source, "
            "count(*) AS n, min(id) AS first FROM deliveries WHERE active GROUP BY 1, 2) g "
            "JOIN deliveries d ON d.id = g.first"
        )
        return [Backlog(r[0], r[1], r[2], r[3]) for r in rows]
