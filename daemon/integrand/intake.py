"""The one way events enter the store: route lookup, enqueue (with the cursor of a pull), metrics, nudge.

Webhooks (the listener), polls (the poller) and reconciliation all take events in through
``intake``, so every source's events are routed, counted and announced the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .events import Event
from .metrics import Metrics
from .routes import Router
from .store import EnqueueResult, StoreBackend

NO_CURSOR: Any = object()  # a push (a webhook): no cursor moves with the events


async def intake(
    store: StoreBackend,
    router: Router,
    source: str,
    events: Sequence[Event],
    *,
    metrics: Metrics | None = None,
    cursor: Any = NO_CURSOR,
    kind: str = "poll",
    on_accepted: Callable[[str, Sequence[Event]], None] | None = None,
    request_id: str | None = None,
) -> EnqueueResult:
    """Store ``events`` of ``source`` with one delivery per routed sink; returns once committed.

    With ``cursor``, the source's ``kind`` cursor is committed in the same transaction (a poll page,
    a reconciliation step), even when there are no events. Raises ``StoreUnavailable`` (retry later)
    or ``UnstorableEvent`` (a connector produced an event the store cannot hold: nothing is stored).
    ``on_accepted`` (the hybrid sources' nudge) hears of the events once they are stored; a webhook's
    ``request_id`` is kept with its events (their story shows it)."""
    items = [(ev, router.sinks_for(ev)) for ev in events]
    if cursor is NO_CURSOR:
        result = await store.enqueue(items, request_id=request_id) if items else EnqueueResult(0, 0)
    else:
        result = await store.enqueue_with_cursor(items, source, cursor, kind=kind)
    if metrics is not None:
        metrics.events.inc(source, "accepted", amount=result.accepted)
        if result.duplicates or result.stale:
            metrics.events.inc(source, "duplicate", amount=result.duplicates + result.stale)
    if on_accepted is not None and result.accepted:
        on_accepted(source, events)
    return result
