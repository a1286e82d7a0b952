"""Prometheus metrics, one registry per running daemon (tests run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.webhooks = Counter(
            "integrand_webhooks",
            "Webhook requests by source and HTTP status",
            ["source", "status"],
            registry=r,
        )
        self.events = Counter(
            "integrand_events_enqueued",
            "Events stored, by source and outcome",
            ["source", "outcome"],
            registry=r,
        )
        self.deliveries = Counter(
            "integrand_deliveries", "Delivery attempts by sink and outcome", ["sink", "outcome"], registry=r
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
        self.commits = Gauge("integrand_store_commits", "Transactions committed by the store writer", registry=r)
        self.committed_ops = Gauge("integrand_store_ops", "Operations committed by the store writer", registry=r)
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
