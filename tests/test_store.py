"""The store's contract: durable enqueue with dedup, group commit, per-entity order, leases, DLQ."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from integrand.errors import StoreUnavailable
from integrand.events import Event
from integrand.store import MIGRATIONS, Outcome, Store


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def ev(i: str, entity_id: str | None = None, source: str = "s", size: int = 10) -> Event:
    return Event(id=i, source=source, type="t", data={"x": "y" * size}, entity="E", entity_id=entity_id)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[Store]:
    s = Store(tmp_path / "q.db", clock=clock)
    await s.open()
    yield s
    await s.close()


async def test_enqueue_lease_ack(store: Store) -> None:
    r = await store.enqueue([(ev("a"), ["k1", "k2"])])
    assert (r.accepted, r.duplicates) == (1, 0)
    leased = await store.lease(10, 60)
    assert sorted(x.sink for x in leased) == ["k1", "k2"]
    assert leased[0].event == ev("a").__class__(**{**leased[0].event.to_dict()})
    assert leased[0].event.data == {"x": "y" * 10}
    await store.complete([Outcome(x, "done") for x in leased])
    assert await store.counts() == {("k1", "done"): 1, ("k2", "done"): 1}
    assert await store.lease(10, 60) == []


async def test_duplicates_within_and_across_batches(store: Store) -> None:
    r = await store.enqueue([(ev("a"), ["k"]), (ev("a"), ["k"]), (ev("b"), ["k"])])
    assert (r.accepted, r.duplicates) == (2, 1)
    r = await store.enqueue([(ev("a"), ["k"]), (ev("c"), ["k"])])
    assert (r.accepted, r.duplicates) == (1, 1)
    # The same id from another source is a different event.
    r = await store.enqueue([(ev("a", source="other"), ["k"])])
    assert (r.accepted, r.duplicates) == (1, 0)
    assert await store.event_count() == 4
    assert len(await store.lease(100, 60)) == 4


async def test_concurrent_enqueues_share_commits(store: Store) -> None:
    before = store.commits
    results = await asyncio.gather(*(store.enqueue([(ev(f"e{i}"), ["k"])]) for i in range(300)))
    assert all(r.accepted == 1 for r in results)
    assert store.commits - before < 300 / 5  # group commit: many callers per transaction
    assert await store.event_count() == 300


async def test_a_failing_op_does_not_take_other_callers_rows(store: Store) -> None:
    async def bad(conn: object) -> None:
        raise ValueError("boom")

    failing = asyncio.ensure_future(store._submit(bad))
    ok = asyncio.ensure_future(store.enqueue([(ev("survivor"), ["k"])]))
    with pytest.raises(ValueError, match="boom"):
        await failing
    assert (await ok).accepted == 1
    assert await store.event_count() == 1


async def test_per_entity_order(store: Store) -> None:
    await store.enqueue([(ev("1", "A"), ["k"]), (ev("2", "A"), ["k"]), (ev("3", "B"), ["k"]), (ev("4"), ["k"])])
    first = await store.lease(10, 60)
    assert [x.event.id for x in first] == ["1", "3", "4"]  # "2" waits behind "1" (same entity)
    await store.complete([Outcome(x, "done") for x in first if x.event.id != "1"])
    assert await store.lease(10, 60) == []
    await store.complete([Outcome(x, "done") for x in first if x.event.id == "1"])
    assert [x.event.id for x in await store.lease(10, 60)] == ["2"]


async def test_order_is_per_sink(store: Store) -> None:
    await store.enqueue([(ev("1", "A"), ["k1", "k2"]), (ev("2", "A"), ["k1", "k2"])])
    leased = await store.lease(10, 60)
    assert sorted((x.sink, x.event.id) for x in leased) == [("k1", "1"), ("k2", "1")]
    await store.complete([Outcome(x, "done") for x in leased if x.sink == "k2"])
    assert [(x.sink, x.event.id) for x in await store.lease(10, 60)] == [("k2", "2")]


async def test_retry_waits_and_holds_its_entity_line(store: Store, clock: Clock) -> None:
    await store.enqueue([(ev("1", "A"), ["k"]), (ev("2", "A"), ["k"])])
    [d] = await store.lease(10, 60)
    await store.complete([Outcome(d, "retry", error="down", next_attempt_at=clock.now + 30)])
    assert await store.lease(10, 60) == []  # "1" not due yet, and "2" must not overtake it
    assert await store.next_due() == clock.now + 30  # "2" is due but blocked: not what we wait for
    assert await store.next_due(exclude=["k"]) is None
    # A breaker's probe may take the head that falls due soonest before it is due.
    [probe] = await store.lease(10, 60, due_only=False)
    assert probe.event.id == "1"
    await store.release_owned()
    clock.now += 30
    [again] = await store.lease(10, 60)
    assert (again.event.id, again.attempts) == ("1", 1)


async def test_deferred_retry_does_not_count_an_attempt(store: Store, clock: Clock) -> None:
    await store.enqueue([(ev("1"), ["k"])])
    [d] = await store.lease(1, 60)
    await store.complete([Outcome(d, "retry", error="breaker", next_attempt_at=clock.now, count_attempt=False)])
    [d] = await store.lease(1, 60)
    assert d.attempts == 0


async def test_expired_lease_is_reclaimed(store: Store, clock: Clock) -> None:
    await store.enqueue([(ev("1"), ["k"])])
    assert len(await store.lease(1, 60)) == 1
    clock.now += 59
    assert await store.reclaim_expired() == 0
    clock.now += 2
    assert await store.reclaim_expired() == 1
    assert len(await store.lease(1, 60)) == 1


async def test_leases_of_a_dead_process_are_released_on_start(tmp_path: Path, clock: Clock) -> None:
    s = Store(tmp_path / "q.db", clock=clock)
    await s.open()
    await s.enqueue([(ev("1"), ["k"])])
    assert len(await s.lease(1, 3600)) == 1
    await s.close()  # as after kill -9: the lease is still recorded
    s2 = Store(tmp_path / "q.db", clock=clock)
    await s2.open()
    try:
        assert len(await s2.lease(1, 60)) == 1
    finally:
        await s2.close()


async def test_clean_shutdown_releases_own_leases(store: Store) -> None:
    await store.enqueue([(ev("1"), ["k"]), (ev("2"), ["k"])])
    assert len(await store.lease(10, 3600)) == 2
    assert await store.release_owned() == 2
    assert len(await store.lease(10, 60)) == 2


async def test_only_one_daemon_per_store(tmp_path: Path) -> None:
    a = Store(tmp_path / "q.db")
    await a.open()
    try:
        with pytest.raises(StoreUnavailable, match="already running"):
            await Store(tmp_path / "q.db").open()
        client = Store(tmp_path / "q.db", role="client")  # the CLI may work beside it
        await client.open()
        await client.close()
    finally:
        await a.close()


async def test_dead_letter_replay_purge_with_audit(store: Store) -> None:
    await store.enqueue([(ev("1"), ["k"]), (ev("2"), ["k"])])
    one, two = await store.lease(10, 60)
    await store.complete([Outcome(one, "dead", error="PermanentError: 400"), Outcome(two, "dead", error="x")])
    dead = await store.dead_letters()
    assert [(d.event_id, d.sink, d.attempts, d.last_error) for d in dead] == [
        ("1", "k", 1, "PermanentError: 400"),
        ("2", "k", 1, "x"),
    ]
    assert (await store.replay([one.id])).replayed == 1
    [again] = await store.lease(10, 60)
    assert (again.id, again.attempts) == (one.id, 0)
    detail = await store.delivery(one.id)
    assert detail is not None
    assert [a.action for a in detail.audit] == ["dead", "replayed"]
    assert await store.purge(sink="k") == 1
    assert await store.dead_letters() == []
    assert (await store.replay()).replayed == 0


async def test_prune_keeps_undelivered_and_dead(store: Store, clock: Clock) -> None:
    await store.enqueue([(ev("done"), ["k"]), (ev("dead"), ["k"]), (ev("waiting"), ["k"])])
    leased = {x.event.id: x for x in await store.lease(10, 60)}
    await store.complete([Outcome(leased["done"], "done"), Outcome(leased["dead"], "dead", error="e")])
    await store.release_owned()
    clock.now += 100
    assert await store.prune(older_than=clock.now - 200) == 0  # not old enough
    assert await store.prune(older_than=clock.now) == 1
    assert await store.event_count() == 2
    assert len(await store.dead_letters()) == 1
    # After pruning, the id is accepted again: retention is the dedup window.
    assert (await store.enqueue([(ev("done"), ["k"])])).accepted == 1


async def test_rejections_are_bounded(store: Store) -> None:
    for i in range(250):
        store.record_rejection("s", 401, f"bad {i}", "127.0.0.1", {"a": "b"}, keep=50)
    await store.ping()  # everything queued before it is committed
    rows = await store.rejections(limit=1000)
    assert rows[0].reason == "bad 249"
    assert 50 <= len(rows) <= 150


async def test_state_roundtrip(store: Store) -> None:
    assert await store.state_get("source:x", "token") is None
    await store.state_set("source:x", "token", {"refresh": "r1"})
    await store.state_set("source:x", "token", {"refresh": "r2"})
    assert await store.state_get("source:x", "token") == {"refresh": "r2"}
    assert await store.state_get("source:y", "token") is None


async def test_full_store_refuses_whole_batches_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    s = Store(path, max_size_mb=1)
    await s.open()
    accepted, refused = 0, None
    for i in range(1000):
        try:
            r = await s.enqueue([(ev(f"big{i}-{j}", size=2000), ["k"]) for j in range(10)])
        except StoreUnavailable as e:
            refused = e
            break
        accepted += r.accepted
    assert refused is not None
    assert "full" in str(refused)
    assert await s.event_count() == accepted  # the refused batch left nothing behind
    await s.close()
    s = Store(path, max_size_mb=64)
    await s.open()
    try:
        assert (await s.enqueue([(ev("after"), ["k"])])).accepted == 1
        assert await s.event_count() == accepted + 1
    finally:
        await s.close()


async def test_schema_version_and_refusal_of_newer(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    s = Store(path)
    await s.open()
    await s.close()
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        c.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreUnavailable, match="newer than this integrand"):
        await Store(path).open()


async def test_replay_leaves_superseded_versions_dead_when_asked(store: Store) -> None:
    def v(i: str, version: str | None) -> Event:
        return Event(id=i, source="s", type="t", data={"v": version}, entity="E", entity_id="A", version=version)

    await store.enqueue([(v("v1", "1"), ["k"])])
    [d1] = await store.lease(1, 60)
    await store.complete([Outcome(d1, "dead", error="HTTP 400")])
    await store.enqueue([(v("v2", "2"), ["k"]), (Event(id="x", source="s", type="t", data={}), ["k"])])
    leased = await store.lease(10, 60)
    await store.complete([Outcome(x, "dead", error="e") if x.event.id == "x" else Outcome(x, "done") for x in leased])
    result = await store.replay(include_superseded=False)
    assert result.superseded == [d1.id]  # v2 is newer: replaying v1 would put old data over new
    assert result.replayed == 1  # "x" has no version: never judged superseded
    assert [d.event_id for d in await store.dead_letters()] == ["v1"]
    assert (await store.replay([d1.id])).replayed == 1  # explicitly included: it goes


def _wal_frames(db: Path) -> int:
    """Frames in the WAL that a checkpoint has not copied yet (read from a connection of our own)."""
    with contextlib.closing(sqlite3.connect(db)) as c:
        _busy, log_frames, copied = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(log_frames) - int(copied)


async def test_checkpoints_run_beside_the_writer_and_bound_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import integrand.store.engine as store_mod

    monkeypatch.setattr(store_mod, "CHECKPOINT_EVERY", 0.0)
    monkeypatch.setattr(store_mod, "WAL_MAX_FRAMES", 200)
    s = Store(tmp_path / "q.db")
    await s.open()
    try:
        raw = s._conn.raw if s._conn else None
        assert raw is not None
        # No checkpoint inside COMMIT: that would stall every webhook waiting on the commit.
        assert raw.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        wal = tmp_path / "q.db-wal"
        sizes = []
        for round_ in range(40):  # a steady flood: each round is one group commit of 50 x 2 KB
            await asyncio.gather(*(s.enqueue([(ev(f"r{round_}-{i}", size=2000), ["k"])]) for i in range(50)))
            sizes.append(wal.stat().st_size)
        assert s._ckpt_thread is not None  # background checkpoints ran
        # 4,000 KB went in; with checkpoints held back only by WAL_MAX_FRAMES the WAL file stays far smaller.
        assert max(sizes) < 4 * 1024 * 1024
        assert await s.event_count() == 2000
        # The flood outran the background checkpoints: the writer ran some itself, and counted them.
        assert s.inline_checkpoints >= 1
        assert s.inline_checkpoint_seconds > 0
    finally:
        await s.close()
    assert _wal_frames(tmp_path / "q.db") == 0


async def test_a_write_lock_held_elsewhere_is_waited_for_off_the_loop(tmp_path: Path) -> None:
    s = Store(tmp_path / "q.db", busy_timeout=10.0)
    await s.open()
    other = sqlite3.connect(tmp_path / "q.db", isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # a CLI command writing beside the daemon
        pending = asyncio.ensure_future(s.enqueue([(ev("waits"), ["k"])]))
        ticks = 0
        while ticks < 20:  # the loop keeps running while the writer waits for the lock
            await asyncio.sleep(0)
            ticks += 1
        assert not pending.done()
        other.execute("COMMIT")
        assert (await asyncio.wait_for(pending, 10)).accepted == 1
    finally:
        other.close()
        await s.close()


async def test_migration_3_keeps_entity_lines_across_the_upgrade(tmp_path: Path, clock: Clock) -> None:
    """A store written by schema 2 (order kept by `state`) opens under 3 (order kept by `active`) with
    the same lines: an open delivery still holds back the next one of its entity, a dead one does not."""
    path = tmp_path / "q.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as c:
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("BEGIN")
        for script in MIGRATIONS[:2]:
            for stmt in (x.strip() for x in script.split(";")):
                if stmt:
                    c.execute(stmt)
        c.execute("PRAGMA user_version = 2")
        for n, (entity, state) in enumerate(
            [("A", "dead"), ("A", "ready"), ("B", "leased"), ("B", "ready"), ("C", "done"), ("C", "ready")], 1
        ):
            body = ev(str(n), entity).to_json()
            c.execute(
                "INSERT INTO events (id, source, event_id, type, entity_key, received_at, body) "
                "VALUES (?, 's', ?, 't', ?, 0, ?)",
                (n, str(n), f"s/E:{entity}", body),
            )
            c.execute(
                "INSERT INTO deliveries (event, sink, entity_key, state, created_at, next_attempt_at, updated_at, "
                "lease_until, lease_owner) VALUES (?, 'k', ?, ?, 0, 0, 0, ?, ?)",
                (n, f"s/E:{entity}", state, 1e12 if state == "leased" else None, "gone" if state == "leased" else None),
            )
        c.execute("COMMIT")
    s = Store(path, clock=clock)
    await s.open()  # migrates, and releases the lease of the run that is gone
    try:
        with contextlib.closing(sqlite3.connect(path)) as c:
            assert c.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
            active = dict(c.execute("SELECT event, active FROM deliveries"))
        assert active == {1: None, 2: 1, 3: 1, 4: 1, 5: None, 6: 1}
        # A's dead head and C's done head no longer hold their lines; B's released head still does.
        assert sorted(x.event.id for x in await s.lease(10, 60)) == ["2", "3", "6"]
    finally:
        await s.close()
