"""Prometheus metrics, one registry per running daemon (tests run several in one process)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


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
        self.delivery_seconds = Histogram(
            "integrand_delivery_seconds", "Time a sink took per batch", ["sink"], registry=r
        )
        self.breaker_open = Gauge(
            "integrand_breaker_open", "1 while a sink's circuit breaker is not closed", ["sink"], registry=r
        )
        self.queue = Gauge(
            "integrand_deliveries_current", "Deliveries by sink and state", ["sink", "state"], registry=r
        )
        self.commits = Gauge("integrand_store_commits", "Transactions committed by the store writer", registry=r)
        self.committed_ops = Gauge("integrand_store_ops", "Operations committed by the store writer", registry=r)
        self.inline_checkpoints = Gauge(
            "integrand_store_inline_checkpoints",
            "WAL checkpoints the writer ran between commits because the background ones fell behind",
            registry=r,
        )
        self.inline_checkpoint_seconds = Gauge(
            "integrand_store_inline_checkpoint_seconds",
            "Total time of those checkpoints: every webhook queued meanwhile waited for them",
            registry=r,
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
