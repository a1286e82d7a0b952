"""Regression tests for issue 9: the breaker decides per request, an open breaker spends no attempts, and
the loop guard's bookkeeping of a batch shares its commits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from integrand import breaker as br
from integrand.config import RetrySettings
from integrand.connector import Sink
from integrand.dispatcher import Dispatcher, SinkRuntime
from integrand.errors import RetryableError
from integrand.events import Event
from integrand.store import Store
from integrand.testing import wait_for


def ev(i: str, entity_id: str | None = None) -> Event:
    return Event(id=i, source="s", type="t", data={"x": i}, entity="E", entity_id=entity_id)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "q.db")
    await s.open()
    yield s
    await s.close()


# --- 4: the breaker decides per request, and an open breaker spends no attempts -------------------------------


class GatedSink(Sink):
    """Fails every batch with one error (one request), after every worker's batch is in flight."""

    batch_size = 50

    def __init__(self, in_flight: int):
        self.batches = 0
        self.gate = asyncio.Event()
        self.in_flight = in_flight

    async def deliver(self, event: Event) -> None:  # pragma: no cover - deliver_batch is overridden
        raise NotImplementedError

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        self.batches += 1
        if self.batches >= self.in_flight:
            self.gate.set()
        await self.gate.wait()
        err = RetryableError("HTTP 503")
        return [err] * len(events)


def sink_runtime(connector: Sink, threshold: int) -> SinkRuntime:
    return SinkRuntime(
        "k",
        connector,
        50,
        RetrySettings(base=600.0, cap=3600.0, max_attempts=10),
        br.Breaker(threshold, open_for=60.0, max_open_for=600.0),
    )


async def run_until(d: Dispatcher, cond: Callable[[], Awaitable[bool] | bool]) -> None:
    task = asyncio.create_task(d.run())
    try:
        await wait_for(cond)
    finally:
        d.stop()
        await task


async def attempts(store: Store) -> list[int]:
    rows = await store._read().execute_fetchall("SELECT attempts FROM deliveries ORDER BY id")
    return [int(r[0]) for r in rows]


async def test_a_failed_batch_is_one_failure(store: Store) -> None:
    await store.enqueue([(ev(f"e{i}"), ["k"]) for i in range(50)])
    sink = GatedSink(in_flight=1)
    rt = sink_runtime(sink, threshold=5)
    d = Dispatcher(store, {"k": rt}, workers=1, lease_seconds=60, rand=lambda: 1.0)
    await run_until(d, lambda: sink.batches >= 1 and rt.breaker.failures >= 1)
    assert rt.breaker.status == "closed"  # before: 50 rows were 50 failures and the breaker opened
    assert rt.breaker.failures == 1


async def test_deliveries_in_flight_when_the_breaker_opens_spend_no_attempt(store: Store) -> None:
    await store.enqueue([(ev(f"e{i}"), ["k"]) for i in range(200)])
    sink = GatedSink(in_flight=4)
    rt = sink_runtime(sink, threshold=2)
    d = Dispatcher(store, {"k": rt}, workers=4, lease_seconds=60, rand=lambda: 1.0)

    async def settled() -> bool:
        counts = await store.counts()
        return sink.batches >= 4 and counts.get(("k", "leased"), 0) == 0 and counts.get(("k", "ready"), 0) == 200

    await run_until(d, settled)
    counted = await attempts(store)
    assert rt.breaker.status == "open"
    # Four batches were in flight together; the first failure left the breaker closed (its 50 spent an
    # attempt), the second opened it: that batch and the two after it waited without spending one.
    # Before: all 200 spent an attempt.
    assert sum(counted) == 50, sum(counted)
    assert sink.batches == 4


# --- the loop guard's bookkeeping shares commits across a batch ------------------------------------------


class AcceptingSink(Sink):
    batch_size = 50

    def __init__(self) -> None:
        self.got: list[Event] = []

    async def deliver(self, event: Event) -> None:
        self.got.append(event)


async def test_the_loop_guard_writes_a_batch_in_a_few_commits_not_two_per_delivery(store: Store) -> None:
    from integrand.routes import RouteRuntime, RouteSettings

    route = RouteSettings.model_validate(
        {
            "from": "s",
            "to": ["k"],
            "map": {"email": {"path": "data.x", "required": True}},
            "loop_guard": {"key": "email"},
        }
    )
    await store.enqueue([(ev(f"e{i}", f"c{i}"), ["k"]) for i in range(50)])
    sink = AcceptingSink()
    rt = sink_runtime(sink, threshold=5)
    d = Dispatcher(store, {"k": rt}, workers=1, lease_seconds=60, routes=RouteRuntime.build([route], {}, store))
    before = store.commits
    await run_until(d, lambda: len(sink.got) == 50)
    # Each delivery writes an echo marker before and a written marker after: 100 state writes, which
    # before were 100 commits one after another. Now: a lease, the markers before, after, the complete.
    assert store.commits - before <= 10, store.commits - before
    assert await store.state_get("loop-guard:k", "written:e7") is not None
