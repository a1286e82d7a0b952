"""Config reload (SIGHUP, ``systemctl reload``): validate the new file, start what it adds, then swap.

A new config that does not validate, or whose new connectors cannot start, is rejected with every
problem logged, and the running config stays. Nothing in flight is dropped: webhooks already past the
source lookup finish with the connector they started with; a worker delivering to a removed or replaced
sink finishes its batch with the runtime it holds (old connectors are closed only after the dispatcher's
lease, which bounds any delivery); a removed sink's pending deliveries stay in the store and are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import gcpolicy
from .config import ConnectorSettings, Settings, load_config
from .connector import Connector
from .errors import ConfigError
from .routes import Router, RouteRuntime
from .streamer import STOP_GRACE, streamers_for
from .waits import stop_tasks

if TYPE_CHECKING:
    from .app import Daemon

log = logging.getLogger("integrand.reload")


def _restart_only(old: Settings, new: Settings) -> list[str]:
    """Settings a running daemon cannot change: the ports, the store, the dispatcher's shape."""
    keys = []
    for key in (
        "listen",
        "state_dir",
        "log_format",
        "trusted_proxies",
        "max_connections",
        "max_connections_per_ip",
        "header_timeout",
        "body_timeout",
        "keepalive_timeout",
        "rejections_per_second",
    ):
        if getattr(old.daemon, key) != getattr(new.daemon, key):
            keys.append(f"daemon.{key}")
    for key in ("enabled", "listen", "socket"):
        if getattr(old.admin, key) != getattr(new.admin, key):
            keys.append(f"admin.{key}")
    if old.store != new.store:
        keys.append("store")
    if getattr(old, "syncs", ()) != getattr(new, "syncs", ()):
        keys.append("syncs")
    for key in ("workers", "lease", "batch_size", "linger"):
        if getattr(old.dispatcher, key) != getattr(new.dispatcher, key):
            keys.append(f"dispatcher.{key}")
    return keys


def _changed(old: Settings, new: Settings, role: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """(added, removed, changed, unchanged) names of this role's tables."""
    a: Mapping[str, ConnectorSettings] = old.sources if role == "source" else old.sinks
    b: Mapping[str, ConnectorSettings] = new.sources if role == "source" else new.sinks
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    changed: list[str] = []
    same: list[str] = []
    for name in sorted(set(a) & set(b)):
        differs = (a[name].connector, a[name].options, a[name].core) != (
            b[name].connector,
            b[name].options,
            b[name].core,
        )
        if role == "sink" and not differs:
            # The [dispatcher] defaults a sink inherits are part of its runtime too.
            differs = (old.retry_for(name), old.breaker_for(name)) != (new.retry_for(name), new.breaker_for(name))
        (changed if differs else same).append(name)
    return added, removed, changed, same


async def reload(d: Daemon) -> bool:
    """Apply the config file again; True when the new config is running."""
    async with d.reload_lock:
        d.notifier.reloading()
        try:
            ok = await _reload(d)
        except Exception:
            log.exception("reload failed; the running config is kept")
            ok = False
        from .app import status_line

        d.notifier.ready(await status_line(d))
        if ok:
            gcpolicy.refreeze()  # the old config (settings, router) is let go by now: collect it, freeze again
        return ok


async def _reload(d: Daemon) -> bool:
    from .app import make_poller, sink_runtime, source_runtime, start_connector, start_reconciler, start_source_tasks

    old = d.settings
    path = old.path
    if path is None:
        log.warning("reload: this daemon was not started from a config file; nothing to re-read")
        return False
    try:
        new = await asyncio.to_thread(load_config, path)
    except ConfigError as e:
        log.error("reload of %s rejected, the running config is kept: %d problem(s)", path, len(e.problems))
        for p in e.problems:
            log.error("reload rejected: %s", p)
        return False
    src_added, src_removed, src_changed, src_same = _changed(old, new, "source")
    sink_added, sink_removed, sink_changed, sink_same = _changed(old, new, "sink")

    started: dict[str, Connector[Any]] = {}
    try:
        for role, names, table in (
            ("source", src_added + src_changed, new.sources),
            ("sink", sink_added + sink_changed, new.sinks),
        ):
            for name in names:
                started[f"{role}:{name}"] = await start_connector(
                    new, role, name, table[name], d.store, d.http, d.clock
                )
        sources: dict[str, object] = {n: started.get(f"source:{n}") or d.connectors[f"source:{n}"] for n in new.sources}
        route_runtime = RouteRuntime.build(new.routes, sources, d.store)
    except ConfigError as e:
        for inst in started.values():
            with contextlib.suppress(Exception):
                await inst.close()
        log.error("reload of %s rejected, the running config is kept: %d problem(s)", path, len(e.problems))
        for p in e.problems:
            log.error("reload rejected: %s", p)
        return False

    # Nothing below can fail on the new config: swap.
    for w in new.warnings:
        log.warning("%s", w)
    for key in _restart_only(old, new):
        log.warning("reload: %s changed; it takes effect at the next restart", key)
    retired = [d.connectors.pop(f"source:{n}") for n in src_removed + src_changed]
    retired += [d.connectors.pop(f"sink:{n}") for n in sink_removed + sink_changed]
    d.connectors.update(started)
    d.settings = new
    router = Router(new.routes, new.sagas)
    d.listener.router = router
    d.listener.sources = {n: source_runtime(new, n, d.connectors[f"source:{n}"]) for n in new.sources}
    d.listener.public_url = new.daemon.public_url.rstrip("/") if new.daemon.public_url else None
    d.listener.rejections_kept = new.daemon.rejections_kept
    if new.daemon.log_level != old.daemon.log_level:
        logging.getLogger().setLevel(new.daemon.log_level.upper())
    if old.admin.token != new.admin.token and d.admin is not None:
        d.admin.set_token(new.admin.token)  # validated with the config: never removed from a non-loopback listen
        log.warning("reload: admin.token changed; requests with the old token are refused from now on")
    if old.alerts != new.alerts:
        _apply_alerts(d, new)

    sinks = {
        n: d.dispatcher.sinks[n] if n in sink_same else sink_runtime(new, n, d.connectors[f"sink:{n}"])
        for n in new.sinks
    }
    # Aggregated routes' virtual sinks (not in [sinks]) keep running with their open windows; a change to
    # an ``aggregate`` table takes effect at the next restart.
    sinks.update({n: rt for n, rt in d.dispatcher.sinks.items() if n not in old.sinks})
    if [r.aggregate for r in old.routes] != [r.aggregate for r in new.routes]:
        log.warning("reload: route aggregation settings changed; they take effect when integrand restarts")
    if old.sagas != new.sagas:
        log.warning("reload: [[sagas]] changed; they take effect when integrand restarts")
    d.dispatcher.routes = route_runtime
    d.dispatcher.replace_sinks(sinks, d.dispatcher.absent | set(sink_removed))

    stopping: list[asyncio.Task[Any]] = []
    for name in src_removed + src_changed:
        # A streaming source is stopped like at shutdown: what it had not committed is not acked, so
        # the broker redelivers it to the new connector.
        for prefix in ("poll:", "stream:", "reconcile:"):
            task = d.tasks.pop(prefix + name, None)
            if task is not None:
                stopping.append(task)
        d.pollers.pop(name, None)
        d.streamers.pop(name, None)
    if stopping:
        # The old stream (and poll loop) ends — its batch committed and acked, or handed back; its connection
        # closed — before the new one starts: two sessions on one consumer at once take messages out of
        # order. Cancelled again while it goes on: a library can swallow a cancel (waits.stop_tasks).
        still = await stop_tasks(stopping, timeout=STOP_GRACE + 1)
        for task in still:
            log.warning(
                "reload: %s did not stop within %.0f s; the new one starts beside it", task.get_name(), STOP_GRACE + 1
            )
    fresh = streamers_for(new, d.connectors, d.store, router, d.metrics)
    for name in src_added + src_changed:
        poller = make_poller(d, name)
        if poller is not None:
            d.pollers[name] = poller
        if name in fresh:
            d.streamers[name] = fresh[name]
    for name in src_same:
        for runner in (d.pollers.get(name), d.streamers.get(name)):
            if runner is not None:
                runner.router = router
        start_reconciler(d, name)  # a reconciler holds the router it was started with; a pass resumes
    start_source_tasks(d, src_added + src_changed)

    if retired:
        d.spawn(f"retire:{d.reloads}", _close_later(retired, d.dispatcher.lease_seconds))
    d.reloads += 1
    counts = await d.store.counts() if sink_removed else {}
    for name in sink_removed:
        pending = sum(n for (sink, state), n in counts.items() if sink == name and state in ("ready", "leased"))
        log.warning(
            "reload: sink %s removed; its %d pending deliveries stay in the store and go out if it is configured again",
            name,
            pending,
        )
    log.info(
        "reloaded %s: sources +%d -%d ~%d, sinks +%d -%d ~%d, %d routes",
        path,
        len(src_added),
        len(src_removed),
        len(src_changed),
        len(sink_added),
        len(sink_removed),
        len(sink_changed),
        len(new.routes),
    )
    return True


def _apply_alerts(d: Daemon, new: Settings) -> None:
    """The ``[alerts]`` notifier reads its settings at every check; start it if it is newly configured.

    A changed ``webhook_url`` is told what is firing at its next check; a removed one stops the notifier."""
    from .alerts import run_alerts

    task = d.tasks.get("alerts")
    running = task is not None and not task.done()
    if new.alerts.webhook_url is not None and not running:
        d.spawn("alerts", run_alerts(d))
        log.info("reload: [alerts] notifier started")
    elif new.alerts.webhook_url is None and running:
        assert task is not None
        task.cancel()
        log.info("reload: [alerts] notifier stopped (no webhook_url)")
    else:
        log.info("reload: [alerts] settings applied from the next check")


async def _close_later(connectors: list[Connector[Any]], after: float) -> None:
    """Close replaced connectors once nothing can still use them: a delivery is bounded by the lease."""
    try:
        await asyncio.sleep(after)
    finally:
        for inst in connectors:
            try:
                await inst.close()
            except Exception:
                log.exception("error closing a connector replaced by a reload")
        connectors.clear()
        gcpolicy.refreeze()  # the replaced connectors are let go now: their cycles can be collected
