"""The store's public operations as a ``typing.Protocol``: the interface every backend implements.

Today there is one backend, SQLite (``integrand.store.Store``). A second one (PostgreSQL, for
scale-out) implements this Protocol and passes the same contract suite (``tests/test_store_contract.py``:
one set of tests parametrised over backends, one fixture per backend). The guarantees the suite
holds each backend to: an enqueue returns only after the commit that holds it; duplicates by
(source, id) are no-ops; a lease hands out only heads of (sink, entity) lines, expires, and is
fenced (a stale completion is ignored); the ledger's stale guard; a poll's cursor commits with its
events; dead letters replay and purge; retention; connector state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from ..events import Event
from ..store_views import Backlog, EventRecord, EventStory
from .records import (
    CursorRow,
    DeadLetter,
    DeliveryDetail,
    EnqueueResult,
    EntityVersion,
    Leased,
    Outcome,
    Rejection,
    ReplayResult,
)


@runtime_checkable
class StoreBackend(Protocol):
    """What the daemon, the CLI and connectors' state use of a store."""

    deliveries_ready: asyncio.Event  # set after a commit that made deliveries leasable (wakes the dispatcher)

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless a webhook-sized write could be stored now."""

    # the queue
    async def enqueue(
        self, items: Sequence[tuple[Event, Sequence[str]]], *, request_id: str | None = None
    ) -> EnqueueResult: ...
    async def enqueue_with_cursor(
        self, items: Sequence[tuple[Event, Sequence[str]]], source: str, cursor: Any, kind: str = "poll"
    ) -> EnqueueResult: ...
    async def lease(
        self,
        limit: int,
        lease_seconds: float,
        *,
        exclude: Iterable[str] = (),
        only: str | None = None,
        due_only: bool = True,
    ) -> list[Leased]: ...
    async def complete(self, outcomes: Sequence[Outcome]) -> None: ...
    async def release_owned(self) -> int: ...
    async def reclaim_expired(self) -> int: ...
    async def expedite(self, sink: str) -> int: ...
    async def next_due(self, exclude: Iterable[str] = ()) -> float | None: ...

    # cursors and the ledger
    async def cursor_get(self, source: str, kind: str = "poll") -> Any: ...
    async def cursor_set(self, source: str, value: Any, kind: str = "poll") -> None: ...
    async def cursors(self) -> list[CursorRow]: ...
    async def entity_versions(
        self, source: str, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], EntityVersion]: ...

    # dead letters and operator views
    async def dead_letters(self, sink: str | None = None, limit: int = 1000) -> list[DeadLetter]: ...
    async def delivery(self, delivery_id: int) -> DeliveryDetail | None: ...
    async def replay(
        self, ids: Sequence[int] | None = None, sink: str | None = None, *, include_superseded: bool = True
    ) -> ReplayResult: ...
    async def purge(self, ids: Sequence[int] | None = None, sink: str | None = None) -> int: ...
    def record_rejection(
        self, source: str, status: int, reason: str, remote: str | None, headers: dict[str, str], keep: int
    ) -> None: ...
    async def rejections(self, limit: int = 50, source: str | None = None) -> list[Rejection]: ...
    async def counts(self) -> dict[tuple[str, str], int]: ...
    async def event_count(self) -> int: ...
    async def events_since(
        self, since: float, *, after: int = 0, limit: int = 1000, source: str | None = None
    ) -> list[tuple[int, Event]]: ...

    # the operator's views (store_views.OperatorViews, pg_views.PgOperatorViews)
    async def find_events(self, ident: str, limit: int = 20) -> list[EventRecord]: ...
    async def event_story(self, row: int) -> EventStory | None: ...
    async def list_events(
        self, *, source: str | None = None, since: float | None = None, state: str | None = None, limit: int = 100
    ) -> list[tuple[EventRecord, dict[str, str]]]: ...
    async def backlog(self) -> list[Backlog]: ...

    # retention and connector state
    async def prune(self, older_than: float, chunk: int = 200) -> int: ...
    async def state_get(self, scope: str, key: str) -> Any: ...
    async def state_set(self, scope: str, key: str, value: Any) -> None: ...
