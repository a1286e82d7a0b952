"""The store contract: every guarantee the rest of integrand relies on, run against every backend.

One set of storage tests, parametrised over backends (the way huey tests its storages): SQLite and
PostgreSQL (a database of the session's own, tests/pgdb.py). A backend plugs in by adding one entry to ``BACKENDS``:
a class with ``open(clock)`` (the store under test, opened as a daemon would) and ``peer()`` (a
second handle on the same storage that sees only what is committed). The tests use nothing but the
``StoreBackend`` Protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from integrand.errors import StoreUnavailable
from integrand.events import Event
from integrand.store import Outcome, Store, StoreBackend
from integrand.store.postgres import PgStore

from .pgdb import fresh_schema


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Backend(Protocol):
    async def open(self, clock: Callable[[], float]) -> StoreBackend: ...
    async def peer(self) -> StoreBackend: ...


class SqliteBackend:
    def __init__(self, tmp_path: Path):
        self.path = tmp_path / "contract.db"

    async def open(self, clock: Callable[[], float]) -> StoreBackend:
        store = Store(self.path, clock=clock)
        await store.open()
        return store

    async def peer(self) -> StoreBackend:
        store = Store(self.path, role="reader")
        await store.open()
        return store


class PostgresBackend:
    """A schema of its own per test in the session's PostgreSQL database (tests/pgdb.py)."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path):
        self.dsn: str = request.getfixturevalue("pg_database")
        self.schema: str | None = None

    async def open(self, clock: Callable[[], float]) -> StoreBackend:
        self.schema = await fresh_schema(self.dsn)
        store = PgStore(self.dsn, clock=clock, server_settings={"search_path": self.schema})
        await store.open()
        return store

    async def peer(self) -> StoreBackend:
        assert self.schema is not None
        store = PgStore(self.dsn, role="reader", server_settings={"search_path": self.schema})
        await store.open()
        return store


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "sqlite": lambda _request, tmp_path: SqliteBackend(tmp_path),
    "postgres": PostgresBackend,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return BACKENDS[request.param](request, tmp_path)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(backend: Backend, clock: Clock) -> AsyncIterator[StoreBackend]:
    s = await backend.open(clock)
    yield s
    await s.close()


@pytest.fixture
async def peer(backend: Backend, store: StoreBackend) -> AsyncIterator[StoreBackend]:
    p = await backend.peer()
    yield p
    await p.close()


def ev(i: str, entity_id: str | None = None, version: str | None = None, source: str = "s", **kw: Any) -> Event:
    return Event(id=i, source=source, type="t", data={"i": i}, entity="E", entity_id=entity_id, version=version, **kw)


async def test_the_backend_implements_the_protocol(store: StoreBackend) -> None:
    assert isinstance(store, StoreBackend)


async def test_an_enqueue_returns_only_once_committed(store: StoreBackend, peer: StoreBackend) -> None:
    """What makes a 2xx safe: when enqueue returns, another handle already sees the event and its deliveries."""
    results = await asyncio.gather(*(store.enqueue([(ev(f"e{i}"), ["k1", "k2"])]) for i in range(20)))
    assert [r.accepted for r in results] == [1] * 20
    assert await peer.event_count() == 20
    assert await peer.counts() == {("k1", "ready"): 20, ("k2", "ready"): 20}


async def test_duplicates_are_no_ops(store: StoreBackend) -> None:
    r = await store.enqueue([(ev("a"), ["k"]), (ev("a"), ["k"]), (ev("b"), ["k"])])
    assert (r.accepted, r.duplicates) == (2, 1)
    r = await store.enqueue([(ev("a"), ["k"]), (ev("a", source="other"), ["k"])])
    assert (r.accepted, r.duplicates) == (1, 1)  # the same id from another source is another event
    assert await store.event_count() == 3


async def test_leases_hide_expire_and_are_handed_back(store: StoreBackend, clock: Clock) -> None:
    await store.enqueue([(ev("a"), ["k"]), (ev("b"), ["k"])])
    first = await store.lease(1, 60)
    assert len(first) == 1
    second = await store.lease(10, 60)
    assert [d.event.id for d in second] != [d.event.id for d in first] and len(second) == 1
    assert await store.lease(10, 60) == []
    clock.now += 61
    assert await store.reclaim_expired() == 2
    assert len(await store.lease(10, 60)) == 2
    assert await store.release_owned() == 2
    assert len(await store.lease(10, 60)) == 2


async def test_a_stale_completion_is_ignored(store: StoreBackend, clock: Clock) -> None:
    await store.enqueue([(ev("v1", "A"), ["k"]), (ev("v2", "A"), ["k"])])
    [a] = await store.lease(10, 10)
    clock.now += 11
    await store.reclaim_expired()
    [b] = await store.lease(10, 60)
    await store.complete([Outcome(a, "done")])  # A lost its lease: nothing happens
    assert await store.lease(10, 60) == []  # b still holds v1, so v2 waits
    await store.complete([Outcome(b, "retry", error="x", next_attempt_at=clock.now)])
    [again] = await store.lease(10, 60)
    assert (again.event.id, again.attempts) == ("v1", 1)


async def test_per_entity_order_and_the_stale_guard(store: StoreBackend, clock: Clock) -> None:
    await store.enqueue([(ev("a2", "A", "2"), ["k"]), (ev("b1", "B", "1"), ["k"]), (ev("u"), ["k"])])
    r = await store.enqueue([(ev("a1", "A", "1"), ["k"]), (ev("a3", "A", "3"), ["k"])])
    assert (r.accepted, r.stale) == (1, 1)  # a1 is older than a2: dropped
    first = await store.lease(10, 60)
    assert sorted(d.event.id for d in first) == ["a2", "b1", "u"]  # a3 waits behind a2
    a2 = next(d for d in first if d.event.id == "a2")
    await store.complete([Outcome(a2, "retry", error="down", next_attempt_at=clock.now + 30)])
    assert await store.lease(10, 60) == []  # a3 must not overtake its retrying head
    assert await store.next_due() == clock.now + 30
    clock.now += 30
    [head] = await store.lease(10, 60)
    await store.complete([Outcome(head, "done")])
    assert [d.event.id for d in await store.lease(10, 60)] == ["a3"]


async def test_a_cursor_commits_with_its_events(store: StoreBackend, peer: StoreBackend) -> None:
    r = await store.enqueue_with_cursor([(ev("p1"), ["k"]), (ev("p2"), ["k"])], "s", {"page": 2})
    assert r.accepted == 2
    assert await peer.cursor_get("s") == {"page": 2}
    assert await peer.event_count() == 2
    await store.enqueue_with_cursor([], "s", {"page": 3}, kind="reconcile")
    assert await store.cursor_get("s", "reconcile") == {"page": 3}
    assert await store.cursor_get("s") == {"page": 2}
    await store.cursor_set("s", None)
    assert await store.cursor_get("s") is None
    assert [(c.source, c.kind) for c in await store.cursors()] == [("s", "reconcile")]


async def test_dead_letters_replay_and_purge(store: StoreBackend) -> None:
    await store.enqueue([(ev("old", "A", "1"), ["k"]), (ev("x"), ["k"])])
    rows = await store.lease(10, 60)
    await store.complete([Outcome(d, "dead", error="bad") for d in rows])
    dead = {d.event_id: d for d in await store.dead_letters()}
    assert set(dead) == {"old", "x"} and dead["x"].last_error == "bad"
    await store.enqueue([(ev("new", "A", "2"), ["k"])])
    res = await store.replay(include_superseded=False)
    assert (res.replayed, res.superseded) == (1, [dead["old"].id])  # "old" would overwrite "new"
    detail = await store.delivery(dead["x"].id)
    assert detail is not None and [a.action for a in detail.audit] == ["dead", "replayed"]
    assert await store.purge([dead["old"].id]) == 1
    assert await store.dead_letters() == []


async def test_retention_prunes_only_what_was_delivered(store: StoreBackend, clock: Clock) -> None:
    await store.enqueue([(ev("done"), ["k"]), (ev("dead"), ["k"]), (ev("waiting"), ["k"])])
    leased = {d.event.id: d for d in await store.lease(10, 60)}
    await store.complete([Outcome(leased["done"], "done"), Outcome(leased["dead"], "dead", error="e")])
    await store.release_owned()
    clock.now += 100
    total = 0
    while (n := await store.prune(clock.now)) > 0:
        total += n
    assert total == 1
    assert await store.event_count() == 2
    assert (await store.enqueue([(ev("done"), ["k"])])).accepted == 1  # retention is the dedup window


async def test_retention_prunes_a_sagas_record_with_its_event(store: StoreBackend, clock: Clock) -> None:
    """A saga's record (state scope "saga", key SOURCE:EVENT_ID~NAME) goes when retention has pruned its event:
    a saga that finished and was delivered goes; a dead-lettered one stays (a replay resumes from its record)."""
    await store.enqueue([(ev("done"), ["~saga:x"]), (ev("dead"), ["~saga:x"]), (ev("waiting"), ["~saga:x"])])
    leased = {d.event.id: d for d in await store.lease(10, 60)}
    await store.complete([Outcome(leased["done"], "done"), Outcome(leased["dead"], "dead", error="e")])
    await store.release_owned()
    for i in ("done", "dead", "waiting", "gone:with~colon"):
        await store.state_set("saga", f"s:{i}~x", {"id": i})
    await store.state_set("connector:s", "done~x", {"kept": True})  # another scope: never pruned as a saga
    clock.now += 100
    await store.state_set("saga", "s:recent~x", {"id": "recent"})  # written since the cutoff: kept
    total = 0
    while (n := await store.prune(clock.now - 50)) > 0:
        total += n
    assert total == 1 + 2  # the delivered event, then the two saga records whose events are gone
    assert await store.state_get("saga", "s:done~x") is None
    assert await store.state_get("saga", "s:gone:with~colon~x") is None
    for kept in ("dead", "waiting", "recent"):
        assert await store.state_get("saga", f"s:{kept}~x") == {"id": kept}
    assert await store.state_get("connector:s", "done~x") == {"kept": True}
    assert getattr(store, "pruned", {})["sagas"] == 2


async def test_connector_state(store: StoreBackend, peer: StoreBackend) -> None:
    assert await store.state_get("connector:a", "token") is None
    await store.state_set("connector:a", "token", {"refresh": "r1"})
    await store.state_set("connector:a", "token", {"refresh": "r2"})
    assert await peer.state_get("connector:a", "token") == {"refresh": "r2"}  # committed when set returns
    assert await store.state_get("connector:b", "token") is None


async def test_a_read_only_peer_cannot_write(peer: StoreBackend) -> None:
    with pytest.raises(StoreUnavailable):
        await peer.enqueue([(ev("a"), ["k"])])


async def test_events_since_pages_through_retained_events(store: StoreBackend, clock: Clock) -> None:
    await store.enqueue([(ev("a"), ["k"]), (ev("b", source="o"), ["k"])])
    clock.now += 10
    await store.enqueue([(ev("c"), ["k"])])
    assert [e.id for _, e in await store.events_since(clock.now)] == ["c"]
    [(row, first)] = await store.events_since(0, limit=1)
    assert first.id == "a"
    assert [e.id for _, e in await store.events_since(0, after=row)] == ["b", "c"]
    assert [e.id for _, e in await store.events_since(0, source="o")] == ["b"]


async def test_one_unstorable_event_fails_alone_in_a_group_commit(store: StoreBackend, peer: StoreBackend) -> None:
    """Concurrent enqueues share a commit; the one whose data cannot be serialised fails, the others are stored."""
    from integrand.store import UnstorableEvent

    bad = Event(id="bad", source="s", type="t", data={1: "a non-string key"}, entity="E", entity_id="x", version="1")
    calls = [store.enqueue([(ev(f"g{i}", entity_id=f"g{i}", version="1"), ["k"])]) for i in range(5)]
    calls.insert(2, store.enqueue([(bad, ["k"])]))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[2], UnstorableEvent)
    assert [r.accepted for r in results if not isinstance(r, BaseException)] == [1] * 5
    assert await peer.event_count() == 5


async def test_an_events_story_names_the_webhook_request_it_arrived_in(store: StoreBackend) -> None:
    await store.enqueue([(ev("r1"), ["a"])], request_id="req-one")
    await store.enqueue([(ev("r1"), ["a"])], request_id="req-two")  # the provider's retry
    await store.enqueue([(ev("p1"), ["a"])])  # a polled event comes in no request
    [found] = await store.find_events("s:r1")
    assert found.request_id == "req-one"
    story = await store.event_story(found.row)
    assert story is not None
    received = next(h for h in story.history if h.action == "received")
    assert received.detail == "source=s request_id=req-one"
    again = next(h for h in story.history if h.action == "deduplicated")
    assert again.detail is not None and "req-two" in again.detail
    [polled] = await store.find_events("s:p1")
    assert polled.request_id is None
    listed = {e.event_id: e.request_id for e, _states in await store.list_events()}
    assert listed == {"r1": "req-one", "p1": None}
