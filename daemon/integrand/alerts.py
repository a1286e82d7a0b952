"""The built-in alert notifier (``[alerts]``): the conditions of docs/alerts.yml, posted to a chat webhook.

For users without Prometheus. Every ``check_every`` it evaluates the same conditions as the shipped
alert rules from the daemon's live state and posts Slack-compatible JSON (``{"text": …}``, which Slack,
Mattermost, Rocket.Chat and Teams' incoming webhooks accept) once when an alert starts firing and once
when it resolves. A post that fails is tried again at the next check: a state change is announced once,
but not lost to a blip."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from . import reports
from .metrics import breaker_open_since

if TYPE_CHECKING:
    from .app import Daemon
    from .config import AlertSettings

log = logging.getLogger("integrand.alerts")


@dataclass(frozen=True)
class Alert:
    """One firing condition: ``key`` names it (rule and subject), ``text`` says it to a human."""

    key: str
    rule: str
    text: str


class Conditions:
    """Evaluates the alert rules on the daemon's state; remembers what the windowed rules need."""

    def __init__(self, settings: AlertSettings, clock: Callable[[], float] = time.time):
        self.s = settings
        self.clock = clock
        self._dead: dict[str, deque[tuple[float, float]]] = {}
        self._missed: dict[str, deque[tuple[float, float]]] = {}

    async def evaluate(self, d: Daemon) -> list[Alert]:
        now = self.clock()
        s = self.s
        out: list[Alert] = []
        for sink in await reports.sinks(d.store, d.settings, d):
            name = sink["name"]
            # Dead-lettered lately, as the rule's increase(integrand_deliveries_total{outcome="dead"}[15m]).
            dead_total = d.metrics.deliveries.values.get((name, "dead"), 0.0)
            grew = self._grew(self._dead, name, now, dead_total, s.dlq_window)
            if grew:
                out.append(
                    Alert(
                        f"dlq:{name}",
                        "IntegrandDeadLettersGrowing",
                        f"sink {name}: {grew:.0f} delivery(ies) dead-lettered in the last {s.dlq_window:.0f} s "
                        f"({sink['dead']} in the DLQ)",
                    )
                )
            rt = d.dispatcher.sinks.get(name)
            since = breaker_open_since(d.metrics, name, rt.breaker) if rt is not None else None
            if rt is not None and since is not None and now - since >= s.breaker_open_for:
                out.append(
                    Alert(
                        f"breaker:{name}",
                        "IntegrandBreakerOpenLong",
                        f"sink {name}: circuit breaker {rt.breaker.status} for {now - since:.1f} s",
                    )
                )
            if rt is not None and rt.auth_error is not None:
                out.append(
                    Alert(
                        f"auth:{name}",
                        "IntegrandSinkAuthPaused",
                        f"sink {name}: paused, its credentials were refused: {rt.auth_error.splitlines()[0]}",
                    )
                )
            age = sink["oldest_pending_age"]
            if age is not None and age >= s.oldest_pending:
                out.append(
                    Alert(
                        f"pending:{name}",
                        "IntegrandOldestPendingHigh",
                        f"sink {name}: oldest pending delivery is {age:.0f} s old ({sink['backlog']} waiting)",
                    )
                )
        missed = _missed_totals(d)
        for name, p in d.pollers.items():
            if p.settings.enabled:
                since = p.last_ok_at if p.last_ok_at is not None else d.metrics.started
                lag, target = now - since, p.settings.target_latency
                if lag > s.poll_lag_factor * target:
                    out.append(
                        Alert(
                            f"poll:{name}",
                            "IntegrandPollLagOverTarget",
                            f"source {name}: last successful poll {lag:.1f} s ago (target latency {target:.1f} s)"
                            + (f"; last error: {p.last_error}" if p.last_error else ""),
                        )
                    )
        for name, total in missed.items():
            caught = self._grew(self._missed, name, now, total, s.reconcile_window)
            if caught:
                out.append(
                    Alert(
                        f"reconcile:{name}",
                        "IntegrandReconcileCatchingMisses",
                        f"source {name}: reconciliation found {caught:.0f} change(s) that webhooks and polls "
                        f"missed in the last {s.reconcile_window:.0f} s",
                    )
                )
        return out

    @staticmethod
    def _grew(
        history: dict[str, deque[tuple[float, float]]],
        key: str,
        now: float,
        value: float,
        window: float,
    ) -> float:
        """How much ``value`` rose within ``window`` (a falling value, e.g. after a replay, counts as no rise)."""
        h = history.setdefault(key, deque())
        h.append((now, value))
        while len(h) > 1 and h[1][0] <= now - window:
            h.popleft()
        rise, low = 0.0, h[0][1]
        for _, v in h:
            rise = max(rise, v - low)
            low = min(low, v)
        return rise


def _missed_totals(d: Daemon) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in d.metrics.reconciled.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("result") == "missed":
                out[sample.labels["source"]] = sample.value
    return out


def message(alert: Alert, firing: bool) -> dict[str, str]:
    """Slack-compatible incoming-webhook JSON."""
    state = "FIRING" if firing else "RESOLVED"
    return {"text": f"[{state}] {alert.rule}: {alert.text}"}


async def run_alerts(d: Daemon, clock: Callable[[], float] = time.time) -> None:
    """Check the conditions every ``check_every`` and post each change of state once.

    The settings are read again at each check, so a reload's ``[alerts]`` applies without a restart
    (and without announcing again what is still firing); a new ``webhook_url`` is told what is firing."""
    s = d.settings.alerts
    assert s.webhook_url is not None
    url = s.webhook_url.reveal()
    cond = Conditions(s, clock)
    announced: dict[str, Alert] = {}  # firing, and told so
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while True:
            if d.settings.alerts is not s:  # reloaded
                s = cond.s = d.settings.alerts
                if s.webhook_url is None:
                    return
                if s.webhook_url.reveal() != url:
                    url = s.webhook_url.reveal()
                    announced.clear()
            try:
                firing = {a.key: a for a in await cond.evaluate(d)}
            except Exception as e:
                log.warning("alerts: cannot evaluate the conditions (will retry): %s", e)
                firing = dict(announced)
            changes = [(a, True) for k, a in firing.items() if k not in announced]
            changes += [(a, False) for k, a in announced.items() if k not in firing]
            for alert, on in changes:
                if await _post(session, url, message(alert, on)):
                    if on:
                        announced[alert.key] = alert
                    else:
                        del announced[alert.key]
                    log.log(
                        logging.WARNING if on else logging.INFO,
                        "alert %s %s: %s",
                        alert.rule,
                        "firing" if on else "resolved",
                        alert.text,
                    )
            await asyncio.sleep(s.check_every)


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, str]) -> bool:
    try:
        async with session.post(url, json=body) as resp:
            if 200 <= resp.status < 300:
                return True
            log.warning("alerts: the webhook answered %d; will try again at the next check", resp.status)
    except (aiohttp.ClientError, TimeoutError) as e:
        log.warning("alerts: cannot reach the webhook (%s); will try again at the next check", type(e).__name__)
    return False
