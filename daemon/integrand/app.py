"""Builds the daemon from settings and runs it: listener, dispatcher, admin, maintenance; clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import __version__
from .admin import start_admin
from .alerts import run_alerts
from .breaker import Breaker
from .config import Settings, SinkCore, SourceCore
from .connector import Connector, ConnectorContext, PollingSource, ReconcilingSource, Sink, WebhookSource
from .dispatcher import Dispatcher, SinkRuntime
from .errors import ConfigError
from .events import Event
from .guard import PortLimits
from .httpclient import HttpPool
from .listener import Listener, SourceRuntime
from .metrics import Metrics
from .permissions import private_database, private_dir
from .poller import SourcePoller, run_reconciler
from .routes import Router, RouteRuntime
from .store import Store
from .store.backends import daemon_store
from .streamer import Streamer, streamers_for

log = logging.getLogger("integrand")

MAINTENANCE_EVERY = 30.0


class ScopedState:
    """A connector's own durable key/value state: a scope of the store's ``state`` table."""

    def __init__(self, store: Store, scope: str):
        self._store = store
        self._scope = scope

    async def get(self, key: str) -> Any:
        return await self._store.state_get(self._scope, key)

    async def set(self, key: str, value: Any) -> None:
        await self._store.state_set(self._scope, key, value)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about READY/STOPPING; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


@dataclass
class Daemon:
    """A running integrand; ``stop`` begins a graceful shutdown."""

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

    def stop(self) -> None:
        self.stop_event.set()


async def build(settings: Settings, clock: Callable[[], float] = time.time) -> Daemon:
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
    try:
        await http.start()
        for role, table in (("source", s.sources), ("sink", s.sinks)):
            for name, cs in table.items():
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
                inst = cs.cls(cs.options, ctx)
                await inst.start()
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

    sources = {}
    for name, cs in s.sources.items():
        inst = connectors[f"source:{name}"]
        core = cs.core
        assert isinstance(core, SourceCore)
        sources[name] = SourceRuntime(
            name,
            inst if isinstance(inst, WebhookSource) else None,
            core.max_body_bytes or s.daemon.max_body_bytes,
            core.max_json_depth or s.daemon.max_json_depth,
        )
    sinks = {}
    for name, cs in s.sinks.items():
        inst = connectors[f"sink:{name}"]
        assert isinstance(inst, Sink)
        core = cs.core
        assert isinstance(core, SinkCore)
        b = s.breaker_for(name)
        sinks[name] = SinkRuntime(
            name=name,
            connector=inst,
            batch_size=core.batch_size or min(type(inst).batch_size, s.dispatcher.batch_size),
            retry=s.retry_for(name),
            breaker=Breaker(b.failure_threshold, b.open_for, b.max_open_for),
        )
    router = Router(s.routes)
    pollers: dict[str, SourcePoller] = {}
    for name, cs in s.sources.items():
        inst = connectors[f"source:{name}"]
        core = cs.core
        assert isinstance(core, SourceCore)
        if isinstance(inst, PollingSource):
            pollers[name] = SourcePoller(name, inst, store, router, core.poll, metrics=metrics, clock=clock)

    def nudge(source: str, events: Sequence[Event]) -> None:
        p = pollers.get(source)
        if p is not None:
            p.nudge()

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
    streamers = streamers_for(s, connectors, store, router, metrics)
    return Daemon(s, store, metrics, listener, dispatcher, connectors, http, pollers, streamers)


async def run(
    settings: Settings,
    on_ready: Callable[[Daemon], Awaitable[None] | None] | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Run until ``Daemon.stop()`` (the CLI wires SIGTERM/SIGINT to it), then shut down cleanly.

    ``clock`` is for tests that simulate hours of retries and breaker cycles in seconds."""
    d = await build(settings, clock)
    s = settings
    grace = s.daemon.shutdown_grace
    runners: list[web.BaseRunner] = []
    tasks: list[asyncio.Task[Any]] = []
    try:
        hook_runner = web.ServerRunner(d.listener.server(), handle_signals=False, shutdown_timeout=grace)
        await hook_runner.setup()
        runners.append(hook_runner)
        site = web.TCPSite(hook_runner, s.daemon.listen.host, s.daemon.listen.port, backlog=4096)
        await _start_site(site, "daemon.listen", str(s.daemon.listen))
        d.ports["webhooks"] = _bound_port(site)
        runners.extend(await start_admin(d))  # TCP and the CLI's unix socket (admin.py)
        tasks.append(asyncio.create_task(d.dispatcher.run(), name="dispatcher"))
        tasks.append(asyncio.create_task(_maintenance(d), name="maintenance"))
        for name, poller in d.pollers.items():
            if poller.settings.enabled:
                tasks.append(asyncio.create_task(poller.run(), name=f"poll:{name}"))
        for name, streamer in d.streamers.items():
            tasks.append(asyncio.create_task(streamer.run(), name=f"stream:{name}"))
        for name, cs in s.sources.items():
            inst = d.connectors[f"source:{name}"]
            core = cs.core
            assert isinstance(core, SourceCore)
            if isinstance(inst, ReconcilingSource) and core.poll.reconcile is not None:
                recon = run_reconciler(name, inst, d.store, d.listener.router, core.poll, metrics=d.metrics)
                tasks.append(asyncio.create_task(recon, name=f"reconcile:{name}"))
        if s.syncs:  # [[syncs]]: full / incremental syncs on a schedule (integrand.sync)
            from .sync import run_schedules

            tasks.append(asyncio.create_task(run_schedules(s, d.connectors, d.store), name="syncs"))
        if s.alerts.webhook_url is not None:
            tasks.append(asyncio.create_task(run_alerts(d), name="alerts"))  # alerts.py: [alerts] to a chat webhook
        d.ready = True
        log.info(
            "integrand %s ready: webhooks on %s:%d, admin on %s, %d sources, %d sinks, store %s",
            __version__,
            s.daemon.listen.host,
            d.ports["webhooks"],
            f"{s.admin.listen.host}:{d.ports['admin']}" if "admin" in d.ports else "off",
            len(s.sources),
            len(s.sinks),
            d.store.path,
        )
        sd_notify("READY=1\nSTATUS=accepting webhooks")
        if on_ready is not None:
            res = on_ready(d)
            if res is not None:
                await res
        stop_wait = asyncio.create_task(d.stop_event.wait())
        done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stop_wait and t.exception() is not None:
                log.error("%s failed; shutting down", t.get_name(), exc_info=t.exception())
        stop_wait.cancel()
    finally:
        await _shutdown(d, runners, tasks, grace)


async def _shutdown(d: Daemon, runners: list[web.BaseRunner], tasks: list[asyncio.Task[Any]], grace: float) -> None:
    log.info("shutting down: refusing new webhooks, finishing in-flight work (grace %.0f s)", grace)
    sd_notify("STOPPING=1")
    d.listener.stopping = True
    d.ready = False
    deadline = time.monotonic() + grace
    if runners:
        # Closes the webhook port after in-flight requests (awaiting their commit) have been answered.
        await runners[0].cleanup()
    d.dispatcher.stop()
    for t in tasks:
        if t.get_name() != "dispatcher":
            t.cancel()
    dispatcher = [t for t in tasks if t.get_name() == "dispatcher" and not t.done()]
    if dispatcher:
        _, still = await asyncio.wait(dispatcher, timeout=max(0.1, deadline - time.monotonic()))
        if still:
            log.warning("in-flight deliveries did not finish within the grace period; they will be redelivered")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(Exception):
        n = await d.store.release_owned()
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
    await d.store.close()
    log.info("stopped")


async def _maintenance(d: Daemon) -> None:
    """Reclaim expired leases and prune delivered events past retention, a chunk at a time."""
    while True:
        await asyncio.sleep(MAINTENANCE_EVERY)
        try:
            await d.store.reclaim_expired()
            cutoff = time.time() - d.settings.store.retention
            total = 0
            while (n := await d.store.prune(cutoff)) > 0:
                total += n
                await asyncio.sleep(0)  # let webhooks' commits in between chunks
            if total:
                log.info("retention: pruned %d delivered events", total)
        except Exception as e:
            log.warning("maintenance failed (will retry): %s", e)


async def _start_site(site: web.TCPSite, key: str, addr: str) -> None:
    """Bind, turning 'address in use' and friends into a message that names the config key."""
    try:
        await site.start()
    except OSError as e:
        raise ConfigError([f"{key}: cannot listen on {addr}: {e.strerror or e}"]) from None


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio server here; needed when port 0 was asked for
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else site._port
