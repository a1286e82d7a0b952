"""What the PostgreSQL backend adds to the store contract: several nodes (handles) on one database.

Each test runs in a schema of its own in the session's database (tests/pgdb.py); a "node" is a
``PgStore`` of its own, with its own pool, writer task, owner id and LISTEN connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from integrand.errors import StoreUnavailable
from integrand.events import Event
from integrand.store import Outcome
from integrand.store.pg_schema import PG_MIGRATIONS
from integrand.store.postgres import PgStore

from .pgdb import fresh_schema


@pytest.fixture
async def schema(pg_database: str) -> str:
    return await fresh_schema(pg_database)


@pytest.fixture
async def nodes(pg_database: str, schema: str) -> AsyncIterator[Callable[[int], asyncio.Future[list[PgStore]]]]:
    opened: list[PgStore] = []

    async def make(n: int) -> list[PgStore]:
        new = [PgStore(pg_database, server_settings={"search_path": schema}) for _ in range(n)]
        await asyncio.gather(*(s.open() for s in new))  # several nodes starting at once migrate once
        opened.extend(new)
        return new

    yield lambda n: asyncio.ensure_future(make(n))
    for s in opened:
        await s.close()


def ev(i: str, entity_id: str | None = None, version: str | None = None) -> Event:
    return Event(id=i, source="s", type="t", data={"i": i}, entity="E", entity_id=entity_id, version=version)


async def test_nodes_starting_at_once_migrate_once(
    nodes: Callable[[int], asyncio.Future[list[PgStore]]], pg_database: str, schema: str
) -> None:
    await nodes(3)
    conn = await asyncpg.connect(pg_database, server_settings={"search_path": schema})
    try:
        versions = [r[0] for r in await conn.fetch("SELECT version FROM integrand_schema ORDER BY version")]
        assert versions == list(range(1, len(PG_MIGRATIONS) + 1))  # each version applied once
    finally:
        await conn.close()


async def test_the_same_webhook_at_two_nodes_is_stored_once(
    nodes: Callable[[int], asyncio.Future[list[PgStore]]],
) -> None:
    a, b = await nodes(2)
    events = [ev(f"e{i}", f"E{i % 5}" if i % 2 else None) for i in range(60)]
    results = await asyncio.gather(*(n.enqueue([(e, ["k"])]) for e in events for n in (a, b)))
    assert sum(r.accepted for r in results) == 60
    assert sum(r.duplicates for r in results) == 60
    assert await a.event_count() == 60
    assert await b.counts() == {("k", "ready"): 60}


async def test_group_commit_batches_concurrent_enqueues(nodes: Callable[[int], asyncio.Future[list[PgStore]]]) -> None:
    [a] = await nodes(1)
    before = a.commits
    await asyncio.gather(*(a.enqueue([(ev(f"g{i}"), ["k"])]) for i in range(200)))
    assert a.committed_ops >= 200
    assert a.commits - before < 200  # many requests, fewer transactions
    assert await a.event_count() == 200


async def test_one_delivery_per_entity_in_flight_across_nodes(
    nodes: Callable[[int], asyncio.Future[list[PgStore]]],
) -> None:
    """Two nodes enqueue changes to a few entities and lease at once: never two of one line in flight,
    and each line is delivered in the order it was stored."""
    a, b = await nodes(2)
    n_entities, per_entity = 4, 12
    order: dict[str, list[int]] = {}
    in_flight: dict[str, str] = {}
    violations: list[str] = []

    async def produce(node: PgStore, half: int) -> None:
        for v in range(half, per_entity, 2):
            await asyncio.gather(*(node.enqueue([(ev(f"x{e}-{v}", f"X{e}", None), ["k"])]) for e in range(n_entities)))

    async def consume(node: PgStore, stop: asyncio.Event) -> None:
        while not stop.is_set():
            leased = await node.lease(3, 30)
            for d in leased:
                key = d.event.entity_key
                if key in in_flight:
                    violations.append(f"{key}: {d.event.id} leased beside {in_flight[key]}")
                in_flight[key] = d.event.id
            await asyncio.sleep(0)  # let the other node lease meanwhile
            for d in leased:
                del in_flight[d.event.entity_key]
                order.setdefault(d.event.entity_key, []).append(d.id)
            await node.complete([Outcome(d, "done") for d in leased])
            if not leased:
                await asyncio.sleep(0.005)

    stop = asyncio.Event()
    consumers = [asyncio.create_task(consume(n, stop)) for n in (a, b)]
    await asyncio.gather(produce(a, 0), produce(b, 1))
    deadline = asyncio.get_running_loop().time() + 30
    while sum(map(len, order.values())) < n_entities * per_entity:
        assert asyncio.get_running_loop().time() < deadline, order
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*consumers)
    assert violations == []
    assert all(ids == sorted(ids) and len(ids) == per_entity for ids in order.values())
    assert await a.counts() == {("k", "done"): n_entities * per_entity}


async def test_a_commit_on_one_node_wakes_the_others(nodes: Callable[[int], asyncio.Future[list[PgStore]]]) -> None:
    a, b = await nodes(2)
    b.deliveries_ready.clear()
    await a.enqueue([(ev("w"), ["k"])])
    await asyncio.wait_for(b.deliveries_ready.wait(), 10)  # LISTEN/NOTIFY, not b's own commit


async def test_a_lease_taken_over_fences_the_first_node(
    nodes: Callable[[int], asyncio.Future[list[PgStore]]],
) -> None:
    """A node that stalled past its lease reports late: its outcome is ignored, the new holder's counts."""
    a, b = await nodes(2)
    await a.enqueue([(ev("f1", "F"), ["k"]), (ev("f2", "F"), ["k"])])
    [first] = await a.lease(1, 0.05)
    await asyncio.sleep(0.1)  # the lease runs out on the store's (real) clock
    assert await b.reclaim_expired() == 1
    [second] = await b.lease(1, 60)
    assert second.id == first.id and second.token != first.token
    await a.complete([Outcome(first, "done")])  # stale: ignored
    assert await b.lease(1, 60) == []  # f2 still waits behind b's lease of f1
    await b.complete([Outcome(second, "done")])
    assert [d.event.id for d in await a.lease(5, 60)] == ["f2"]


async def test_a_node_that_releases_its_leases_leaves_the_others_alone(
    nodes: Callable[[int], asyncio.Future[list[PgStore]]],
) -> None:
    a, b = await nodes(2)
    await a.enqueue([(ev(f"r{i}"), ["k"]) for i in range(4)])
    assert len(await a.lease(2, 60)) == 2 and len(await b.lease(2, 60)) == 2
    assert await a.release_owned() == 2
    assert await a.counts() == {("k", "ready"): 2, ("k", "leased"): 2}


async def test_an_unreachable_database_is_unavailable_and_the_dsn_stays_secret() -> None:
    store = PgStore("postgresql://postgres:hunter2-secret@127.0.0.1:1/nowhere")
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    assert "hunter2" not in str(info.value) and "cannot open the PostgreSQL store" in str(info.value)


async def test_a_lost_connection_makes_enqueues_unavailable(
    nodes: Callable[[int], asyncio.Future[list[PgStore]]], pg_database: str
) -> None:
    """The database dropping the node's connections (a failover, a restart) is a 503, not a crash; the
    pool reconnects and the next enqueue is stored, and the other nodes hear of it again (LISTEN anew)."""
    a, b = await nodes(2)
    await a.enqueue([(ev("before"), ["k"])])
    admin = await asyncpg.connect(pg_database)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    outcomes: list[object] = []
    for i in range(3):
        try:
            outcomes.append(await a.enqueue([(ev(f"after{i}"), ["k"])]))
        except StoreUnavailable as e:
            outcomes.append(e)
    assert all(isinstance(o, StoreUnavailable) or o.accepted == 1 for o in outcomes)  # type: ignore[attr-defined]
    assert not isinstance(outcomes[-1], StoreUnavailable)
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # b's LISTEN connection was dropped too: it listens again, then hears a's commits
        b.deliveries_ready.clear()
        await a.enqueue([(ev(f"late{deadline}-{asyncio.get_running_loop().time()}"), ["k"])])
        try:
            await asyncio.wait_for(b.deliveries_ready.wait(), 0.5)
            break
        except TimeoutError:
            assert asyncio.get_running_loop().time() < deadline, "b never listened again"
