"""The pull side: one task per polling source, the cursor handoff, webhook nudges and reconciliation.

A poll reads the committed cursor, asks the connector for changes after it, and
stores the events together with the new cursor in one transaction: a crash before
that commit repeats the poll, and event ids plus the entity table absorb the
overlap. When to poll next is decided by :mod:`integrand.pollpolicy`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .config import PollSettings, reconcile_schedule
from .connector import PollingSource, ReconcilingSource
from .errors import AuthError, LeaseLost, RetryableError, StoreUnavailable
from .events import Event, content_id
from .intake import intake
from .metrics import Metrics
from .pollpolicy import (
    Decision,
    Observation,
    PollPolicy,
    PollState,
    budget_wait,
    from_json,
    nudge_delay,
    observe,
    price,
    recent_rate,
    reconciled,
    to_json,
    trusting,
)
from .routes import Router
from .store import EnqueueResult, StoreBackend, version_newer
from .waits import wait_event

log = logging.getLogger("integrand.poller")

STATE_SCOPE = "poll"  # store.state scope of each source's learnt polling state (key: the source name)
SAVE_EVERY = 60.0  # seconds between saves of that state (and at every hour boundary)


def policy_from(settings: PollSettings) -> PollPolicy:
    return PollPolicy(
        min_interval=settings.min_interval,
        max_interval=settings.max_interval,
        target_latency=settings.target_latency,
        max_requests_per_hour=settings.max_requests_per_hour,
        budget_reserve=settings.budget_reserve,
        aggressiveness=settings.aggressiveness,
        rate_half_life=settings.rate_half_life,
        seasonal=settings.seasonal,
        trust_nudges=settings.nudge,
    )


class SourcePoller:
    """Polls one source for as long as it runs; ``nudge`` brings the next poll forward."""

    def __init__(
        self,
        name: str,
        connector: PollingSource,
        store: StoreBackend,
        router: Router,
        settings: PollSettings,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ):
        self.name = name
        self.connector = connector
        self.store = store
        self.router = router
        self.settings = settings
        self.policy = policy_from(settings)
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.rand = rand
        self.state = PollState()
        self.next_at = 0.0
        self.last: Decision | None = None
        self.last_error: str | None = None
        self.polls = 0
        self.pushed = 0
        self.not_before = 0.0  # a provider's Retry-After or budget pacing: nudges never poll before it
        self._saved_at: float | None = None
        self._loaded = False
        self.last_poll_at: float | None = None  # when the last poll started, and the last that succeeded
        self.last_ok_at: float | None = None
        self.cursor_lock = asyncio.Lock()
        # Seconds between saves of the learnt state; 0 on a cluster, where another node may carry on from it
        # at any moment (its request log is the source's budget).
        self.save_every = SAVE_EVERY
        self._wake = asyncio.Event()

    async def load(self) -> None:
        """Start from the state a previous run learnt (hour-of-week profile, price, lag, the budget's request log)."""
        if self._loaded:
            return
        self._loaded = True
        try:
            self.state = from_json(await self.store.state_get(STATE_SCOPE, self.name))
        except StoreUnavailable as e:
            log.warning("source %s: cannot read the learnt polling state, starting cold: %s", self.name, e)

    async def save(self) -> None:
        try:
            await self.store.state_set(STATE_SCOPE, self.name, to_json(self.state))
            self._saved_at = self.clock()
        except StoreUnavailable as e:
            log.warning("source %s: cannot save the learnt polling state: %s", self.name, e)

    async def run(self) -> None:
        await self.load()
        while True:
            wait = self.next_at - self.clock()
            if wait > 0:
                self._wake.clear()
                await wait_event(self._wake, wait)
                continue  # a nudge may have moved next_at; look again
            async with self.cursor_lock:  # `integrand cursor set` waits for a poll in flight (no lost update)
                await self.poll_once()

    def nudge(self, changes: int = 0) -> None:
        """Poll soon (debounced), within the request budget; ``changes``: how many a webhook brought.

        Webhook-delivered changes are what earns the webhooks trust (see ``pollpolicy.trusting``);
        a nudge without them (a cursor set by the admin API) only brings the poll forward."""
        self.pushed += changes
        if not self.settings.nudge:
            return
        now = self.clock()
        at = max(
            now
            + max(
                nudge_delay(self.policy, self.state, self.settings.nudge_debounce),
                budget_wait(self.policy, self.state.requests, now),
            ),
            self.not_before,
        )
        if at < self.next_at:
            self.next_at = at
            self._wake.set()

    async def poll_once(self) -> Decision:
        """One poll: fetch, commit events and cursor together, and schedule the next."""
        started = self.clock()
        obs: Observation
        try:
            cursor = await self.store.cursor_get(self.name)
            result = await self.connector.poll(cursor)
            times, unjudged = await self._new_change_times(result.events)
            if result.events or result.cursor != cursor:
                res = await intake(self.store, self.router, self.name, result.events, cursor=result.cursor)
            else:
                res = EnqueueResult(0, 0)  # an empty poll that moved nothing: no write at all
        except (RetryableError, AuthError, StoreUnavailable) as e:
            obs = Observation(started, error=True, retry_after=getattr(e, "retry_after", None))
            self._failed(e, "error")
        except LeaseLost:
            raise  # another node runs this source now (ownership.py stops this task)
        except Exception as e:
            log.exception("source %s: poll failed", self.name)
            obs = Observation(started, error=True)
            self._failed(e, "error")
        else:
            pushed, self.pushed = self.pushed, 0
            obs = Observation(
                started,
                # New changes only: a full record after its thin webhook is accepted but was no news.
                changes=min(res.accepted, len(times) + unjudged),
                change_times=tuple(times[: res.accepted]),
                pushed=pushed,
                more=result.more,
                retry_after=result.retry_after,
                budget_remaining=result.budget_remaining,
                budget_limit=result.budget_limit,
                budget_reset=result.budget_reset,
            )
            self.last_error = None
            self.last_ok_at = started
            self.metrics.polls.labels(self.name, "ok").inc()
            self.metrics.events.inc(self.name, "accepted", amount=res.accepted)
            if res.duplicates or res.stale:
                self.metrics.events.inc(self.name, "duplicate", amount=res.duplicates + res.stale)
            log.debug(
                "source %s: poll got %d event(s): %d new, %d duplicate, %d stale%s",
                self.name,
                len(result.events),
                res.accepted,
                res.duplicates,
                res.stale,
                "; more waiting" if result.more else "",
            )
        self.polls += 1
        self.last_poll_at = started
        now = self.clock()
        hour = self.state.hour
        self.state, decision = observe(self.policy, self.state, now, obs, self.rand())
        self.last = decision
        self.next_at = now + decision.delay
        self.not_before = self.next_at if decision.reason in ("retry-after", "provider-budget", "budget") else 0.0
        self.metrics.poll_interval.labels(self.name).set(decision.delay)
        if self._saved_at is None or now - self._saved_at >= self.save_every or self.state.hour != hour:
            await self.save()
        return decision

    def reconciled(self, missed: int) -> None:
        """A reconciliation found ``missed`` changes that polling (and webhooks) had not delivered."""
        self.state = reconciled(self.policy, self.state, self.clock(), missed)

    async def _new_change_times(self, events: list[Event] | Any) -> tuple[list[float], int]:
        """The change times (``occurred_at``) of the events the entity table has not seen yet, newest last,
        and how many events have no entity id or change time to judge that by."""
        keys = [(ev.entity or "", ev.entity_id) for ev in events if ev.entity_id is not None and ev.occurred_at]
        unjudged = len(events) - len(keys)
        if not keys:
            return [], unjudged
        known = await self.store.entity_versions(self.name, keys)
        out: list[float] = []
        for ev in events:
            if ev.entity_id is None or not ev.occurred_at:
                continue
            kv = known.get((ev.entity or "", ev.entity_id))
            if kv is None or (
                ev.version is not None and kv.version is not None and version_newer(ev.version, kv.version)
            ):
                try:
                    out.append(datetime.fromisoformat(ev.occurred_at.replace("Z", "+00:00")).timestamp())
                except ValueError:
                    unjudged += 1
                    continue
        return sorted(out), unjudged

    def _failed(self, e: BaseException, outcome: str) -> None:
        self.last_error = f"{type(e).__name__}: {e}"
        self.metrics.polls.labels(self.name, outcome).inc()
        log.warning("source %s: poll failed (%s); backing off", self.name, self.last_error)

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "polls": self.polls,
            "next_poll_in": round(max(0.0, self.next_at - now), 3),
            "last_wait": round(self.last.delay, 3) if self.last else None,
            "last_reason": self.last.reason if self.last else None,
            "change_rate_per_hour": round(recent_rate(self.state) * 3600, 3),
            "late_price": round(price(self.policy, self.state), 3),
            "index_lag": round(self.state.lag, 3),
            "trusting_webhooks": trusting(self.policy, self.state),
            "errors_in_a_row": self.state.errors,
            "requests_last_hour": sum(1 for t in self.state.requests if t > now - 3600),
            "last_error": self.last_error,
        }


# --- reconciliation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconcileReport:
    source: str
    checked: int
    missed: int
    stale: int
    deleted: int
    pages: int

    def __str__(self) -> str:
        return (
            f"reconcile: source={self.source} checked={self.checked} missed={self.missed} "
            f"stale={self.stale} deleted={self.deleted}"
        )


async def reconcile_once(
    name: str,
    connector: ReconcilingSource,
    store: StoreBackend,
    router: Router,
    *,
    window: float | None,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    max_pages: int | None = None,
) -> ReconcileReport | None:
    """Run (or resume) one reconciliation pass, a page per transaction; None if ``max_pages`` stopped it early.

    Progress lives in the ``reconcile`` cursor and is committed with each page's
    events, so a pass interrupted by a crash resumes where it stopped.
    """
    run = await store.cursor_get(name, "reconcile")
    if not isinstance(run, dict) or run.get("done", True):
        now = clock()
        run = {
            "done": False,
            "started": now,
            "since": None if window is None else now - window,
            "page": None,
            "checked": 0,
            "missed": 0,
            "stale": 0,
            "deleted": 0,
            "pages": 0,
        }
    else:
        log.info("source %s: resuming the reconciliation started at %s", name, run["started"])
    pages = 0
    while True:
        page = await connector.reconcile(run["since"], run["page"])
        keys = [(ev.entity or "", ev.entity_id) for ev in page.events if ev.entity_id is not None]
        known = await store.entity_versions(name, [*keys, *page.deleted])
        picked: list[Event] = []
        for ev in page.events:
            if ev.entity_id is None:
                continue
            run["checked"] += 1
            kv = known.get((ev.entity or "", ev.entity_id))
            if kv is None:
                run["missed"] += 1
                picked.append(ev)
            elif kv.deleted or (
                ev.version is not None and (kv.version is None or version_newer(ev.version, kv.version))
            ):
                run["stale"] += 1
                picked.append(ev)
        for entity, eid in page.deleted:
            run["checked"] += 1
            kv = known.get((entity, eid))
            if kv is not None and not kv.deleted:
                run["deleted"] += 1
                picked.append(
                    Event(
                        id=content_id(name, entity, eid, "deleted", kv.version or ""),
                        source=name,
                        type=f"{entity}.deleted",
                        data=None,
                        entity=entity,
                        entity_id=eid,
                        meta={"deleted": True, "reconciled": True},
                    )
                )
        run["page"] = page.cursor
        run["pages"] += 1
        pages += 1
        if not page.more:
            run["done"] = True
            run["finished"] = clock()
        await intake(store, router, name, picked, cursor=run, kind="reconcile")
        if run["done"]:
            break
        if max_pages is not None and pages >= max_pages:
            return None
    report = ReconcileReport(name, run["checked"], run["missed"], run["stale"], run["deleted"], run["pages"])
    m = metrics or Metrics()
    for k in ("checked", "missed", "stale", "deleted"):
        m.reconciled.labels(name, k).inc(getattr(report, k))
    log.info("%s", report)
    return report


def next_reconcile(spec: str, after: float) -> float:
    """When a reconcile schedule fires next after ``after`` (cron in UTC, or every interval)."""
    sched = reconcile_schedule(spec)
    if isinstance(sched, float):
        return after + sched
    from datetime import UTC, datetime

    from croniter import croniter

    return float(croniter(sched, datetime.fromtimestamp(after, UTC)).get_next(float))


async def run_reconciler(
    name: str,
    connector: ReconcilingSource,
    store: StoreBackend,
    router: Router,
    settings: PollSettings,
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    poller: SourcePoller | None = None,
) -> None:
    """Reconcile on the source's schedule; a pass a crash interrupted is resumed at once.

    ``poller``, if given, learns from the result: missed changes count as late ones.
    """
    assert settings.reconcile is not None
    run = await store.cursor_get(name, "reconcile")
    pending = isinstance(run, dict) and not run.get("done", True)
    while True:
        if not pending:
            at = next_reconcile(settings.reconcile, clock())
            await asyncio.sleep(max(0.0, at - clock()))
        pending = False
        try:
            report = await reconcile_once(
                name, connector, store, router, window=settings.reconcile_window, metrics=metrics, clock=clock
            )
            if report is not None and poller is not None:
                poller.reconciled(report.missed + report.stale)
        except Exception as e:
            # The pass keeps its progress; the next scheduled run resumes it.
            log.warning("source %s: reconciliation failed, will resume: %s: %s", name, type(e).__name__, e)
