"""Full and incremental sync: ``integrand sync SOURCE --to SINK --full | --since T``, ``integrand replay``, schedules.

A sync lists what a source has now (its ``reconcile`` pages, the same listing reconciliation
uses), runs each record through the route from SOURCE to SINK (filter, enrich, map), and loads it:

* ``--full`` into a sink that can **stage** (:class:`BulkLoadSink`, e.g. ``postgres``): every page
  goes to a staging area and one transaction at the end merges it into the target and removes
  what the source no longer has, so the target is never half-replaced and a failed or
  interrupted run leaves the old data. A sink that cannot stage gets the records as ordinary
  deliveries (an upsert-only sync, reported as such: nothing is deleted).
* ``--since T``: only what changed since T (the source's listing decides what "changed" means),
  as ordinary deliveries: a backfill of a newly added sink.
* ``integrand replay --since T --to SINK``: the events integrand itself retained since T, in the
  order they were stored, through the route, to SINK.

Scheduled syncs (``[[syncs]]`` in the config, cron or an interval like reconciliation) run inside
the daemon with its own connector instances.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO, runtime_checkable

from .connector import ConnectorContext, Event, ReconcilingSource, Sink
from .errors import ConfigError, PermanentError
from .routes import Route, RouteRuntime
from .types import parse_duration

log = logging.getLogger("integrand.sync")


# --- what a sink offers for a full sync ------------------------------------------------------------


@dataclass
class LoadCounts:
    """What the final merge of a staged load did."""

    written: int = 0
    unchanged: int = 0
    deleted: int = 0


class BulkLoad(Protocol):
    """One full load in progress: pages are staged, nothing is visible in the target until ``finish``."""

    async def stage(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Stage a page; one result per event (an error for a record that can never be loaded)."""

    async def finish(self, *, delete_missing: bool) -> LoadCounts:
        """Merge everything staged in one transaction; with ``delete_missing``, remove what was not staged."""

    async def abort(self) -> None:
        """Drop what was staged; the target is as it was."""


@runtime_checkable
class BulkLoadSink(Protocol):
    """A sink that can take a full load through a staging area (a connector adds ``begin_load``)."""

    async def begin_load(self, source: str) -> BulkLoad: ...


# --- one sync ----------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    source: str
    sink: str
    mode: str  # full, full (upsert only), since, replay
    read: int = 0
    filtered: int = 0
    written: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = (
            f"sync {self.source} → {self.sink} ({self.mode}): read {self.read:,}, written {self.written:,}, "
            f"unchanged {self.unchanged:,}, deleted {self.deleted:,}, failed {self.failed:,}"
        )
        if self.filtered:
            line += f", filtered out {self.filtered:,}"
        return line + f" in {self.seconds:.1f} s"


class Progress:
    """A one-line progress display on a terminal (stderr), nothing otherwise."""

    def __init__(self, out: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.out = out if out is not None else sys.stderr
        self.on = bool(getattr(self.out, "isatty", lambda: False)())
        self.clock = clock
        self.started = clock()
        self.last = 0.0

    def update(self, report: SyncReport, *, force: bool = False) -> None:
        if not self.on:
            return
        now = self.clock()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        rate = report.read / max(now - self.started, 1e-9)
        self.out.write(
            f"\r{report.source} → {report.sink}: {report.read:,} read, {rate:,.0f}/s, {report.failed:,} failed "
        )
        self.out.flush()

    def done(self) -> None:
        if self.on:
            self.out.write("\n")
            self.out.flush()


@dataclass
class SyncRun:
    """The parts one sync needs: started connectors, the route runtime and the route's filter."""

    source_name: str
    sink_name: str
    source: Any
    sink: Sink
    routes: RouteRuntime | None
    route: Route | None


def _errors_to(report: SyncReport, events: Sequence[Event], results: Sequence[BaseException | None]) -> None:
    for ev, res in zip(events, results, strict=True):
        if res is not None:
            report.failed += 1
            if len(report.errors) < 20:
                report.errors.append(f"{ev.id}: {type(res).__name__}: {res}")


async def _prepare(run: SyncRun, events: Sequence[Event], report: SyncReport) -> list[Event]:
    """The route's filter, then enrich / map / loop guard exactly as a delivery would."""
    kept = [e for e in events if run.route is None or run.route.matches(e)]
    report.filtered += len(events) - len(kept)
    if run.routes is None or not kept:
        return kept
    prepared = await run.routes.prepare_batch(run.sink_name, kept)
    out: list[Event] = []
    for ev, p in zip(kept, prepared, strict=True):
        if isinstance(p, Event):
            out.append(p)
        elif p is None:
            report.unchanged += 1  # the loop guard: integrand wrote exactly this already
        else:
            report.failed += 1
            if len(report.errors) < 20:
                report.errors.append(f"{ev.id}: {type(p).__name__}: {p}")
    return out


async def _deliver(run: SyncRun, events: Sequence[Event], report: SyncReport, batch: int) -> None:
    for i in range(0, len(events), batch):
        part = events[i : i + batch]
        results = await run.sink.deliver_batch(part)
        _errors_to(report, part, results)
        report.written += sum(r is None for r in results)


async def sync_once(
    run: SyncRun,
    *,
    full: bool,
    since: float | None,
    progress: Progress | None = None,
    batch: int = 500,
    clock: Callable[[], float] = time.monotonic,
) -> SyncReport:
    """List the source (all of it, or what changed since ``since``) and load it into the sink."""
    src = run.source
    if not isinstance(src, ReconcilingSource):
        raise PermanentError(f"source {run.source_name!r} cannot list its records (it has no reconcile capability)")
    started = clock()
    staged = full and isinstance(run.sink, BulkLoadSink)
    mode = "full" if staged else ("full (upsert only: the sink cannot stage, nothing is deleted)" if full else "since")
    report = SyncReport(run.source_name, run.sink_name, mode)
    loader: BulkLoad | None = None
    if staged:
        assert isinstance(run.sink, BulkLoadSink)
        loader = await run.sink.begin_load(run.source_name)
    try:
        cursor: Any = None
        while True:
            page = await src.reconcile(None if full else since, cursor)
            report.read += len(page.events)
            events = await _prepare(run, page.events, report)
            if loader is not None:
                results = await loader.stage(events)
                _errors_to(report, events, results)
            else:
                await _deliver(run, events, report, batch)
            if progress is not None:
                progress.update(report)
            cursor = page.cursor
            if not page.more:
                break
        if loader is not None:
            counts = await loader.finish(delete_missing=True)
            report.written, report.deleted = counts.written, counts.deleted
            report.unchanged += counts.unchanged
    except BaseException:
        if loader is not None:
            with contextlib.suppress(Exception):
                await loader.abort()
        raise
    finally:
        if progress is not None:
            progress.update(report, force=True)
            progress.done()
    report.seconds = clock() - started
    return report


async def replay_since(
    run: SyncRun,
    store: Any,
    since: float,
    *,
    progress: Progress | None = None,
    batch: int = 500,
    clock: Callable[[], float] = time.monotonic,
) -> SyncReport:
    """Integrand's own retained events since ``since`` (from the route's source), oldest first, to the sink."""
    started = clock()
    report = SyncReport(run.source_name, run.sink_name, "replay")
    after = 0
    try:
        while True:
            rows = await store.events_since(since, after=after, limit=batch, source=run.source_name)
            if not rows:
                break
            after = rows[-1][0]
            events = [ev for _, ev in rows]
            report.read += len(events)
            await _deliver(run, await _prepare(run, events, report), report, batch)
            if progress is not None:
                progress.update(report)
    finally:
        if progress is not None:
            progress.update(report, force=True)
            progress.done()
    report.seconds = clock() - started
    return report


def build_run(settings: Any, connectors: dict[str, Any], store: Any, source: str, sink: str) -> SyncRun:
    """A SyncRun over already-started connector instances (keys ``source:NAME`` / ``sink:NAME``)."""
    problems = []
    if source not in settings.sources:
        problems.append(f"sync: no source named {source!r}")
    if sink not in settings.sinks:
        problems.append(f"sync: no sink named {sink!r}")
    if problems:
        raise ConfigError(problems)
    routes = [r for r in settings.routes if r.from_ == source and sink in r.to]
    route = None
    if routes:  # at most one route per (source, sink): config validation refuses a second
        r = routes[0]
        route = Route(source, (sink,), tuple(r.filter.type), tuple(r.filter.entity))
    runtime = RouteRuntime.build(routes, {source: connectors[f"source:{source}"]}, store) if routes else None
    return SyncRun(source, sink, connectors[f"source:{source}"], connectors[f"sink:{sink}"], runtime, route)


# --- the command line ----------------------------------------------------------------------------


def parse_since(text: str, now: float | None = None) -> float:
    """An ISO-8601 time (``2026-01-31``, ``2026-01-31T12:00Z``) or a duration back from now (``2d``, ``90m``)."""
    now = time.time() if now is None else now
    with contextlib.suppress(ValueError):  # pydantic's error is a ValueError
        return now - parse_duration(text)
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    try:
        d = datetime.fromisoformat(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO-8601 time (2026-01-31T12:00Z) nor a duration back from now (2d)"
        ) from None
    return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()


async def _with_connectors(
    args: argparse.Namespace, source: str, sink: str, body: Callable[[Any, SyncRun], Any]
) -> int:
    from .app import ScopedState
    from .config import config_path, load_config
    from .store import Store

    settings = load_config(config_path(args.config))
    for name, table, role in ((source, settings.sources, "source"), (sink, settings.sinks, "sink")):
        if name not in table:
            print(f"error: no {role} named {name!r} in {settings.path}", file=sys.stderr)
            return 1
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_path, busy_timeout=settings.store.busy_timeout, role="client")
    await store.open()
    started: list[Any] = []
    try:
        connectors: dict[str, Any] = {}
        for role, name, cs in (("source", source, settings.sources[source]), ("sink", sink, settings.sinks[sink])):
            ctx = ConnectorContext(
                name=name,
                role=role,  # type: ignore[arg-type]
                base_dir=settings.base_dir,
                state=ScopedState(store, f"{role}:{name}"),
                public_url=settings.daemon.public_url,
                logger=logging.getLogger(f"integrand.{role}.{name}"),
            )
            inst = cs.cls(cs.options, ctx)
            await inst.start()
            started.append(inst)
            connectors[f"{role}:{name}"] = inst
        run = build_run(settings, connectors, store, source, sink)
        report: SyncReport = await body(store, run)
    finally:
        for inst in reversed(started):
            with contextlib.suppress(Exception):
                await inst.close()
            with contextlib.suppress(Exception):
                await inst.ctx.http.pool.close()
        await store.close()
    print(report.summary())
    for e in report.errors:
        print(f"  failed: {e}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_sync(args: argparse.Namespace) -> int:
    if args.full == (args.since is not None):
        print("error: give exactly one of --full or --since T", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    async def body(store: Any, run: SyncRun) -> SyncReport:
        return await sync_once(run, full=args.full, since=args.since, progress=Progress())

    return _run(args, body, args.source, args.to)


def cmd_replay(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .config import config_path, load_config

    settings = load_config(config_path(args.config))
    sources = [r.from_ for r in settings.routes if args.to in r.to]
    source = args.source or (sources[0] if len(sources) == 1 else None)
    if source is None:
        print(
            f"error: sink {args.to!r} is fed by {len(sources)} sources ({', '.join(sources) or 'none'}); add --source",
            file=sys.stderr,
        )
        return 1

    async def body(store: Any, run: SyncRun) -> SyncReport:
        return await replay_since(run, store, args.since, progress=Progress())

    return _run(args, body, source, args.to)


def _run(args: argparse.Namespace, body: Callable[[Any, SyncRun], Any], source: str, sink: str) -> int:
    try:
        return asyncio.run(_with_connectors(args, source, sink, body))
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was merged (a full sync's staged rows were dropped)", file=sys.stderr)
        return 130
    except ConfigError:
        raise
    except Exception as e:
        print(f"error: sync failed, the target keeps its old data: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def register(sub: Any, api: Any) -> None:
    """``integrand sync`` and ``integrand replay`` (the core's own entry in the ``integrand.commands`` group)."""
    sp = api.with_config(sub.add_parser("sync", help="load what a source has now into a sink (full or since a time)"))
    sp.add_argument("source", help="a source that can list its records (reconcile)")
    sp.add_argument("--to", required=True, metavar="SINK")
    sp.add_argument(
        "--full", action="store_true", help="everything, staged and merged at the end; removes what is gone"
    )
    sp.add_argument("--since", type=parse_since, metavar="T", help="what changed since T (ISO time, or 2d back)")
    sp.set_defaults(fn=cmd_sync)
    sp = api.with_config(sub.add_parser("replay", help="send the events integrand retained since T to a sink again"))
    sp.add_argument("--since", type=parse_since, required=True, metavar="T", help="ISO time, or a duration back (2d)")
    sp.add_argument("--to", required=True, metavar="SINK")
    sp.add_argument("--source", help="which of the sink's sources (when several routes lead to it)")
    sp.set_defaults(fn=cmd_replay)


# --- scheduled syncs inside the daemon ------------------------------------------------------------


async def run_schedules(
    settings: Any, connectors: dict[str, Any], store: Any, clock: Callable[[], float] = time.time
) -> None:
    """Run every ``[[syncs]]`` entry on its schedule for as long as the daemon runs (one task for all)."""
    from .poller import next_reconcile

    specs = list(getattr(settings, "syncs", ()))
    if not specs:
        return
    nxt = {i: next_reconcile(s.schedule, clock()) for i, s in enumerate(specs)}
    while True:
        i = min(nxt, key=lambda k: nxt[k])
        await asyncio.sleep(max(0.0, nxt[i] - clock()))
        spec = specs[i]
        key = f"{spec.from_}->{spec.to}"
        started = clock()
        try:
            run = build_run(settings, connectors, store, spec.from_, spec.to)
            since = None
            if spec.mode == "incremental":
                since = await store.state_get("sync", key)
            report = await sync_once(run, full=since is None, since=since)
            await store.state_set("sync", key, started)
            log.info("scheduled %s", report.summary())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("scheduled sync %s failed (the target keeps its old data): %s: %s", key, type(e).__name__, e)
        nxt[i] = next_reconcile(spec.schedule, clock())
