"""Aggregation on routes: gather a route's events into windows and deliver one event per window.

A route with ``[routes.aggregate]`` does not send its events to its sinks one by one. The router
sends them to a virtual sink per (route, sink), an :class:`Aggregator`, which keeps each group's
open window in the store (the connector state table, so nothing lives only in memory) and, when
the window is full (``max_count``) or its time is up (``window``), enqueues one aggregated event
for the real sink. The aggregated event's id is a hash of the window's event keys, so a window
flushed again after a crash (enqueued, then killed before the window was cleared) is a duplicate
that the store drops; its content is ordered by the events' ``received_at`` and ids, so the same
events always make the same output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from .connector import Connector, ConnectorConfig, ConnectorContext, Event, Sink, content_id
from .types import Duration

if TYPE_CHECKING:
    from .config import Settings
    from .dispatcher import SinkRuntime
    from .store import Store

log = logging.getLogger("integrand.aggregate")

VIRTUAL = "~agg"
_PATH = r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$"


class AggregateSettings(ConnectorConfig):
    """``[routes.aggregate]``: windows by count, by time, or both, per group."""

    # "entity" (the event's entity), a dotted path into the envelope ("data.customer_id"), or unset: one group.
    group_by: str | None = None
    max_count: int | None = Field(default=None, ge=1, le=100_000)
    window: Duration | None = None
    # Time windows start at multiples of `window` since the epoch (UTC): "1d" is a calendar day. false: they
    # start with their first event.
    align: bool = True
    type: str = "aggregate"
    items: bool = True
    sum: list[str] = []

    @field_validator("group_by")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        import re

        if v is not None and v != "entity" and not re.match(_PATH, v):
            raise ValueError('group_by: "entity" or a dotted path such as "data.customer_id"')
        return v

    @field_validator("sum")
    @classmethod
    def _sums(cls, v: list[str]) -> list[str]:
        import re

        for p in v:
            if not re.match(_PATH, p):
                raise ValueError(f"sum: {p!r} is not a dotted path such as 'data.amount'")
        return v

    @model_validator(mode="after")
    def _closes(self) -> AggregateSettings:
        if self.max_count is None and self.window is None:
            raise ValueError("aggregate: give max_count, window, or both (when does a window close?)")
        if self.window is not None and self.window <= 0:
            raise ValueError("aggregate: window must be positive")
        return self


def virtual_sink(route_index: int, sink: str) -> str:
    """The internal sink name the router uses for an aggregated route's sink (never a configured name)."""
    return f"{sink}{VIRTUAL}{route_index}"


def aggregate_source(source: str) -> str:
    """The source of aggregated events: no route matches it, so they are not mapped or aggregated again."""
    return f"{source}.aggregate"


def _number(v: Any) -> int | float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return v


def build_output(
    settings: AggregateSettings,
    source: str,
    tag: str,
    group: str,
    items: Sequence[Mapping[str, Any]],
    closed_at: float,
    reason: str,
) -> Event:
    """The one event a closed window becomes; a pure function of the window's items (deterministic)."""
    from .routes import dig

    ordered = sorted(items, key=lambda e: (str(e.get("received_at") or ""), str(e.get("source")), str(e.get("id"))))
    sums: dict[str, int | float] = {}
    for path in settings.sum:
        total: int | float = 0
        for e in ordered:
            n = _number(dig(e, path))
            if n is not None:
                total += n
        sums[path] = total
    keys = [f"{e['source']}:{e['id']}" for e in ordered]
    data: dict[str, Any] = {
        "group": group,
        "count": len(ordered),
        "closed": reason,
        "closed_at": datetime.fromtimestamp(closed_at, UTC).isoformat().replace("+00:00", "Z"),
        "first_received_at": ordered[0].get("received_at") if ordered else None,
        "last_received_at": ordered[-1].get("received_at") if ordered else None,
    }
    if settings.sum:
        data["sums"] = sums
    if settings.items:
        data["items"] = list(ordered)
    return Event(
        id=content_id(tag, group, *keys),
        source=aggregate_source(source),
        type=settings.type,
        data=data,
        entity="aggregate",
        entity_id=group,
        occurred_at=data["closed_at"],
        meta={"aggregate": {"route": tag, "keys": len(keys)}},
    )


class Aggregator(Connector[AggregateSettings], Sink):
    """The virtual sink of one aggregated (route, sink): windows kept in the store, flushed to ``target``."""

    Config = AggregateSettings
    batch_size = 256

    def __init__(
        self,
        config: AggregateSettings,
        ctx: ConnectorContext,
        *,
        store: Store,
        source: str,
        target: str,
        tag: str,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(config, ctx)
        self.store = store
        self.source = source
        self.target = target
        self.tag = tag
        self.clock = clock
        self._lock = asyncio.Lock()
        self._groups: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def _load(self) -> None:
        """The open windows as the store has them (the only copy that counts)."""
        self._groups = {}
        for g in await self.ctx.state.get("open") or []:
            st = await self.ctx.state.get(f"g:{g}")
            if isinstance(st, dict):
                self._groups[g] = st

    async def start(self) -> None:
        await self._load()
        if self._groups:
            n = sum(len(st.get("items", [])) for st in self._groups.values())
            log.info("aggregate %s: resumed %d open window(s) holding %d event(s)", self.tag, len(self._groups), n)
        if self.config.max_count is not None:
            for g, st in list(self._groups.items()):
                if len(st.get("items", [])) >= self.config.max_count:  # full when the last run stopped
                    await self._flush(g, "count")
        if self.config.window is not None:
            self._task = asyncio.create_task(self._timer(), name=f"aggregate:{self.tag}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    # --- windows --------------------------------------------------------------------------------

    def _group_of(self, event: Event) -> str:
        g = self.config.group_by
        if g is None:
            return "all"
        if g == "entity":
            return f"{event.entity or ''}:{event.entity_id}" if event.entity_id is not None else "none"
        from .routes import dig

        v = dig(event.to_dict(), g)
        return "none" if v is None else str(v)

    def _deadline(self, now: float) -> float | None:
        w = self.config.window
        if w is None:
            return None
        return (math.floor(now / w) + 1) * w if self.config.align else now + w

    async def deliver(self, event: Event) -> None:
        [err] = await self.deliver_batch([event])
        if err is not None:
            raise err

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Add each event to its group's window (once: redeliveries are recognised), persist, flush full ones."""
        async with self._lock:
            try:
                return await self._add(events)
            except BaseException:
                # Nothing half-kept in memory: the redelivery must find the windows as the store has them.
                with contextlib.suppress(Exception):
                    await self._load()
                raise

    async def _add(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Add each event to its group's window once, persist, flush full ones (under the lock)."""
        now = self.clock()
        touched: set[str] = set()
        for ev in events:
            g = self._group_of(ev)
            st = self._groups.get(g)
            if st is not None and st["items"] and st["deadline"] is not None and st["deadline"] <= now:
                await self._flush(g, "time")  # its time was up before this event came
                st = self._groups.get(g)
            if st is None:
                st = {"items": [], "keys": [], "prev": [], "opened": now, "deadline": self._deadline(now)}
                self._groups[g] = st
            key = ev.key
            # Delivered again (after a crash, or a flush the store refused): already in this window or the last.
            if key not in st["keys"] and key not in st["prev"]:
                if not st["items"]:
                    st["opened"], st["deadline"] = now, self._deadline(now)
                st["items"].append(ev.to_dict())
                st["keys"].append(key)
                touched.add(g)
            if self.config.max_count is not None and len(st["items"]) >= self.config.max_count:
                if g in touched:
                    await self._save(g)
                await self._flush(g, "count")
                touched.discard(g)
        for g in touched:
            await self._save(g)
        await self._save_index()
        return [None] * len(events)

    async def _save(self, g: str) -> None:
        await self.ctx.state.set(f"g:{g}", self._groups[g])

    async def _save_index(self) -> None:
        await self.ctx.state.set("open", sorted(g for g, st in self._groups.items() if st["items"]))

    async def _flush(self, g: str, reason: str) -> None:
        """Enqueue the window's one event (committed), then clear the window: a crash between the two
        flushes the same window again, and its id (a hash of its keys) makes that a duplicate."""
        st = self._groups[g]
        if not st["items"]:
            return
        closed_at = st["deadline"] if reason == "time" and st["deadline"] is not None else self.clock()
        out = build_output(self.config, self.source, self.tag, g, st["items"], closed_at, reason)
        res = await self.store.enqueue([(out, [self.target])])
        log.info(
            "aggregate %s: window of group %r closed by %s with %d event(s)%s",
            self.tag,
            g,
            reason,
            len(st["items"]),
            "" if res.accepted else " (already delivered before a restart)",
        )
        self._groups[g] = {"items": [], "keys": [], "prev": st["keys"], "opened": None, "deadline": None}
        await self._save(g)
        await self._save_index()

    async def flush_due(self) -> int:
        """Close every window whose time is up; returns how many were closed."""
        n = 0
        async with self._lock:
            now = self.clock()
            for g, st in list(self._groups.items()):
                if st["items"] and st["deadline"] is not None and st["deadline"] <= now:
                    await self._flush(g, "time")
                    n += 1
        return n

    async def _timer(self) -> None:
        assert self.config.window is not None
        tick = min(1.0, max(0.01, self.config.window / 20))
        while True:
            await asyncio.sleep(tick)
            try:
                await self.flush_due()
            except Exception as e:
                log.warning("aggregate %s: flushing windows failed (will retry): %s: %s", self.tag, type(e).__name__, e)


def aggregator_runtimes(
    settings: Settings, store: Store, state_for: Callable[[str], Any], clock: Callable[[], float] = time.time
) -> dict[str, SinkRuntime]:
    """The virtual sinks of every aggregated route, ready for the dispatcher (``app`` starts and closes them)."""
    from .breaker import Breaker
    from .dispatcher import SinkRuntime

    out: dict[str, SinkRuntime] = {}
    for i, r in enumerate(settings.routes):
        agg = r.aggregate
        if agg is None:
            continue
        for sink in r.to:
            name = virtual_sink(i, sink)
            ctx = ConnectorContext(
                name=name,
                role="sink",
                base_dir=settings.base_dir,
                state=state_for(f"aggregate:{name}"),
                logger=logging.getLogger(f"integrand.aggregate.{name}"),
                clock=clock,
            )
            inst = Aggregator(
                agg, ctx, store=store, source=r.from_, target=sink, tag=f"routes[{i}]:{sink}", clock=clock
            )
            b = settings.dispatcher.breaker
            out[name] = SinkRuntime(
                name=name,
                connector=inst,
                batch_size=min(Aggregator.batch_size, settings.dispatcher.batch_size),
                retry=settings.dispatcher.retry,
                breaker=Breaker(b.failure_threshold, b.open_for, b.max_open_for),
            )
    return out
