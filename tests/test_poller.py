"""The poller against a real store: cursor handoff, paging, errors, nudges and reconciliation passes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from integrand.config import PollSettings, RouteSettings
from integrand.connector import PollingSource, PollResult, ReconcilePage, ReconcilingSource
from integrand.errors import RetryableError
from integrand.events import Event
from integrand.poller import SourcePoller, next_reconcile, reconcile_once
from integrand.routes import Router
from integrand.store import Store

from .helpers import wait_for

ROUTER = Router([RouteSettings.model_validate({"from": "src", "to": ["out"]})])


class ChangeLog(PollingSource, ReconcilingSource):
    """A source whose changes are a list; the cursor is the index of the next one, pages of ``page`` items."""

    def __init__(self, page: int = 3) -> None:
        self.changes: list[tuple[str, int]] = []  # (entity id, version)
        self.page = page
        self.fail: list[BaseException] = []
        self.calls = 0

    def event(self, eid: str, version: int) -> Event:
        return Event(
            id=f"{eid}@{version}",
            source="src",
            type="thing.updated",
            data={"id": eid, "v": version},
            entity="thing",
            entity_id=eid,
            version=str(version),
        )

    async def poll(self, cursor: Any) -> PollResult:
        self.calls += 1
        if self.fail:
            raise self.fail.pop(0)
        start = cursor or 0
        batch = self.changes[start : start + self.page]
        nxt = start + len(batch)
        return PollResult([self.event(e, v) for e, v in batch], nxt, more=nxt < len(self.changes))

    async def reconcile(self, since: float | None, cursor: Any) -> ReconcilePage:
        latest: dict[str, int] = {}
        for e, v in self.changes:
            latest[e] = max(v, latest.get(e, 0))
        ids = sorted(latest)
        start = cursor or 0
        chunk = ids[start : start + self.page]
        return ReconcilePage(
            [self.event(e, latest[e]) for e in chunk], start + len(chunk), more=start + len(chunk) < len(ids)
        )


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = Store(tmp_path / "q.db")
    await s.open()
    yield s
    await s.close()


def settings(**kw: Any) -> PollSettings:
    return PollSettings.model_validate({"min_interval": 0.01, "max_interval": 60, "target_latency": 1, **kw})


async def test_pages_then_rate_interval_and_cursor_handoff(store: Store) -> None:
    src = ChangeLog(page=3)
    src.changes = [(f"e{i}", 1) for i in range(7)]
    p = SourcePoller("src", src, store, ROUTER, settings())
    d = await p.poll_once()
    assert d.reason == "more"
    assert d.delay == 0
    assert await store.cursor_get("src") == 3
    await p.poll_once()
    d = await p.poll_once()
    assert d.reason == "rate"
    assert 0.01 <= d.delay <= 60
    assert await store.cursor_get("src") == 7
    assert await store.event_count() == 7
    assert (await store.counts())[("out", "ready")] == 7
    # Nothing new: the cursor stays, the interval does not shrink.
    d2 = await p.poll_once()
    assert d2.delay >= d.delay
    assert await store.cursor_get("src") == 7


async def test_error_keeps_cursor_and_honours_retry_after(store: Store) -> None:
    src = ChangeLog()
    src.changes = [("a", 1)]
    p = SourcePoller("src", src, store, ROUTER, settings())
    await p.poll_once()
    src.changes.append(("a", 2))
    src.fail = [RetryableError("429 Too Many Requests", retry_after=120)]
    d = await p.poll_once()
    assert (d.reason, d.delay) == ("retry-after", 120)
    assert await store.cursor_get("src") == 1
    assert p.status()["last_error"] == "RetryableError: 429 Too Many Requests"
    src.fail = [ValueError("connector bug")]
    d = await p.poll_once()
    assert d.reason == "error"
    assert p.state.errors == 2
    d = await p.poll_once()
    assert await store.cursor_get("src") == 2
    assert p.state.errors == 0


async def test_a_repeated_poll_after_a_lost_commit_is_absorbed(store: Store) -> None:
    """Simulates a crash between poll and commit: the cursor was not moved, so the poll repeats."""
    src = ChangeLog(page=10)
    src.changes = [("a", 1), ("b", 1)]
    p = SourcePoller("src", src, store, ROUTER, settings())
    await p.poll_once()
    await store.cursor_set("src", 0)  # as if the last commit had never happened... but its events had
    await p.poll_once()
    assert await store.event_count() == 2
    assert await store.cursor_get("src") == 2


async def test_nudge_brings_the_next_poll_forward(store: Store) -> None:
    src = ChangeLog()
    p = SourcePoller("src", src, store, ROUTER, settings(min_interval=30, max_interval=3600, nudge_debounce=0.05))
    task = asyncio.create_task(p.run())
    try:
        await wait_for(lambda: src.calls == 1 and p.polls == 1)  # called, and the next poll scheduled
        assert p.next_at - p.clock() > 1000  # nothing found: polling slowly
        src.changes.append(("a", 1))
        p.nudge()
        p.nudge()  # debounced: still one early poll
        await wait_for(lambda: src.calls == 2)
        await wait_for(lambda: p.polls == 2)
        assert await store.event_count() == 1
        assert src.calls == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_nudge_off_and_budget_respected(store: Store) -> None:
    src = ChangeLog()
    p = SourcePoller("src", src, store, ROUTER, settings(min_interval=30, max_interval=3600, nudge=False))
    await p.poll_once()
    before = p.next_at
    p.nudge()
    assert p.next_at == before
    q = SourcePoller("src", src, store, ROUTER, settings(min_interval=30, max_interval=3600, max_requests_per_hour=1))
    await q.poll_once()
    q.nudge()
    assert q.next_at - q.clock() > 3500  # the hourly budget is spent: a nudge cannot buy a request


async def test_nudge_never_polls_before_retry_after(store: Store) -> None:
    src = ChangeLog()
    src.fail = [RetryableError("HTTP 429", retry_after=120.0)]
    p = SourcePoller("src", src, store, ROUTER, settings(min_interval=1, max_interval=3600, nudge_debounce=0.05))
    d = await p.poll_once()
    assert d.reason == "retry-after"
    p.nudge()  # a webhook arrives while the provider asked for two minutes of quiet
    assert p.next_at - p.clock() >= 119.9


async def test_learnt_state_survives_a_restart_and_uses_change_times(store: Store) -> None:
    import time as _time

    from integrand.pollpolicy import to_json

    class Timed(ChangeLog):
        def event(self, eid: str, version: int) -> Event:
            ev = super().event(eid, version)
            return Event(**{**ev.to_dict(), "occurred_at": "2026-12-07T00:00:00Z"})

    src = Timed()
    src.changes = [("a", 1), ("b", 1)]
    p = SourcePoller("src", src, store, ROUTER, settings())
    await p.load()
    await p.poll_once()
    changed = _time.mktime((2026, 12, 7, 0, 0, 0, 0, 0, 0)) - _time.timezone
    assert p.state.last_change == pytest.approx(changed)  # the change time the source reported, not the poll's
    await p.poll_once()  # the same events again: not new, so no new change time
    assert p.state.last_change == pytest.approx(changed)
    await p.save()
    q = SourcePoller("src", src, store, ROUTER, settings())
    await q.load()
    assert to_json(q.state) == to_json(p.state)


async def test_reconcile_finds_missed_and_stale_and_resumes(store: Store) -> None:
    src = ChangeLog(page=2)
    src.changes = [("a", 1), ("b", 1), ("c", 1)]
    p = SourcePoller("src", src, store, ROUTER, settings())
    while (await p.poll_once()).reason == "more":
        pass
    # Changes the poller never saw (a purged change log, a lagging index...).
    src.changes += [("b", 2), ("d", 1), ("e", 1)]
    report = await reconcile_once("src", src, store, ROUTER, window=None, max_pages=1)
    assert report is None  # stopped after one page, progress kept
    run = await store.cursor_get("src", "reconcile")
    assert run["done"] is False
    assert run["page"] == 2
    report = await reconcile_once("src", src, store, ROUTER, window=None)
    assert report is not None
    assert (report.checked, report.missed, report.stale, report.deleted) == (5, 2, 1, 0)
    assert str(report) == "reconcile: source=src checked=5 missed=2 stale=1 deleted=0"
    assert await store.event_count() == 6
    again = await reconcile_once("src", src, store, ROUTER, window=None)
    assert again is not None
    assert (again.missed, again.stale) == (0, 0)
    assert await store.event_count() == 6


def test_schedules() -> None:
    # 2026-11-21 10:00:00 UTC → next 02:00 UTC is the following day.
    t = 1795255200.0
    assert next_reconcile("0 2 * * *", t) == t + 16 * 3600
    assert next_reconcile("6h", t) == t + 6 * 3600
    with pytest.raises(ValueError, match="neither cron"):
        settings(reconcile="every tuesday")


async def test_scheduled_reconciliation_tells_the_poller_what_it_missed(store: Store) -> None:
    from integrand.poller import run_reconciler
    from integrand.pollpolicy import price

    src = ChangeLog(page=10)
    conf = settings(reconcile="50ms")
    p = SourcePoller("src", src, store, ROUTER, conf)
    await p.poll_once()
    before = price(p.policy, p.state)
    src.changes += [("x", 1), ("y", 1)]  # changes the poller never polled
    task = asyncio.create_task(run_reconciler("src", src, store, ROUTER, conf, poller=p))
    try:
        await wait_for(lambda: price(p.policy, p.state) > before)
        assert p.state.hour_count >= 2  # counted as changes of this hour, too
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
