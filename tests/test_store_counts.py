"""Deliveries per (sink, state) as the store keeps them (schema 7's triggers) always equal a full count,
whatever mix of enqueues, leases, outcomes, reclaims, replays, purges and retention ran, and a store
written before schema 7 starts counting from what it already holds."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integrand.events import Event
from integrand.store import MIGRATIONS, Outcome, Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def full_count(path: Path) -> dict[tuple[str, str], int]:
    with contextlib.closing(sqlite3.connect(path)) as c:
        return {(r[0], r[1]): r[2] for r in c.execute("SELECT sink, state, COUNT(*) FROM deliveries GROUP BY 1, 2")}


STEPS = st.lists(
    st.sampled_from(["enqueue", "lease", "done", "retry", "dead", "expire", "replay", "purge", "prune"]),
    min_size=1,
    max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS)
def test_kept_counts_equal_a_full_count(steps: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_walk(Path(tmp) / "c.db", steps))


async def _walk(path: Path, steps: list[str]) -> None:
    clock = Clock()
    store = Store(path, clock=clock, synchronous="off")
    await store.open()
    held: list[Any] = []
    n = 0
    try:
        for step in steps:
            clock.now += 1
            if step == "enqueue":
                items = [
                    (
                        Event(id=f"e{n + i}", source="s", type="t", data={}, entity_id=str(i % 2)),
                        ["a", "b"][: 1 + i % 2],
                    )
                    for i in range(3)
                ]
                n += 3
                await store.enqueue(items)
            elif step == "lease":
                held += await store.lease(4, 5)
            elif step in ("done", "retry", "dead") and held:
                d = held.pop(0)
                kind: Literal["done", "retry", "dead"] = step  # type: ignore[assignment]
                await store.complete([Outcome(d, kind, error="x", next_attempt_at=clock.now)])
            elif step == "expire":
                clock.now += 10
                await store.reclaim_expired()
                held.clear()
            elif step == "replay":
                await store.replay()
            elif step == "purge":
                dead = await store.dead_letters()
                if dead:
                    await store.purge([dead[0].id])
            elif step == "prune":
                while await store.prune(clock.now + 1, chunk=2):
                    pass
            assert await store.counts() == {k: v for k, v in full_count(path).items() if v}, step
    finally:
        await store.close()


async def test_a_store_from_before_schema_7_counts_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("BEGIN")
        for script in MIGRATIONS[:6]:
            for stmt in (x.strip() for x in script.split(";")):
                if stmt:
                    c.execute(stmt)
        c.execute("PRAGMA user_version = 6")
        for i, (sink, state) in enumerate([("a", "ready"), ("a", "ready"), ("a", "dead"), ("b", "done")], 1):
            c.execute(
                "INSERT INTO events (id, source, event_id, type, entity_key, received_at, body) "
                "VALUES (?, 's', ?, 't', ?, 0, ?)",
                (i, str(i), f"#{i}", Event(id=str(i), source="s", type="t", data={}).to_json()),
            )
            c.execute(
                "INSERT INTO deliveries (event, sink, entity_key, state, created_at, next_attempt_at, updated_at) "
                "VALUES (?, ?, ?, ?, 0, 0, 0)",
                (i, sink, f"#{i}", state),
            )
        c.execute("COMMIT")
    store = Store(path)
    await store.open()
    try:
        assert await store.counts() == {("a", "ready"): 2, ("a", "dead"): 1, ("b", "done"): 1}
        await store.enqueue([(Event(id="new", source="s", type="t", data={}), ["b"])])
        assert await store.counts() == {("a", "ready"): 2, ("a", "dead"): 1, ("b", "done"): 1, ("b", "ready"): 1}
    finally:
        await store.close()
