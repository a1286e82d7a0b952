"""Builds the daemon from settings and runs it: listener, dispatcher, admin, maintenance; clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import __version__
from .admin import start_admin
from .aggregate import aggregator_runtimes
from .alerts import run_alerts
from .breaker import Breaker
from .config import ConnectorSettings, Settings, SinkCore, SourceCore
from .connector import Connector, ConnectorContext, PollingSource, ReconcilingSource, Sink, WebhookSource
from .dispatcher import Dispatcher, SinkRuntime
from .errors import ConfigError, StoreUnavailable
from .events import Event
from .frontdoor import front_door
from .guard import PortLimits
from .httpclient import HttpPool
from .listener import Listener, SourceRuntime
from .metrics import Metrics
from .ownership import ClusterOwner, LocalOwner, Owner, default_node_id, source_singleton
from .permissions import private_database, private_dir
from .poller import SourcePoller, run_reconciler
from .routes import Router, RouteRuntime
from .sagarunner import saga_runtimes
from .sdnotify import Notifier, listen_fds
from .store import Store
from .store.backends import daemon_store
from .store.postgres import PgStore
from .streamer import Streamer, streamers_for
from .waits import stop_tasks

log = logging.getLogger("integrand")

MAINTENANCE_EVERY = 30.0
# After this long without a commit the store is idle: the WAL a burst grew is truncated back to 0 bytes.
WAL_IDLE_AFTER = 10.0


class ScopedState:
    """A connector's own durable key/value state: a scope of the store's ``state`` table."""

    def __init__(self, store: Store, scope: str):
        self._store = store
        self._scope = scope

    async def get(self, key: str) -> Any:
        return await self._store.state_get(self._scope, key)

    async def set(self, key: str, value: Any) -> None:
        await self._store.state_set(self._scope, key, value)


class DaemonFailed(Exception):
    """A task the daemon cannot run without has failed: the process exits non-zero so systemd restarts it."""


STATUS_EVERY = 5.0  # seconds between systemd STATUS= updates (queue depth)
# Tasks whose ending, even without an error, while the daemon runs is fatal.
ESSENTIAL = frozenset({"dispatcher", "store-writer"})
RELEASE_TIMEOUT = 5.0  # seconds the shutdown waits to hand held leases back


@dataclass
class Activity:
    """When the daemon last did work (events stored, deliveries done; monotonic), so idle-time work knows
    it is idle. Not the store's commits: maintenance commits on a schedule whatever the load."""

    work: float = -1.0  # events stored + delivery outcomes, as last seen
    changed_at: float = field(default_factory=time.monotonic)
    wal_truncated_at: float = 0.0

    def seen(self, work: float) -> None:
        if work != self.work:
            self.work = work
            self.changed_at = time.monotonic()


@dataclass
class Daemon:
    """A running integrand; ``stop`` begins a graceful shutdown, ``request_reload`` re-reads the config."""

    settings: Settings
    store: Store
    metrics: Metrics
    listener: Listener
    dispatcher: Dispatcher
    connectors: dict[str, Connector[Any]] = field(default_factory=dict)
    http: HttpPool = field(default_factory=HttpPool)
    pollers: dict[str, SourcePoller] = field(default_factory=dict)
    streamers: dict[str, Streamer] = field(default_factory=dict)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    notifier: Notifier = field(default_factory=Notifier)
    clock: Callable[[], float] = time.time
    # Every background task by name ("dispatcher", "poll:NAME", …); reload starts and cancels some.
    tasks: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    # Why the daemon is stopping when it is not because it was asked to (then the exit is non-zero).
    fatal: str | None = None
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reloads: int = 0  # successful reloads, for tests and the status
    admin: Any = None  # the admin listener's handlers (admin.Admin) once bound: a reload sets its token
    activity: Activity = field(default_factory=lambda: Activity())
    # Who runs the singletons (sources' poll/stream/reconcile tasks, the syncs): this node alone on
    # SQLite; on PostgreSQL, whichever node holds each one's lease (ownership.py).
    owner: Owner | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as the task ``name``; its failure (or the dispatcher ending early) stops the daemon."""
        old = self.tasks.get(name)
        if old is not None and not old.done():
            old.cancel()
        task = asyncio.create_task(coro, name=name)
        self.tasks[name] = task
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None and (task.get_name() not in ESSENTIAL or self.stop_event.is_set()):
            return
        if self.fatal is None:
            what = f"{type(exc).__name__}: {exc}" if exc is not None else "returned while the daemon was running"
            self.fatal = f"{task.get_name()} failed ({what})"
            log.error("%s failed; shutting down (exit status 1)", task.get_name(), exc_info=exc)
        self.stop_event.set()

    def request_reload(self) -> None:
        """Re-read the config file (SIGHUP, ``systemctl reload``); a bad one is logged and the old one kept."""
        from .reload import reload

        task = asyncio.create_task(reload(self), name="reload")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def start_connector(
    s: Settings, role: str, name: str, cs: ConnectorSettings, store: Store, http: HttpPool, clock: Callable[[], float]
) -> Connector[Any]:
    """Construct and start one configured source or sink; a failure names its config table in one line."""
    ctx = ConnectorContext(
        name=name,
        role=role,  # type: ignore[arg-type]
        base_dir=s.base_dir,
        state=ScopedState(store, cs.state_scope),
        public_url=s.daemon.public_url,
        logger=logging.getLogger(f"integrand.{role}.{name}"),
        http=http.for_connector(logging.getLogger(f"integrand.{role}.{name}.http")),
        clock=clock,
    )
    try:
        inst: Connector[Any] = cs.cls(cs.options, ctx)
        await inst.start()
    except ConfigError:
        raise
    except Exception as e:
        detail = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e) or type(e).__name__
        raise ConfigError([f"{role}s.{name}: connector {cs.connector!r} cannot start: {detail}"]) from e
    return inst


def source_runtime(s: Settings, name: str, inst: Connector[Any]) -> SourceRuntime:
    core = s.sources[name].core
    assert isinstance(core, SourceCore)
    return SourceRuntime(
        name,
        inst if isinstance(inst, WebhookSource) else None,
        core.max_body_bytes or s.daemon.max_body_bytes,
        core.max_json_depth or s.daemon.max_json_depth,
    )


def sink_runtime(s: Settings, name: str, inst: Connector[Any]) -> SinkRuntime:
    assert isinstance(inst, Sink)
    core = s.sinks[name].core
    assert isinstance(core, SinkCore)
    b = s.breaker_for(name)
    return SinkRuntime(
        name=name,
        connector=inst,
        batch_size=core.batch_size or min(type(inst).batch_size, s.dispatcher.batch_size),
        retry=s.retry_for(name),
        breaker=Breaker(b.failure_threshold, b.open_for, b.max_open_for),
    )


def make_poller(d: Daemon, name: str) -> SourcePoller | None:
    inst = d.connectors[f"source:{name}"]
    core = d.settings.sources[name].core
    assert isinstance(core, SourceCore)
    if not isinstance(inst, PollingSource):
        return None
    p = SourcePoller(name, inst, d.store, d.listener.router, core.poll, metrics=d.metrics, clock=d.clock)
    if isinstance(d.owner, ClusterOwner):
        p.save_every = 0.0  # the request log travels with the lease: the next owner keeps the budget
    return p


def owner_of(d: Daemon) -> Owner:
    if d.owner is None:
        d.owner = LocalOwner(d.settings.cluster.node_id or default_node_id(), d.spawn)
    return d.owner


def start_source_tasks(d: Daemon, names: Iterable[str]) -> None:
    """The poll, stream and reconcile tasks of these sources (their pollers and streamers already made),
    each started only on the node that owns the source (every node on SQLite's one)."""
    owner = owner_of(d)
    for name in names:
        single = source_singleton(name)
        poller = d.pollers.get(name)
        if poller is not None and poller.settings.enabled:
            owner.spawn_singleton(f"poll:{name}", single, poller.run())
        streamer = d.streamers.get(name)
        if streamer is not None:
            owner.spawn_singleton(f"stream:{name}", single, streamer.run())
        start_reconciler(d, name)


SYNCS = "syncs"  # the lease of the one task running every [[syncs]] schedule


def start_reconciler(d: Daemon, name: str) -> None:
    inst = d.connectors[f"source:{name}"]
    core = d.settings.sources[name].core
    assert isinstance(core, SourceCore)
    if isinstance(inst, ReconcilingSource) and core.poll.reconcile is not None:
        recon = run_reconciler(
            name, inst, d.store, d.listener.router, core.poll, metrics=d.metrics, poller=d.pollers.get(name)
        )
        owner_of(d).spawn_singleton(f"reconcile:{name}", source_singleton(name), recon)


def singletons(s: Settings) -> list[str]:
    """Everything that must run on one node at a time: sources that poll, stream or reconcile; the syncs."""
    out = [source_singleton(name) for name in s.sources if _runs_alone(s, name)]
    return out + ([SYNCS] if s.syncs else [])


def _runs_alone(s: Settings, name: str) -> bool:
    caps = s.sources[name].cls.capabilities()
    return bool({"poll", "stream", "reconcile"} & set(caps))


def start_singleton(d: Daemon, singleton: str) -> None:
    """This node just took ``singleton``'s lease: start its tasks from what the store holds now (the
    previous owner's learnt polling state and positions, not what this node knew when it last ran it)."""
    if singleton == SYNCS:
        if d.settings.syncs:
            from .sync import run_schedules

            owner_of(d).spawn_singleton("syncs", SYNCS, run_schedules(d.settings, d.connectors, d.store))
        return
    name = singleton.removeprefix("source:")
    if name not in d.settings.sources:
        return
    p = make_poller(d, name)
    if p is not None:
        d.pollers[name] = p
    fresh = streamers_for(d.settings, d.connectors, d.store, d.listener.router, d.metrics)
    if name in fresh:
        d.streamers[name] = fresh[name]
    start_source_tasks(d, [name])


def cluster_owner(d: Daemon) -> ClusterOwner:
    """The PostgreSQL store's owner: leases singletons; splits the HTTP budgets by the live nodes."""
    assert isinstance(d.store, PgStore)
    c = d.settings.cluster
    owner = ClusterOwner(
        d.store,
        c.node_id or default_node_id(),
        ttl=c.lease_ttl,
        spawn=d.spawn,
        tasks=d.tasks,
        start=lambda name: start_singleton(d, name),
        wanted=lambda: singletons(d.settings),
        metrics=d.metrics,
        on_nodes=d.http.set_share,
    )
    return owner


async def build(settings: Settings, clock: Callable[[], float] = time.time, notifier: Notifier | None = None) -> Daemon:
    s = settings
    private_dir(s.daemon.state_dir)
    if s.store.backend == "sqlite":
        private_database(s.db_path)
    store = daemon_store(s, clock)  # store/backends.py: SQLite, or PostgreSQL shared by several nodes
    await store.open()
    metrics = Metrics()

    def on_commit(seconds: float, ops: int) -> None:
        metrics.commit_seconds.observe(seconds)
        metrics.commit_ops.observe(ops)

    store.on_commit = on_commit
    connectors: dict[str, Connector[Any]] = {}
    source_instances: dict[str, object] = {}  # filled below; routes call the sources' fetch()
    try:
        route_runtime = RouteRuntime.build(s.routes, source_instances, store)
    except BaseException:
        await store.close()
        raise
    http = HttpPool()
    if s.store.backend == "postgres":  # before the connectors start: they may copy it into sessions of their own
        http.set_user_agent(f"integrand/{__version__} (node {s.cluster.node_id or default_node_id()})")
    try:
        await http.start()
        for role, table in (("source", s.sources), ("sink", s.sinks)):
            for name, cs in table.items():
                inst = await start_connector(s, role, name, cs, store, http, clock)
                connectors[f"{role}:{name}"] = inst
                if role == "source":
                    source_instances[name] = inst
    except BaseException:
        for inst in connectors.values():
            with contextlib.suppress(Exception):
                await inst.close()
        await http.close()
        await store.close()
        raise

    sources = {name: source_runtime(s, name, connectors[f"source:{name}"]) for name in s.sources}
    sinks = {name: sink_runtime(s, name, connectors[f"sink:{name}"]) for name in s.sinks}
    for name, rt in aggregator_runtimes(s, store, lambda scope: ScopedState(store, scope), clock).items():
        await rt.connector.start()  # type: ignore[attr-defined]  # an Aggregator: resumes its open windows
        connectors[f"sink:{name}"] = rt.connector  # type: ignore[assignment]  # closed with the others
        sinks[name] = rt
    live: dict[str, Any] = {}  # the dispatcher, once built: a saga finds its steps' sinks there (reloads swap them)

    def step_sink(name: str) -> Sink | None:
        rt = live["dispatcher"].sinks.get(name) if "dispatcher" in live else None
        return rt.connector if rt is not None else None

    def step_runtime(name: str) -> SinkRuntime | None:
        return live["dispatcher"].sinks.get(name) if "dispatcher" in live else None

    sinks.update(
        saga_runtimes(s, store, step_sink, source_instances, metrics=metrics, clock=clock, runtimes=step_runtime)
    )
    router = Router(s.routes, s.sagas)
    pollers: dict[str, SourcePoller] = {}

    def nudge(source: str, events: Sequence[Event]) -> None:
        p = pollers.get(source)
        if p is not None:
            p.nudge(len(events))

    listener = Listener(
        sources,
        store,
        router,
        public_url=s.daemon.public_url,
        rejections_kept=s.daemon.rejections_kept,
        metrics=metrics,
        clock=clock,
        on_accepted=nudge,
        limits=PortLimits(
            max_connections=s.daemon.max_connections,
            max_connections_per_ip=s.daemon.max_connections_per_ip,
            header_timeout=s.daemon.header_timeout,
            body_timeout=s.daemon.body_timeout,
            keepalive_timeout=s.daemon.keepalive_timeout,
        ),
        rejections_per_second=s.daemon.rejections_per_second,
    )
    dispatcher = Dispatcher(
        store,
        sinks,
        workers=s.dispatcher.workers,
        lease_seconds=s.dispatcher.lease,
        metrics=metrics,
        clock=clock,
        routes=route_runtime,
        linger=s.dispatcher.linger,
    )
    live["dispatcher"] = dispatcher
    streamers = streamers_for(s, connectors, store, router, metrics)
    d = Daemon(s, store, metrics, listener, dispatcher, connectors, http, pollers, streamers, clock=clock)
    if notifier is not None:
        d.notifier = notifier
    if isinstance(store, PgStore):
        d.owner = cluster_owner(d)
    else:
        d.owner = LocalOwner(s.cluster.node_id or default_node_id(), d.spawn, metrics)
    for name in s.sources:
        p = make_poller(d, name)
        if p is not None:
            pollers[name] = p
    try:
        await _note_unconfigured_sinks(d)
    except Exception as e:
        log.warning("cannot look for deliveries to sinks no longer configured: %s", e)
    return d


async def _note_unconfigured_sinks(d: Daemon) -> None:
    """Deliveries waiting for a sink the config no longer has stay in the store: say so, and keep the
    dispatcher from waking for them."""
    counts = await d.store.counts()
    gone: dict[str, int] = {}
    for (sink, state), n in counts.items():
        if sink not in d.settings.sinks and state in ("ready", "leased"):
            gone[sink] = gone.get(sink, 0) + n
    for sink, n in sorted(gone.items()):
        log.warning(
            "sink %s is not configured: its %d pending deliveries stay in the store and go out if it is configured again",
            sink,
            n,
        )
    d.dispatcher.absent = set(gone)


async def run(
    settings: Settings,
    on_ready: Callable[[Daemon], Awaitable[None] | None] | None = None,
    clock: Callable[[], float] = time.time,
    notifier: Notifier | None = None,
) -> None:
    """Run until ``Daemon.stop()`` (the CLI wires SIGTERM/SIGINT to it), then shut down cleanly.

    ``clock`` is for tests that simulate hours of retries and breaker cycles in seconds. Raises
    DaemonFailed after the shutdown when a task the daemon needs failed (exit status 1)."""
    d = await build(settings, clock, notifier=notifier)
    s = settings
    grace = s.daemon.shutdown_grace
    runners: list[web.BaseRunner] = []
    try:
        server = d.listener.server(wrap=lambda handle: front_door(handle, s.daemon.trusted_proxies))
        hook_runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=grace)
        await hook_runner.setup()
        runners.append(hook_runner)
        inherited = listen_fds()
        site: web.BaseSite
        if inherited:
            # Socket activation: systemd holds the port open across restarts; daemon.listen is not used.
            site = web.SockSite(hook_runner, socket.socket(fileno=inherited[0]), backlog=4096)
            await site.start()
        else:
            site = web.TCPSite(hook_runner, s.daemon.listen.host, s.daemon.listen.port, backlog=4096)
            await _start_site(site, "daemon.listen", str(s.daemon.listen))
        d.ports["webhooks"] = _bound_port(site)
        runners.extend(await start_admin(d))  # TCP and the CLI's unix socket (admin.py)
        # The store's writer is its own task: if it dies, every webhook would wait for a commit forever.
        writer = getattr(d.store, "_writer", None)
        if isinstance(writer, asyncio.Task):
            writer.add_done_callback(d._task_done)
        d.spawn("dispatcher", d.dispatcher.run())
        d.spawn("maintenance", _maintenance(d))
        d.spawn("wal", _truncate_wal_when_idle(d))
        owner = owner_of(d)
        if isinstance(owner, ClusterOwner):
            # Sources start as their leases are taken; the first round runs before the node says ready.
            try:
                await owner.tick()
            except StoreUnavailable as e:
                log.warning("cluster: the first ownership round failed (%s); retrying", e)
            d.spawn("ownership", owner.run())
        else:
            start_source_tasks(d, s.sources)
            start_singleton(d, SYNCS)  # [[syncs]]: full / incremental syncs on a schedule (integrand.sync)
        d.spawn("watchdog", d.notifier.watchdog())
        if s.alerts.webhook_url is not None:
            d.spawn("alerts", run_alerts(d))  # alerts.py: [alerts] to a chat webhook
        d.ready = True
        log.info(
            "integrand %s ready: webhooks on %s:%d, admin on %s, %d sources, %d sinks, store %s%s",
            __version__,
            _sockname_host(site) if inherited else s.daemon.listen.host,
            d.ports["webhooks"],
            f"{s.admin.listen.host}:{d.ports['admin']}" if "admin" in d.ports else "off",
            len(s.sources),
            len(s.sinks),
            d.store.path,
            "; webhook socket from systemd" if inherited else "",
        )
        d.notifier.ready(await status_line(d))
        d.spawn("status", _report_status(d))
        if on_ready is not None:
            res = on_ready(d)
            if res is not None:
                await res
        await d.stop_event.wait()
    finally:
        await _shutdown(d, runners, grace)
    if d.fatal is not None:
        raise DaemonFailed(d.fatal)


async def _shutdown(d: Daemon, runners: list[web.BaseRunner], grace: float) -> None:
    log.info("shutting down: refusing new webhooks, finishing in-flight work (grace %.0f s)", grace)
    d.notifier.stopping()
    d.listener.stopping = True
    d.ready = False
    deadline = time.monotonic() + grace
    if runners:
        # Closes the webhook port after in-flight requests (awaiting their commit) have been answered.
        await runners[0].cleanup()
    d.dispatcher.stop()
    tasks = list(d.tasks.values())
    for t in tasks:
        if t.get_name() not in ("dispatcher", "watchdog"):
            t.cancel()
    dispatcher = [t for t in tasks if t.get_name() == "dispatcher" and not t.done()]
    if dispatcher:
        _, still = await asyncio.wait(dispatcher, timeout=max(0.1, deadline - time.monotonic()))
        if still:
            log.warning("in-flight deliveries did not finish within the grace period; they will be redelivered")
    # Cancelled again while any goes on (a library can swallow a cancel: waits.stop_tasks), so a stream
    # task that missed its cancel cannot hold the shutdown for ever.
    await stop_tasks(tasks)
    await asyncio.gather(*tasks, return_exceptions=True)
    for p in d.pollers.values():
        # The learnt polling state is saved every minute; a clean stop saves the rest, so a restart is not
        # colder than the run before it. On a cluster (save_every 0) every poll already saved it, and
        # another node may own the source by now.
        if p.save_every > 0 and p.polls:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.save(), RELEASE_TIMEOUT)
    if d.owner is not None:
        with contextlib.suppress(Exception):  # bounded like the release below: the leases lapse anyway
            await asyncio.wait_for(d.owner.close(), RELEASE_TIMEOUT)
    with contextlib.suppress(Exception):
        # Bounded: after a fatal error in the store's writer nothing would ever commit it. The leases
        # then expire and the next run reclaims them.
        n = await asyncio.wait_for(d.store.release_owned(), RELEASE_TIMEOUT)
        if n:
            log.info("released %d leased deliveries for the next run", n)
    for inst in d.connectors.values():
        try:
            await inst.close()
        except Exception:
            log.exception("error closing connector")
    await d.http.close()
    for r in runners[1:]:
        await r.cleanup()
    try:
        await d.store.close()
    except Exception:
        if d.fatal is None:
            raise
        # The writer's own failure, re-raised by close(): already logged as the reason for stopping.
    log.info("stopped")


async def status_line(d: Daemon) -> str:
    """What ``systemctl status`` shows: the queue depth, and whether the daemon is taking webhooks."""
    try:
        counts = await d.store.counts()
    except Exception as e:
        return f"store unreadable: {e}"
    by_state: dict[str, int] = {}
    for (_sink, state), n in counts.items():
        by_state[state] = by_state.get(state, 0) + n
    head = "stopping" if d.listener.stopping else "accepting webhooks"
    return (
        f"{head}; queue: {by_state.get('ready', 0)} ready, {by_state.get('leased', 0)} in flight, "
        f"{by_state.get('dead', 0)} dead-lettered"
    )


async def _report_status(d: Daemon) -> None:
    if not d.notifier.enabled:
        return
    while True:
        await asyncio.sleep(STATUS_EVERY)
        d.notifier.status(await status_line(d))


async def _maintenance(d: Daemon) -> None:
    """Reclaim expired leases and prune delivered events past retention, a chunk at a time."""
    while True:
        await asyncio.sleep(MAINTENANCE_EVERY)
        try:
            await d.store.reclaim_expired()
            cutoff = time.time() - d.settings.store.retention
            before = dict(getattr(d.store, "pruned", {}))
            total = 0
            while (n := await d.store.prune(cutoff)) > 0:
                total += n
                await asyncio.sleep(0)  # let webhooks' commits in between chunks
            if total:
                log.info("retention: %s", pruned_line(before, getattr(d.store, "pruned", {})))
        except Exception as e:
            log.warning("maintenance failed (will retry): %s", e)


def pruned_line(before: dict[str, int], after: dict[str, int]) -> str:
    """What one retention pass deleted, by kind (the store counts rows per kind: ``Store.pruned``)."""
    n = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return (
        f"deleted {n.get('events', 0)} delivered events past [store] retention (with their deliveries and "
        f"audit), {n.get('tombstones', 0)} delete markers, {n.get('loop_guard', 0)} loop-guard entries and "
        f"{n.get('sagas', 0)} sagas' records"
    )


async def _truncate_wal_when_idle(d: Daemon) -> None:
    """Once per quiet spell, give back the disk a burst's WAL took: the background checkpoints copy pages
    but never shrink the file, so after 20,000 webhooks it stayed at ~30 MB until shutdown."""
    wal = f"{d.store.path}-wal"
    a = d.activity
    while True:
        await asyncio.sleep(WAL_IDLE_AFTER / 4)
        a.seen(sum(d.metrics.events.values.values()) + sum(d.metrics.deliveries.values.values()))
        if time.monotonic() - a.changed_at < WAL_IDLE_AFTER or a.wal_truncated_at > a.changed_at:
            continue
        try:
            size = os.stat(wal).st_size  # one stat every few seconds: not worth a thread
        except OSError:
            continue
        if size == 0:
            a.wal_truncated_at = time.monotonic()
            continue
        try:
            if await d.store.truncate_wal():
                a.wal_truncated_at = time.monotonic()
                log.debug("store idle: WAL of %d bytes checkpointed and truncated", size)
        except Exception as e:
            log.warning("WAL truncation failed (retried when idle again): %s", e)


async def _start_site(site: web.TCPSite, key: str, addr: str) -> None:
    """Bind, turning 'address in use' and friends into a message that names the config key."""
    try:
        await site.start()
    except OSError as e:
        raise ConfigError([f"{key}: cannot listen on {addr}: {e.strerror or e}"]) from None


def _sockname_host(site: web.BaseSite) -> str:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return str(sockets[0].getsockname()[0]) if sockets else "?"


def _bound_port(site: web.BaseSite) -> int:
    server = site._server  # aiohttp keeps the asyncio server here; needed when port 0 was asked for
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0
