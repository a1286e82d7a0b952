"""What an operator asks about (status, sources, sinks, DLQ, one event's story) as JSON-ready dicts.

One set of functions for both ways in: the admin API calls them inside the daemon (with its live
breakers and pollers), the CLI calls them on a store it opened itself when no daemon runs. Times are
ISO 8601 UTC strings (``…Z``) and ages are seconds, so neither side guesses a time zone."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from . import __version__
from .config import Settings, SourceCore
from .ownership import cluster_view
from .store import CursorRow, DeliveryDetail, Store
from .store_views import STATES, Backlog, EventStory

if TYPE_CHECKING:
    from .app import Daemon


class NotFound(LookupError):
    """The thing asked for does not exist (HTTP 404, CLI exit 1)."""


class BadRequest(ValueError):
    """The question itself is wrong (HTTP 400, CLI exit 2)."""


class Conflict(RuntimeError):
    """Not here: another node runs what the write is about (HTTP 409, CLI exit 1)."""


def runs_elsewhere(source: str, holder: str | None) -> Conflict:
    """A cursor write for a source this process does not run: where to send it instead."""
    if holder is None:
        return Conflict(
            f"no node holds source {source!r} right now (it is being taken over): try again in a few seconds"
        )
    return Conflict(
        f"source {source!r} is run by node {holder}: set its cursor there (`integrand status` shows which "
        "node runs what), so the write is fenced by that node's lease and no poll in flight commits over it"
    )


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds, e.g. ``2026-12-07T00:42:22.123Z``."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _age(since: float | None, now: float) -> float | None:
    return None if since is None else round(max(0.0, now - since), 3)


# --- status, sources, sinks -----------------------------------------------------------------------


def fold_backlog(rows: Sequence[Backlog], by: Literal["sink", "source"]) -> dict[str, tuple[int, float | None]]:
    """Pending count and oldest pending time per sink or per source."""
    out: dict[str, tuple[int, float | None]] = {}
    for b in rows:
        name = b.sink if by == "sink" else b.source
        n, oldest = out.get(name, (0, None))
        out[name] = (n + b.pending, b.oldest_since if oldest is None else min(oldest, b.oldest_since))
    return out


async def status(store: Store, settings: Settings, daemon: Daemon | None = None) -> dict[str, Any]:
    counts = await store.counts()
    backlog = await store.backlog()  # one scan of the pending deliveries for sources and sinks both
    cursors = await store.cursors()
    deliveries: dict[str, dict[str, int]] = {}
    for (sink, state), n in sorted(counts.items()):
        deliveries.setdefault(sink, {})[state] = n
    out: dict[str, Any] = {
        "version": __version__,
        "daemon": daemon is not None,
        "store": str(store.path),
        "events": await store.event_count(),
        "deliveries": deliveries,
        "dead_letters": sum(n for (_, st), n in counts.items() if st == "dead"),
        "sources": await sources(store, settings, daemon, backlog=backlog, cursors=cursors),
        "sinks": await sinks(store, settings, daemon, backlog=backlog, counts=counts),
        "recent_rejections": await rejections(store, limit=10),
        "cursors": [
            {"source": c.source, "kind": c.kind, "value": c.value, "updated_at": iso(c.updated_at)} for c in cursors
        ],
    }
    # Several nodes on a PostgreSQL store: each with its heartbeat's age and the singletons it holds.
    out["nodes"] = await cluster_view(store)
    if daemon is not None and daemon.owner is not None:
        out["node"] = daemon.owner.status()
    if daemon is not None:  # the compact shapes /status had before the admin API (kept for scripts using them)
        out["pollers"] = {name: p.status() for name, p in daemon.pollers.items()}
        out["streams"] = {name: st.status() for name, st in daemon.streamers.items()}
        out["breakers"] = {
            name: {
                "status": rt.breaker.status,
                "failures": rt.breaker.failures,
                "paused": "auth" if rt.auth_error is not None else None,
                "auth_error": rt.auth_error,
            }
            for name, rt in daemon.dispatcher.sinks.items()
        }
    return out


async def sources(
    store: Store,
    settings: Settings,
    daemon: Daemon | None = None,
    *,
    backlog: Sequence[Backlog] | None = None,
    cursors: Sequence[CursorRow] | None = None,
) -> list[dict[str, Any]]:
    now = time.time()
    pending = fold_backlog(await store.backlog() if backlog is None else backlog, "source")
    polls = {c.source: c for c in (await store.cursors() if cursors is None else cursors) if c.kind == "poll"}
    out = []
    for name, cs in sorted(settings.sources.items()):
        core = cs.core
        assert isinstance(core, SourceCore)
        caps = cs.cls.capabilities()
        n, oldest = pending.get(name, (0, None))
        cur = polls.get(name)
        item: dict[str, Any] = {
            "name": name,
            "connector": cs.connector,
            "webhooks": "webhook" in caps,
            "polling": "poll" in caps and core.poll.enabled,
            "pending": n,
            "lag": _age(oldest, now),
            "cursor": cur.value if cur else None,
            "cursor_updated_at": iso(cur.updated_at) if cur else None,
            "target_latency": core.poll.target_latency if "poll" in caps else None,
            "owner": store.owner if daemon is not None else None,
        }
        streamer = daemon.streamers.get(name) if daemon is not None else None
        if streamer is not None:
            item["stream"] = streamer.status()
        poller = daemon.pollers.get(name) if daemon is not None else None
        if poller is not None:
            item.update(
                last_poll=iso(poller.last_poll_at),
                last_ok=iso(poller.last_ok_at),
                poll_lag=_age(poller.last_ok_at, now),
                interval=round(poller.last.delay, 3) if poller.last else None,
                next_poll=iso(poller.next_at) if poller.next_at else None,
                polls=poller.polls,
                errors_in_a_row=poller.state.errors,
                last_error=poller.last_error,
            )
        out.append(item)
    return out


async def sinks(
    store: Store,
    settings: Settings,
    daemon: Daemon | None = None,
    *,
    backlog: Sequence[Backlog] | None = None,
    counts: dict[tuple[str, str], int] | None = None,
) -> list[dict[str, Any]]:
    now = time.time()
    counts = await store.counts() if counts is None else counts
    pending = fold_backlog(await store.backlog() if backlog is None else backlog, "sink")
    out = []
    for name, cs in sorted(settings.sinks.items()):
        n, oldest = pending.get(name, (0, None))
        item: dict[str, Any] = {
            "name": name,
            "connector": cs.connector,
            "backlog": n,
            "oldest_pending_age": _age(oldest, now),
            "dead": counts.get((name, "dead"), 0),
            "delivered": counts.get((name, "done"), 0),
        }
        rt = daemon.dispatcher.sinks.get(name) if daemon is not None else None
        if rt is not None:
            b = rt.breaker
            item["breaker"] = {
                "status": b.status,
                "failures": b.failures,
                "opened_at": iso(b.opened_at) if b.status != "closed" else None,
                "reopens_at": iso(b.reopens_at) if b.status == "open" else None,
            }
            item["paused"] = "auth" if rt.auth_error is not None else None
            item["auth_error"] = rt.auth_error
            item["healthy"] = b.status == "closed" and rt.auth_error is None
        out.append(item)
    return out


async def rejections(store: Store, limit: int = 50, source: str | None = None) -> list[dict[str, Any]]:
    return [
        {
            "at": iso(r.at),
            "source": r.source,
            "status": r.status,
            "reason": r.reason,
            "remote": r.remote,
            "headers": r.headers,
        }
        for r in await store.rejections(limit=limit, source=source)
    ]


# --- the DLQ ----------------------------------------------------------------------------------------


async def dlq_list(store: Store, sink: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    return [
        {
            "id": d.id,
            "event_id": d.event_id,
            "source": d.source,
            "sink": d.sink,
            "attempts": d.attempts,
            "updated_at": iso(d.updated_at),
            "last_error": d.last_error,
        }
        for d in await store.dead_letters(sink=sink, limit=limit)
    ]


def delivery_json(d: DeliveryDetail) -> dict[str, Any]:
    return {
        "id": d.id,
        "sink": d.sink,
        "state": d.state,
        "attempts": d.attempts,
        "created_at": iso(d.created_at),
        "updated_at": iso(d.updated_at),
        "next_attempt_at": iso(d.next_attempt_at) if d.state == "ready" else None,
        "last_error": d.last_error,
        "event": d.event.to_dict(),
        "history": [{"at": iso(a.at), "action": a.action, "detail": a.detail} for a in d.audit],
    }


async def dlq_show(store: Store, ident: str) -> list[dict[str, Any]]:
    """A delivery by its number, or every delivery of the events with that provider (or ``source:``) id."""
    found: list[DeliveryDetail] = []
    if ident.isdigit():
        d = await store.delivery(int(ident))
        if d is not None:
            found.append(d)
    if not found:
        for ev in await store.find_events(ident):
            if ident.isdigit() and str(ev.row) == ident:
                continue  # a bare number is a delivery id here, not an event row
            story = await store.event_story(ev.row)
            for rec in story.deliveries if story else []:
                d = await store.delivery(rec.id)
                if d is not None:
                    found.append(d)
    if not found:
        raise NotFound(f"no delivery {ident}")
    dead = [d for d in found if d.state == "dead"]
    return [delivery_json(d) for d in dead or found]  # the DLQ's view: an event's dead deliveries, if any


def _ids(body: dict[str, Any]) -> list[int] | None:
    if body.get("all"):
        return None
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BadRequest("give delivery ids as a non-empty list of integers, or all: true")
    return ids


def _sink(body: dict[str, Any]) -> str | None:
    sink = body.get("sink")
    if sink is not None and not isinstance(sink, str):
        raise BadRequest("sink must be a string")
    return sink


async def dlq_replay(store: Store, body: dict[str, Any]) -> dict[str, Any]:
    res = await store.replay(_ids(body), sink=_sink(body), include_superseded=bool(body.get("include_superseded")))
    return {"replayed": res.replayed, "superseded": res.superseded}


async def dlq_purge(store: Store, body: dict[str, Any]) -> dict[str, Any]:
    return {"purged": await store.purge(_ids(body), sink=_sink(body))}


# --- one event's story ------------------------------------------------------------------------------


def story_json(s: EventStory) -> dict[str, Any]:
    body = s.event.body
    return {
        "event": {
            "row": s.event.row,
            "id": s.event.event_id,
            "source": s.event.source,
            "type": s.event.type,
            "stored_at": iso(s.event.received_at),
            "received_at": body.get("received_at"),
            "request_id": s.event.request_id,
            "entity": body.get("entity"),
            "entity_id": body.get("entity_id"),
            "version": body.get("version"),
            "meta": body.get("meta") or {},
            "data": body.get("data"),
        },
        "deliveries": [
            {
                "id": d.id,
                "sink": d.sink,
                "state": d.state,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "updated_at": iso(d.updated_at),
            }
            for d in s.deliveries
        ],
        "history": [
            {"at": iso(h.at), "delivery": h.delivery, "action": h.action, "detail": h.detail} for h in s.history
        ],
    }


async def events_show(store: Store, ident: str) -> list[dict[str, Any]]:
    out = []
    for ev in await store.find_events(ident):
        story = await store.event_story(ev.row)
        if story is not None:
            out.append(story_json(story))
    if not out:
        raise NotFound(f"no event {ident} (give integrand's event number, the provider's id, or source:id)")
    return out


async def events_list(
    store: Store, *, source: str | None, since: float | None, state: str | None, limit: int = 100
) -> list[dict[str, Any]]:
    if state is not None and state not in (*STATES, "pending"):
        raise BadRequest(f"state must be one of {', '.join((*STATES, 'pending'))}")
    rows: list[dict[str, Any]] = []
    # 'pending' is ready or leased: two passes, merged newest first.
    wanted: Sequence[str | None] = ("ready", "leased") if state == "pending" else (state,)
    seen: set[int] = set()
    for st in wanted:
        for ev, states in await store.list_events(source=source, since=since, state=st, limit=limit):
            if ev.row in seen:
                continue
            seen.add(ev.row)
            rows.append(
                {
                    "row": ev.row,
                    "id": ev.event_id,
                    "source": ev.source,
                    "type": ev.type,
                    "stored_at": iso(ev.received_at),
                    "request_id": ev.request_id,
                    "deliveries": states,
                }
            )
    rows.sort(key=lambda r: -int(r["row"]))
    return rows[:limit]
