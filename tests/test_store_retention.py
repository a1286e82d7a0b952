"""Retention: delivered events, delete markers and the loop guard's memory go, a chunk per writer hold."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from integrand.events import Event
from integrand.store import Outcome, Store


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[Store]:
    s = Store(tmp_path / "q.db", clock=clock)
    await s.open()
    yield s
    await s.close()


async def prune_pass(store: Store, cutoff: float, chunk: int) -> tuple[int, int]:
    """Run one retention pass the way the daemon does; (rows deleted, calls made)."""
    total = calls = 0
    while (n := await store.prune(cutoff, chunk=chunk)) > 0:
        total += n
        calls += 1
    return total, calls + 1


async def test_a_pass_walks_past_dead_letters_a_chunk_at_a_time(store: Store, clock: Clock) -> None:
    # One group commit: every event has the same received_at, as under load.
    await store.enqueue([(Event(id=f"e{i}", source="s", type="t", data={}), ["k"]) for i in range(40)])
    leased = await store.lease(100, 60)
    # The first 30 are dead (kept until purged); only the last 10 are delivered.
    await store.complete([Outcome(d, "dead" if int(d.event.id[1:]) < 30 else "done", error="x") for d in leased])
    clock.now += 100
    commits = store.commits
    deleted, _ = await prune_pass(store, clock.now, chunk=4)
    assert deleted == 10
    assert store.commits - commits >= 40 // 4  # no writer hold examined more than its chunk…
    assert await store.event_count() == 30  # … yet the pass reached the delivered ones behind the dead
    assert len(await store.dead_letters()) == 30
    assert await prune_pass(store, clock.now, chunk=4) == (0, 1)  # nothing left: the next pass ends at once


async def test_old_delete_markers_and_loop_guard_memory_are_pruned(store: Store, clock: Clock) -> None:
    def change(i: str, entity_id: str, deleted: bool) -> Event:
        return Event(
            id=i,
            source="s",
            type="c.deleted" if deleted else "c.updated",
            data={"i": i},
            entity="c",
            entity_id=entity_id,
        )

    await store.enqueue([(change("1", "live", False), []), (change("2", "gone", True), [])])
    await store.state_set("loop-guard:crm", "written:42", "fp")
    await store.state_set("connector:qbo", "token", {"refresh": "r"})  # a connector's own state: never pruned
    clock.now += 100
    await store.state_set("loop-guard:crm", "written:43", "fp")  # recent: kept
    deleted, _ = await prune_pass(store, clock.now - 50, chunk=100)
    assert deleted == 2 + 1 + 1  # two delivered events (no sinks), one delete marker, one loop-guard entry
    versions = await store.entity_versions("s", [("c", "live"), ("c", "gone")])
    assert set(versions) == {("c", "live")}  # live entities are reconciliation's baseline: kept
    assert await store.state_get("loop-guard:crm", "written:42") is None
    assert await store.state_get("loop-guard:crm", "written:43") == "fp"
    assert await store.state_get("connector:qbo", "token") == {"refresh": "r"}


async def test_the_retention_log_line_says_what_a_pass_deleted(tmp_path: Path) -> None:
    from integrand.app import pruned_line

    store = Store(tmp_path / "r.db")
    await store.open()
    try:
        await store.enqueue([(Event(id=f"e{i}", source="s", type="t", data={}), ["k"]) for i in range(3)])
        await store.complete([Outcome(d, "done") for d in await store.lease(10, 60)])
        before = dict(store.pruned)
        while await store.prune(time.time() + 1) > 0:
            pass
        assert pruned_line(before, store.pruned) == (
            "deleted 3 delivered events past [store] retention (with their deliveries and audit), "
            "0 delete markers, 0 loop-guard entries and 0 sagas' records"
        )
    finally:
        await store.close()
