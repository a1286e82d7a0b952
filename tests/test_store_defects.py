"""Regression tests for the four store/dispatcher defects of issue 9: each failed on the code before its fix."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from integrand.events import Event
from integrand.store import Leased, Outcome, Store, UnstorableEvent


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def ev(i: str, entity_id: str | None = None, data: object = None) -> Event:
    return Event(id=i, source="s", type="t", data={"x": i} if data is None else data, entity="E", entity_id=entity_id)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "q.db")
    await s.open()
    yield s
    await s.close()


# --- 1: event ids come from SQLite, so another writer on the same file cannot make enqueues collide ----------


async def test_a_second_writer_beside_the_daemon_does_not_break_its_enqueues(store: Store) -> None:
    await store.enqueue([(ev("d1"), ["k"])])
    cli = Store(store.path, role="client")  # what `integrand reconcile` / `cursor set` opened beside the daemon
    await cli.open()
    try:
        assert (await cli.enqueue([(ev("c1"), ["k"])])).accepted == 1
    finally:
        await cli.close()
    # Before: the daemon's in-memory id counter handed out the id the CLI had just used: IntegrityError.
    results = await asyncio.gather(*(store.enqueue([(ev(f"d{i}"), ["k"])]) for i in range(2, 12)))
    assert [r.accepted for r in results] == [1] * 10
    assert await store.event_count() == 12
    leased = await store.lease(100, 60)
    assert sorted(x.event.id for x in leased) == sorted(["c1", *(f"d{i}" for i in range(1, 12))])


async def test_another_process_writing_while_the_daemon_runs(store: Store) -> None:
    await store.enqueue([(ev("before"), ["k"])])
    script = textwrap.dedent(
        f"""
        import asyncio
        from integrand.events import Event
        from integrand.store import Store

        async def main():
            s = Store({str(store.path)!r}, role="client")
            await s.open()
            for i in range(5):
                await s.enqueue([(Event(id=f"p{{i}}", source="s", type="t", data={{}}), ["k"])])
            await s.close()

        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stderr=subprocess.PIPE)
    # The daemon keeps enqueuing while the other process writes.
    mine = [await store.enqueue([(ev(f"m{i}"), ["k"])]) for i in range(20)]
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    mine += [await store.enqueue([(ev(f"n{i}"), ["k"])]) for i in range(5)]
    assert all(r.accepted == 1 for r in mine)
    assert await store.event_count() == 1 + 20 + 5 + 5
    # Every delivery points at its own event.
    for d in await store.lease(100, 60):
        assert d.event.id in {"before", *(f"m{i}" for i in range(20)), *(f"n{i}" for i in range(5))} | {
            f"p{i}" for i in range(5)
        }


# --- 2: complete() is fenced by the lease token ------------------------------------------------------------


async def test_a_late_completion_from_an_expired_lease_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    store = Store(tmp_path / "q.db", clock=clock)
    await store.open()
    try:
        await store.enqueue([(ev("v1", "A"), ["k"]), (ev("v2", "A"), ["k"])])
        [a] = await store.lease(10, 10)  # worker A
        clock.now += 11
        assert await store.reclaim_expired() == 1
        [b] = await store.lease(10, 60)  # worker B takes v1 over and delivers it
        assert b.event.id == "v1"
        await store.complete([Outcome(b, "done")])
        with caplog.at_level(logging.WARNING, logger="integrand.store"):
            await store.complete([Outcome(a, "retry", error="late", next_attempt_at=clock.now)])  # A, too late
        assert "stale" in caplog.text
        # v1 stays done; only v2 is leasable, alone (before: v1 came back and was leased beside v2).
        assert [x.event.id for x in await store.lease(10, 60)] == ["v2"]
        assert (await store.counts())[("k", "done")] == 1
    finally:
        await store.close()


async def test_a_late_completion_does_not_touch_the_current_lease(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path / "q.db", clock=clock)
    await store.open()
    try:
        await store.enqueue([(ev("v1", "A"), ["k"])])
        [a] = await store.lease(1, 10)
        clock.now += 11
        await store.reclaim_expired()
        [b] = await store.lease(1, 60)
        await store.complete([Outcome(a, "dead", error="late")])  # stale: B holds it now
        assert await store.dead_letters() == []
        await store.complete([Outcome(b, "done")])
        assert await store.counts() == {("k", "done"): 1}
    finally:
        await store.close()


# --- 3: one bad operation in a group commit fails alone ----------------------------------------------------


async def test_one_unserialisable_event_fails_alone_in_its_group_commit(store: Store) -> None:
    good = [store.enqueue([(ev(f"g{i}"), ["k"])]) for i in range(5)]
    bad = store.enqueue([(ev("bad", data={1: "non-string key"}), ["k"])])
    state = store.state_set("conn", "token", {"t": 1})
    results = await asyncio.gather(*good, bad, state, return_exceptions=True)
    assert [getattr(r, "accepted", None) for r in results[:5]] == [1] * 5
    assert isinstance(results[5], Exception)
    assert "bad" in str(results[5]) and "JSON" in str(results[5])
    assert results[6] is None
    assert await store.event_count() == 5
    assert await store.state_get("conn", "token") == {"t": 1}


async def test_an_enqueue_failing_in_sql_fails_alone(store: Store) -> None:
    good = [store.enqueue([(ev(f"g{i}", "A"), ["k"])]) for i in range(3)]
    bad = store.enqueue([(ev("bad"), [object()])])  # type: ignore[list-item]  # a sink name SQLite cannot bind
    more = store.enqueue_with_cursor([(ev("p1"), ["k"])], "s", {"page": 2})
    results = await asyncio.gather(*good, bad, more, return_exceptions=True)
    assert [getattr(r, "accepted", None) for r in results[:3]] == [1, 1, 1]
    assert isinstance(results[3], Exception)
    assert getattr(results[4], "accepted", None) == 1
    assert await store.cursor_get("s") == {"page": 2}
    assert await store.event_count() == 4


# --- also found: blocked rows, and a replayed delivery beside its successor --------------------------------


async def test_a_replayed_dead_delivery_waits_for_its_successor_in_flight(store: Store) -> None:
    await store.enqueue([(ev("e1", "A"), ["k"])])  # no version: replay cannot judge it superseded
    [one] = await store.lease(10, 60)
    await store.complete([Outcome(one, "dead", error="bad")])
    await store.enqueue([(ev("e2", "A"), ["k"])])
    [two] = await store.lease(10, 60)
    assert two.event.id == "e2"
    assert (await store.replay([one.id])).replayed == 1
    assert await store.lease(10, 60) == []  # before: e1 was leased beside e2, in flight together
    await store.complete([Outcome(two, "done")])
    assert [x.event.id for x in await store.lease(10, 60)] == ["e1"]


async def test_a_replayed_delivery_goes_before_a_waiting_successor(store: Store) -> None:
    await store.enqueue([(ev("e1", "A"), ["k"])])
    [one] = await store.lease(10, 60)
    await store.complete([Outcome(one, "dead", error="bad")])
    await store.enqueue([(ev("e2", "A"), ["k"]), (ev("e3", "A"), ["k"])])
    await store.replay([one.id])
    for want in ("e1", "e2", "e3"):
        [d] = await store.lease(10, 60)
        assert d.event.id == want
        await store.complete([Outcome(d, "done")])


async def test_random_operations_keep_one_head_per_entity_line(tmp_path: Path) -> None:
    import random

    rnd = random.Random(9)
    clock = Clock()
    store = Store(tmp_path / "q.db", clock=clock)
    await store.open()
    try:
        n = 0
        held: list[Leased] = []
        for _ in range(300):
            op = rnd.random()
            if op < 0.35:
                batch = []
                for _ in range(rnd.randint(1, 5)):
                    n += 1
                    batch.append(
                        (ev(f"e{n}", rnd.choice(["A", "B", "C", None])), rnd.sample(["k1", "k2"], rnd.randint(1, 2)))
                    )
                await store.enqueue(batch)
            elif op < 0.6:
                got = await store.lease(rnd.randint(1, 4), 60, due_only=rnd.random() < 0.8)
                held += got
            elif op < 0.85 and held:
                d = held.pop(rnd.randrange(len(held)))
                kind = rnd.choice(["done", "done", "retry", "dead", "release"])
                await store.complete([Outcome(d, kind, error="x", next_attempt_at=clock.now + rnd.choice([0, 5]))])  # type: ignore[arg-type]
            elif op < 0.9:
                dead = await store.dead_letters()
                if dead:
                    await store.replay([rnd.choice(dead).id])
            else:
                clock.now += 3
            lines = await store._read().execute_fetchall(
                "SELECT sink, entity_key, SUM(head = 1), SUM(state = 'leased') FROM deliveries WHERE active = 1 "
                "GROUP BY sink, entity_key"
            )
            for sink, key, heads, leased in lines:
                assert heads == 1, (sink, key, heads)
                assert leased <= 1, (sink, key, leased)
            in_flight = [(d.sink, d.event.entity_key) for d in held]
            assert len(in_flight) == len(set(in_flight))
    finally:
        await store.close()


# --- also found: versions in one canonical form, and deletes that keep theirs --------------------------------


def change(i: str, version: str | None, *, deleted: bool = False, data: object = None) -> Event:
    return Event(
        id=i,
        source="s",
        type="c.deleted" if deleted else "c.updated",
        data={"i": i} if data is None else data,
        entity="c",
        entity_id="42",
        version=version,
    )


async def test_fractional_seconds_and_offsets_order_as_instants(store: Store) -> None:
    assert (await store.enqueue([(change("a", "2026-01-01T00:00:00.5Z"), ["k"])])).accepted == 1
    # Before: compared as strings, "…00Z" > "…00.5Z", so the older change was taken as newer.
    assert (await store.enqueue([(change("b", "2026-01-01T00:00:00Z"), ["k"])])).stale == 1
    assert (await store.enqueue([(change("c", "2026-01-01T01:00:01+01:00"), ["k"])])).accepted == 1


async def test_a_version_of_another_form_is_refused_alone(store: Store) -> None:
    await store.enqueue([(change("a", "1767225600000"), ["k"])])  # epoch ms
    mixed = store.enqueue([(change("b", "2026-06-01T00:00:00Z"), ["k"])])  # ISO: misordered before
    other = store.enqueue([(ev("fine"), ["k"])])
    results = await asyncio.gather(mixed, other, return_exceptions=True)
    assert isinstance(results[0], UnstorableEvent)
    assert (
        "version '2026-06-01T00:00:00Z' is a time but entity c:42 was last seen at version '1767225600000', a number"
        in str(results[0])
    )
    assert getattr(results[1], "accepted", None) == 1
    with pytest.raises(UnstorableEvent, match="neither a number nor an ISO-8601 time"):
        await store.enqueue([(change("c", "v2"), ["k"])])


async def test_a_delete_without_a_version_keeps_the_entitys(store: Store) -> None:
    await store.enqueue([(change("v5", "5"), ["k"])])
    # A reconciliation's delete (and most providers' delete webhooks) carries no version.
    assert (await store.enqueue([(change("del", None, deleted=True, data=None), ["k"])])).accepted == 1
    known = await store.entity_versions("s", [("c", "42")])
    assert (known[("c", "42")].version, known[("c", "42")].deleted) == ("5", True)
    # Before: the delete stored version NULL, and a late older change was accepted after it.
    assert (await store.enqueue([(change("v4", "4"), ["k"])])).stale == 1
    assert (await store.enqueue([(change("v6", "6"), ["k"])])).accepted == 1


async def test_at_one_version_the_delete_wins(store: Store) -> None:
    await store.enqueue([(change("u", "7", data={"name": "x"}), ["k"])])
    await store.enqueue([(change("d", "7", deleted=True), ["k"])])
    assert (await store.enqueue([(change("u-again", "7", data={"name": "y"}), ["k"])])).stale == 1
