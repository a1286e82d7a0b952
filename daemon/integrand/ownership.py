"""Which node runs each singleton (a source's polling, streaming and reconciling; the ``[[syncs]]`` task).

On SQLite there is one node and it runs everything (:class:`LocalOwner`, no store access at all). On
PostgreSQL several nodes share the store and each singleton runs on exactly one of them at a time
(:class:`ClusterOwner`): the node holds a lease row with a fencing token, renews it every
``lease_ttl / 3`` seconds, and runs the singleton's tasks with that token as the commits' fence
(``store/fence.py``), so a node that was paused past its lease and wakes up cannot commit a cursor,
a position or state over the new owner's. A node that dies stops renewing: its leases lapse after at
most ``lease_ttl`` and the other nodes, which wake up exactly when the earliest lease lapses, take
them over; its leased deliveries are made ready again as soon as its heartbeat is ``lease_ttl`` old.
Singletons are spread evenly: a node holds at most ``ceil(singletons / live nodes)`` and hands back
the surplus (stopping the tasks first) when more nodes are alive.

The provider budgets declared with ``ctx.http.limit`` are per account, not per node: every node keeps
``budget_share`` of each (the sum over live nodes is the budget). All times that decide who holds a
lease or whether a node is alive are the database's clock; the local monotonic clock only makes a node
stop *before* its lease may have lapsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from . import __version__
from .errors import LeaseLost, StoreUnavailable
from .metrics import Metrics
from .store.fence import CURRENT, Fence
from .store.postgres import NodeInfo, NodeRow, PgStore

log = logging.getLogger("integrand.cluster")

DEFAULT_LEASE_TTL = 15.0
STOP_TIMEOUT = 10.0  # seconds a handed-back singleton's tasks get to finish (a commit in flight) before the release
WAKE_SLACK = 0.05  # seconds after a lease's lapse at which a node looks again (the database decides, not us)

Spawn = Callable[[str, Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


def source_singleton(name: str) -> str:
    """The lease a source's poll, stream and reconcile tasks run under."""
    return f"source:{name}"


def default_node_id() -> str:
    """``host:pid``: unique among running processes, new at every restart (so a restart never inherits a lease)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def fair_share(singletons: int, live_nodes: int) -> int:
    """How many singletons one node may hold: all of them spread over the live nodes, rounded up."""
    return math.ceil(singletons / max(1, live_nodes))


def budget_share(n: int, nodes: int, rank: int) -> int:
    """This node's part of a budget of ``n`` requests per window, shared by ``nodes`` live nodes.

    ``rank`` is this node's place among the live nodes (sorted ids): the parts differ by at most one
    and add up to exactly ``n``, so together the nodes never exceed the provider's limit."""
    nodes = max(1, nodes)
    rank = min(max(0, rank), nodes - 1)
    return n // nodes + (1 if rank < n % nodes else 0)


def split_limits(limits: Iterable[tuple[int, float]], nodes: int, rank: int) -> list[tuple[int, float]]:
    """Every ``(n, seconds)`` window of a budget cut to this node's share of it."""
    return [(budget_share(n, nodes, rank), w) for n, w in limits]


@dataclass(frozen=True)
class OwnershipMetrics:
    node_info: Gauge
    held: Gauge
    changes: Counter
    nodes: Gauge


_metrics: weakref.WeakKeyDictionary[CollectorRegistry, OwnershipMetrics] = weakref.WeakKeyDictionary()


def ownership_metrics(m: Metrics) -> OwnershipMetrics:
    """This daemon's ownership metrics. The node is a label on these only (``integrand_node_info`` names it):
    every other series is told apart by the scrape's own ``instance`` label, as Prometheus intends."""
    found = _metrics.get(m.registry)
    if found is None:
        r = m.registry
        found = OwnershipMetrics(
            node_info=Gauge(
                "integrand_node_info", "Always 1: this process's node id and version", ["node", "version"], registry=r
            ),
            held=Gauge(
                "integrand_lease_held", "1 while this node holds the singleton's lease", ["node", "lease"], registry=r
            ),
            changes=Counter(
                "integrand_lease_changes",
                "Leases this node acquired, released, lost (lapsed before a renewal) or was refused (stale token)",
                ["node", "lease", "change"],
                registry=r,
            ),
            nodes=Gauge(
                "integrand_cluster_nodes",
                "Nodes whose heartbeat this node saw within the lease TTL",
                ["node"],
                registry=r,
            ),
        )
        _metrics[m.registry] = found
    return found


class LocalOwner:
    """One node on SQLite: it owns every singleton; nothing is leased, nothing is fenced."""

    clustered = False

    def __init__(self, node_id: str, spawn: Spawn, metrics: Metrics | None = None):
        self.node_id = node_id
        self._spawn = spawn
        if metrics is not None:
            ownership_metrics(metrics).node_info.labels(node_id, __version__).set(1)

    def holds(self, singleton: str) -> bool:
        return True

    def fence_of(self, singleton: str) -> Fence | None:
        return None  # nothing is fenced on one node

    def spawn_singleton(self, task: str, singleton: str, coro: Coroutine[Any, Any, Any]) -> bool:
        self._spawn(task, coro)
        return True

    async def run(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "clustered": False, "holds": "everything (one node, SQLite)"}


@dataclass
class _Holding:
    fence: Fence
    tasks: set[str] = field(default_factory=set)


class ClusterOwner:
    """Leases singletons from the shared PostgreSQL store and runs the ones it holds, fenced."""

    clustered = True

    def __init__(
        self,
        store: PgStore,
        node_id: str,
        *,
        ttl: float,
        spawn: Spawn,
        tasks: dict[str, asyncio.Task[Any]],
        start: Callable[[str], None],
        wanted: Callable[[], Sequence[str]],
        metrics: Metrics | None = None,
        on_nodes: Callable[[int, int], None] | None = None,
    ):
        self.store = store
        self.node_id = node_id
        self.ttl = ttl
        self.heartbeat_every = ttl / 3
        self._spawn = spawn
        self._tasks = tasks
        self._start = start
        self._wanted = wanted
        self.on_nodes = on_nodes  # (live node count, this node's rank): the budgets' split
        self.m = ownership_metrics(metrics or Metrics())
        self.m.node_info.labels(node_id, __version__).set(1)
        self.info = NodeInfo(node_id, socket.gethostname(), os.getpid(), __version__)
        self.held: dict[str, _Holding] = {}
        self.live: list[NodeRow] = []
        self.ticks = 0
        self._wake = asyncio.Event()
        self._closing = False

    # --- what the daemon asks ---------------------------------------------------------------------

    def holds(self, singleton: str) -> bool:
        h = self.held.get(singleton)
        return h is not None and not h.fence.lost

    def fence_of(self, singleton: str) -> Fence | None:
        """The fence an operator's write for ``singleton`` commits under (None: this node does not hold it)."""
        h = self.held.get(singleton)
        return h.fence if h is not None and not h.fence.lost else None

    def spawn_singleton(self, task: str, singleton: str, coro: Coroutine[Any, Any, Any]) -> bool:
        """Run ``coro`` as ``task`` under the singleton's fence if this node holds it; else do not start it."""
        h = self.held.get(singleton)
        if h is None or h.fence.lost or self._closing:
            coro.close()
            return False
        h.tasks.add(task)
        t = self._spawn(task, self._fenced(h.fence, task, coro))
        t.add_done_callback(lambda _: coro.close())  # stopped before it began: no "never awaited" warning
        return True

    async def _fenced(self, fence: Fence, task: str, coro: Coroutine[Any, Any, Any]) -> None:
        CURRENT.set(fence)  # this task's context only (and the tasks it starts)
        try:
            await coro
        except LeaseLost as e:
            log.warning("%s stopped on this node: %s", task, e)

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "clustered": True,
            "lease_ttl": self.ttl,
            "holds": {name: h.fence.token for name, h in sorted(self.held.items()) if not h.fence.lost},
            "live_nodes": [n.node_id for n in self.live],
        }

    # --- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Heartbeat, renew, rebalance and take over lapsed leases, for as long as the daemon runs."""
        while True:
            try:
                wait = await self.tick()
            except StoreUnavailable as e:
                log.warning("cluster: cannot reach the store to renew leases (%s); retrying", e)
                wait = min(1.0, self.heartbeat_every)
            self._drop_lapsed()
            self._wake.clear()
            self.store.leases_freed.clear()
            woken = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self.store.leases_freed.wait())]
            try:
                await asyncio.wait(woken, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in woken:
                    f.cancel()

    async def tick(self) -> float:
        """One round; returns the seconds until the next (earlier when a lease we may take lapses sooner)."""
        self.ticks += 1
        _, nodes = await self.store.heartbeat(self.info)
        live = [n for n in nodes if n.heartbeat_age < self.ttl or n.node_id == self.node_id]
        for n in nodes:
            if n not in live:
                freed = await self.store.forget_node(n.node_id, dead_after=self.ttl)
                log.warning(
                    "cluster: node %s missed its heartbeats for %.1f s: removed; %d of its leased deliveries made ready",
                    n.node_id,
                    n.heartbeat_age,
                    freed,
                )
        self.live = live
        ids = [n.node_id for n in live]
        self.m.nodes.labels(self.node_id).set(len(live))
        if self.on_nodes is not None:
            self.on_nodes(len(live), ids.index(self.node_id) if self.node_id in ids else 0)

        held = {name: h.fence.token for name, h in self.held.items() if not h.fence.lost}
        if held:
            sent = time.monotonic()  # before the database stamps anything: our view of a lease never outlives it
            renewed = await self.store.renew_leases(held, self.ttl)
            for name, token in held.items():
                h = self.held.get(name)
                if h is None or h.fence.token != token or h.fence.lost:
                    continue  # stopped while the renewal was in flight (a refused commit, a lapse): already handled
                if name in renewed:
                    h.fence.valid_until = sent + self.ttl
                else:
                    self._lose(name, "its renewal was refused (it lapsed, or another node holds it)")

        wanted = sorted(set(self._wanted()))
        for name in [n for n in self.held if n not in wanted]:
            await self.release(name, "no longer configured")
        share = fair_share(len(wanted), len(live))
        surplus = len(self.held) - share
        for name in sorted(self.held, reverse=True)[: max(0, surplus)]:
            await self.release(name, f"rebalancing: {len(live)} nodes, at most {share} singletons each")

        rows = {r.name: r for r in await self.store.leases()}
        wait = self.heartbeat_every
        for name in wanted:
            if name in self.held:
                continue
            r = rows.get(name)
            free = r is None or r.owner is None or r.expires_in <= 0
            if free and len(self.held) < share:
                sent = time.monotonic()
                got = await self.store.acquire_lease(name, self.node_id, self.ttl)
                if got is not None:
                    self._hold(name, got, sent)
                    continue
            if r is not None and r.expires_in > 0 and len(self.held) < share:
                wait = min(wait, r.expires_in + WAKE_SLACK)  # look again the moment it lapses
        for n in live:
            if n.node_id != self.node_id:  # and when another node would be dead, to free its deliveries
                wait = min(wait, self.ttl - n.heartbeat_age + WAKE_SLACK)
        return max(WAKE_SLACK, wait)

    def _hold(self, name: str, token: int, sent: float) -> None:
        fence = Fence(name, token, valid_until=sent + self.ttl, on_refused=self._refused)
        self.held[name] = _Holding(fence)
        self.m.held.labels(self.node_id, name).set(1)
        self.m.changes.labels(self.node_id, name, "acquired").inc()
        log.info("cluster: this node (%s) now runs %s (lease token %d)", self.node_id, name, token)
        self._start(name)

    def _drop_lapsed(self) -> None:
        """Stop every singleton whose lease may lapse before the next renewal could reach the database."""
        now = time.monotonic()
        for name, h in list(self.held.items()):
            if not h.fence.lost and h.fence.valid_until - now <= self.heartbeat_every:
                self._lose(name, "it could not be renewed in time")

    def _refused(self, fence: Fence, why: str) -> None:
        h = self.held.get(fence.lease)
        if h is not None and h.fence is fence:
            self.m.changes.labels(self.node_id, fence.lease, "refused").inc()
            self._stop(fence.lease, why)

    def _lose(self, name: str, why: str) -> None:
        h = self.held.get(name)
        if h is None:
            return
        h.fence.lost = True
        self.m.changes.labels(self.node_id, name, "lost").inc()
        self._stop(name, f"lease lost: {why}")

    def _stop(self, name: str, why: str) -> None:
        h = self.held.pop(name)
        h.fence.lost = True
        self.m.held.labels(self.node_id, name).set(0)
        for task in h.tasks:
            t = self._tasks.get(task)
            if t is not None and not t.done():
                t.cancel()
        log.warning("cluster: this node (%s) stops %s (token %d): %s", self.node_id, name, h.fence.token, why)
        self._wake.set()  # the loop looks at once whether to take another

    async def release(self, name: str, why: str) -> None:
        """Hand a singleton back: its tasks stop (a commit in flight finishes first), then the lease is freed."""
        h = self.held.pop(name, None)
        if h is None:
            return
        running = [t for n in h.tasks if (t := self._tasks.get(n)) is not None and not t.done()]
        for t in running:
            t.cancel()
        if running:  # bounded by a round: the other leases must be renewed meanwhile (a late commit is fenced)
            await asyncio.wait(running, timeout=min(STOP_TIMEOUT, self.heartbeat_every))
        h.fence.lost = True
        self.m.held.labels(self.node_id, name).set(0)
        self.m.changes.labels(self.node_id, name, "released").inc()
        try:
            await self.store.release_lease(name, h.fence.token)
        except StoreUnavailable as e:
            log.warning("cluster: could not release %s (it lapses by itself in %.0f s): %s", name, self.ttl, e)
        log.info("cluster: this node (%s) handed %s back: %s", self.node_id, name, why)

    async def close(self) -> None:
        """A clean stop: every lease handed back and the node's row removed, so others take over at once."""
        self._closing = True
        # The row first: a node woken by the releases' NOTIFY must not count this one among the living.
        with contextlib.suppress(StoreUnavailable):
            await self.store.forget_node(self.node_id, dead_after=None)
        for name in list(self.held):
            await self.release(name, "this node is stopping")


Owner = LocalOwner | ClusterOwner


async def singleton_holder(store: object, singleton: str) -> str | None:
    """The node whose lease on ``singleton`` has not lapsed: None on SQLite, or while no node holds it."""
    if not isinstance(store, PgStore):
        return None
    for le in await store.leases():
        if le.name == singleton and le.owner is not None and le.expires_in > 0:
            return le.owner
    return None


async def cluster_view(store: object) -> list[dict[str, Any]]:
    """Every node of a shared store with its heartbeat's age and what it holds ([] on SQLite)."""
    if not isinstance(store, PgStore):
        return []
    _, nodes = await store.nodes()
    try:
        leases = await store.leases()
    except StoreUnavailable:
        leases = []
    owns: dict[str, list[str]] = {}
    for le in leases:
        if le.owner is not None and le.expires_in > 0:
            owns.setdefault(le.owner, []).append(le.name)
    out = [
        {
            "node_id": n.node_id,
            "host": n.host,
            "pid": n.pid,
            "version": n.version,
            "heartbeat_age": round(n.heartbeat_age, 3),
            "owns": sorted(owns.pop(n.node_id, [])),
        }
        for n in nodes
    ]
    for node_id, names in sorted(owns.items()):  # a holder whose row is gone (removed as dead; lease not yet lapsed)
        out.append({"node_id": node_id, "host": None, "pid": None, "version": None, "heartbeat_age": None,
                    "owns": sorted(names)})  # fmt: skip
    return out
