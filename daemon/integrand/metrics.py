"""Prometheus metrics, one registry per running daemon (tests run several in one process).

Counts that only grow are counters (``_total``); what a scrape reads from the store and the live
sinks and pollers (queue depth, oldest pending age, lag, breaker time open) is refreshed by ``refresh``
just before each scrape, so nothing is computed between scrapes."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__

# No `_created` series beside every counter and histogram: Prometheus does not need them, and they
# doubled the families an operator reads on /metrics.
disable_created_metrics()  # type: ignore[no-untyped-call]

if TYPE_CHECKING:
    from .app import Daemon
    from .breaker import Breaker


class Tally(Collector):
    """A labelled counter kept in a plain dict and exposed like a Counter (``name_total``).

    For counters bumped on the event loop once per request or event: a Counter's child takes a lock
    and a label lookup per increment, which the webhook path pays tens of thousands of times a second."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, *labels: str, amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, n in list(self.values.items()):  # a copy: a scrape may run while the loop counts
            family.add_metric(list(labels), n)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.webhooks = Tally(
            "integrand_webhooks", "Webhook requests by source and HTTP status", ["source", "status"], r
        )
        self.events = Tally(
            "integrand_events_enqueued", "Events stored, by source and outcome", ["source", "outcome"], r
        )
        self.deliveries = Tally("integrand_deliveries", "Delivery attempts by sink and outcome", ["sink", "outcome"], r)
        self.sagas = Tally(
            "integrand_sagas", "Sagas finished, by saga and status (done, compensated, manual)", ["saga", "status"], r
        )
        self.delivery_seconds = Histogram(
            "integrand_delivery_seconds", "Time a sink took per batch", ["sink"], registry=r
        )
        self.breaker_open = Gauge(
            "integrand_breaker_open", "1 while a sink's circuit breaker is not closed", ["sink"], registry=r
        )
        self.queue = Gauge(
            "integrand_deliveries_current", "Deliveries by sink and state", ["sink", "state"], registry=r
        )
        # The store's running totals, read at scrape time from whichever store ``bind_store`` named.
        self.store_totals = _StoreTotals(r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds…
        for c in (PLATFORM_COLLECTOR, GC_COLLECTOR):  # python_info and python_gc_*, as the default registry has
            r.register(_Forward(c))
        Info("integrand_build", "The integrand build this process runs", registry=r).info(
            {"version": __version__, "python": platform.python_version(), "implementation": sys.implementation.name}
        )
        self.start_time = Gauge("integrand_start_time_seconds", "When this daemon started (Unix time)", registry=r)
        self.started = time.time()
        self.open_since: dict[str, float] = {}  # per sink: when its breaker first opened in this outage
        self.start_time.set(self.started)
        self.backlog = Gauge(
            "integrand_sink_backlog", "Deliveries waiting for a sink (ready or leased)", ["sink"], registry=r
        )
        self.oldest_pending = Gauge(
            "integrand_sink_oldest_pending_seconds",
            "Age of the oldest delivery still waiting for a sink (0 when none waits)",
            ["sink"],
            registry=r,
        )
        self.source_lag = Gauge(
            "integrand_source_lag_seconds",
            "Age of the oldest undelivered event from a source (0 when all are delivered)",
            ["source"],
            registry=r,
        )
        self.poll_lag = Gauge(
            "integrand_source_poll_lag_seconds",
            "Time since a polling source's last successful poll: how stale its data may be",
            ["source"],
            registry=r,
        )
        self.target_latency = Gauge(
            "integrand_source_target_latency_seconds",
            "The configured poll.target_latency, to compare poll lag with",
            ["source"],
            registry=r,
        )
        self.breaker_open_seconds = Gauge(
            "integrand_breaker_open_seconds",
            "How long a sink's circuit breaker has been open or half-open (0 when closed)",
            ["sink"],
            registry=r,
        )
        self.auth_paused = Gauge(
            "integrand_sink_auth_paused",
            "1 while a sink is paused because its credentials were refused",
            ["sink"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "integrand_dead_letters", "Deliveries in the dead-letter queue, by sink", ["sink"], registry=r
        )
        self.commit_seconds = Histogram(
            "integrand_store_commit_seconds",
            "Time of one group commit, BEGIN to fsynced COMMIT: every webhook in it waited this long",
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )
        self.commit_ops = Histogram(
            "integrand_store_commit_ops",
            "Operations per group commit (webhooks, leases, acks merged into one transaction)",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096),
        )
        self.polls = Counter(
            "integrand_polls", "Poll requests by source and outcome", ["source", "outcome"], registry=r
        )
        self.poll_interval = Gauge(
            "integrand_poll_interval_seconds", "Wait chosen after the last poll, by source", ["source"], registry=r
        )
        self.reconciled = Counter(
            "integrand_reconcile_entities",
            "Entities checked by reconciliation and what it found (checked, missed, stale, deleted)",
            ["source", "result"],
            registry=r,
        )


class _StoreTotals(Collector):
    """The store writer's running totals (commits, ops, in-line checkpoints, refused webhooks it had no room
    to record, rows retention deleted) as counters."""

    def __init__(self, registry: CollectorRegistry):
        self.store: Any = None
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self.store)

    @staticmethod
    def _families(store: Any) -> Iterator[Metric]:
        for name, attr, doc in (
            ("integrand_store_commits", "commits", "Transactions committed by the store writer"),
            ("integrand_store_ops", "committed_ops", "Operations committed by the store writer"),
            (
                "integrand_store_inline_checkpoints",
                "inline_checkpoints",
                "WAL checkpoints the writer ran between commits because the background ones fell behind",
            ),
            (
                "integrand_store_inline_checkpoint_seconds",
                "inline_checkpoint_seconds",
                "Total time of those checkpoints: every webhook queued meanwhile waited for them",
            ),
            (
                "integrand_store_rejections_dropped",
                "rejections_dropped",
                "Refused webhooks not recorded in the store because a flood outran its writer (the oldest dropped)",
            ),
        ):
            yield CounterMetricFamily(name, doc, value=float(getattr(store, attr, 0) or 0))
        pruned = CounterMetricFamily(
            "integrand_store_pruned",
            "Rows deleted by retention: delivered events (with their deliveries and audit), delete markers "
            "(tombstones), loop-guard entries, sagas' records",
            labels=["kind"],
        )
        for kind, n in sorted((getattr(store, "pruned", None) or {}).items()):
            pruned.add_metric([kind], float(n))
        yield pruned


class _Forward(Collector):
    """Registers a collector of the default registry (platform, GC) in ours as well."""

    def __init__(self, inner: Any):
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        return iter(self.inner.collect())


async def refresh(d: Daemon, now: Callable[[], float] = time.time) -> None:
    """Set what a scrape reads from the store and the running sinks and pollers."""
    m = d.metrics
    m.store_totals.store = d.store
    t = now()
    counts = await d.store.counts()
    backlog = await d.store.backlog()
    m.queue.clear()
    for (sink, state), n in counts.items():
        m.queue.labels(sink, state).set(n)
    by_sink: dict[str, tuple[int, float]] = {}
    by_source: dict[str, float] = {}
    for bl in backlog:
        n, oldest = by_sink.get(bl.sink, (0, bl.oldest_since))
        by_sink[bl.sink] = (n + bl.pending, min(oldest, bl.oldest_since))
        by_source[bl.source] = min(by_source.get(bl.source, bl.oldest_since), bl.oldest_since)
    for name, rt in d.dispatcher.sinks.items():
        n, oldest = by_sink.get(name, (0, t))
        m.backlog.labels(name).set(n)
        m.oldest_pending.labels(name).set(max(0.0, t - oldest))
        m.dead_letters.labels(name).set(counts.get((name, "dead"), 0))
        since = breaker_open_since(m, name, rt.breaker)
        m.breaker_open_seconds.labels(name).set(0.0 if since is None else max(0.0, t - since))
        m.auth_paused.labels(name).set(1 if rt.auth_error is not None else 0)
    for name in d.settings.sources:
        m.source_lag.labels(name).set(max(0.0, t - by_source.get(name, t)))
    for name, p in d.pollers.items():
        m.target_latency.labels(name).set(p.settings.target_latency)
        since = p.last_ok_at if p.last_ok_at is not None else m.started
        m.poll_lag.labels(name).set(max(0.0, t - since))


def breaker_open_since(m: Metrics, sink: str, b: Breaker) -> float | None:
    """When the sink's breaker opened, across the reopenings of failed probes (which restart ``opened_at``)."""
    if b.status == "closed":
        m.open_since.pop(sink, None)
        return None
    return m.open_since.setdefault(sink, b.opened_at)
