"""Singleton ownership by lease (integrand.ownership) on the real PostgreSQL: tokens, the fence, takeover.

The pure policy (shares of the singletons and of a provider's budget) is checked by property; the
leases and fences on a schema of the test's own in the session's database (tests/pgdb.py), each
"node" a ``PgStore`` of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from integrand.errors import LeaseLost
from integrand.events import Event
from integrand.httpclient import HttpPool
from integrand.ownership import ClusterOwner, budget_share, fair_share, split_limits
from integrand.store.fence import CURRENT, Fence
from integrand.store.postgres import PgStore

from .pgdb import fresh_schema

TTL = 2.0


@given(st.integers(0, 10_000), st.integers(1, 50))
def test_the_nodes_shares_of_a_budget_add_up_to_it(n: int, nodes: int) -> None:
    parts = [budget_share(n, nodes, rank) for rank in range(nodes)]
    assert sum(parts) == n
    assert max(parts) - min(parts) <= 1


@given(st.lists(st.tuples(st.integers(1, 1000), st.floats(0.1, 3600)), max_size=4), st.integers(1, 20))
def test_every_window_of_a_budget_is_split(limits: list[tuple[int, float]], nodes: int) -> None:
    per_node = [split_limits(limits, nodes, rank) for rank in range(nodes)]
    for i, (n, w) in enumerate(limits):
        assert sum(p[i][0] for p in per_node) == n
        assert all(p[i][1] == w for p in per_node)


@given(st.integers(0, 500), st.integers(1, 50))
def test_fair_shares_cover_every_singleton(singletons: int, nodes: int) -> None:
    share = fair_share(singletons, nodes)
    assert share * nodes >= singletons
    assert (share - 1) * nodes < singletons or share == 0


def test_an_http_pool_keeps_its_share_of_each_declared_budget() -> None:
    pool = HttpPool()
    lim = pool.limit("acct", limits=[(100, 10.0), (5, 1.0)])
    assert lim.limits == [(100, 10.0), (5, 1.0)]
    pool.set_share(3, 0)
    assert lim.limits == [(34, 10.0), (2, 1.0)]
    later = pool.limit("other", 7, 1.0)  # declared after the split: cut at once
    assert later.limits == [(3, 1.0)]
    pool.set_share(1, 0)
    assert lim.limits == [(100, 10.0), (5, 1.0)] and later.limits == [(7, 1.0)]


@pytest.fixture
async def stores(pg_database: str) -> AsyncIterator[Callable[[int], Coroutine[Any, Any, list[PgStore]]]]:
    schema = await fresh_schema(pg_database)
    opened: list[PgStore] = []

    async def make(n: int) -> list[PgStore]:
        new = [PgStore(pg_database, server_settings={"search_path": schema}) for _ in range(n)]
        await asyncio.gather(*(s.open() for s in new))
        opened.extend(new)
        return new

    yield make
    for s in opened:
        await s.close()


def ev(i: str) -> Event:
    return Event(id=i, source="crm", type="t", data={"i": i}, entity="E", entity_id=i)


async def test_a_lease_is_held_by_one_node_and_its_token_only_grows(stores: Any) -> None:
    a, b = await stores(2)
    t1 = await a.acquire_lease("source:crm", "A", TTL)
    assert t1 == 1
    assert await b.acquire_lease("source:crm", "B", TTL) is None  # held
    assert await b.renew_leases({"source:crm": 1}, TTL) == {"source:crm"}  # by token: whoever has it
    assert await a.release_lease("source:crm", 1)
    t2 = await b.acquire_lease("source:crm", "B", TTL)
    assert t2 == 2
    assert await a.renew_leases({"source:crm": 1}, TTL) == set()  # the old token renews nothing
    assert not await a.release_lease("source:crm", 1)
    (row,) = await a.leases()
    assert (row.owner, row.token) == ("B", 2) and 0 < row.expires_in <= TTL


async def test_leases_lapse_by_the_databases_clock_not_the_nodes(pg_database: str) -> None:
    """A node whose clock is an hour ahead neither takes a lease early nor sees its own last longer."""
    schema = await fresh_schema(pg_database)
    ahead = PgStore(pg_database, clock=lambda: time.time() + 3600, server_settings={"search_path": schema})
    behind = PgStore(pg_database, clock=lambda: time.time() - 3600, server_settings={"search_path": schema})
    await asyncio.gather(ahead.open(), behind.open())
    try:
        assert await behind.acquire_lease("x", "behind", TTL) == 1
        assert await ahead.acquire_lease("x", "ahead", TTL) is None
        deadline = time.monotonic() + 10
        while (token := await ahead.acquire_lease("x", "ahead", TTL)) is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert token == 2
        assert await behind.renew_leases({"x": 1}, TTL) == set()
    finally:
        await asyncio.gather(ahead.close(), behind.close())


async def test_a_stale_token_cannot_commit_a_cursor_position_or_state(
    stores: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await stores(2)
    old = Fence("source:crm", await a.acquire_lease("source:crm", "A", TTL) or 0, valid_until=time.monotonic() + 60)
    refused: list[str] = []
    old.on_refused = lambda f, why: refused.append(why)
    CURRENT.set(old)
    await a.enqueue_with_cursor([(ev("e1"), ["out"])], "crm", {"since": 1})  # held: committed
    assert await a.cursor_get("crm") == {"since": 1}
    CURRENT.set(None)
    await a.release_lease("source:crm", old.token)
    new = Fence("source:crm", await b.acquire_lease("source:crm", "B", TTL) or 0, valid_until=time.monotonic() + 60)
    CURRENT.set(new)
    await b.enqueue_with_cursor([(ev("e2"), ["out"])], "crm", {"since": 2})
    CURRENT.set(old)
    with caplog.at_level(logging.WARNING, "integrand.store"):
        with pytest.raises(LeaseLost, match=r"token 1 is stale \(node B holds it with token 2\)"):
            await a.enqueue_with_cursor([(ev("e3"), ["out"])], "crm", {"since": 1.5}, kind="poll")
        with pytest.raises(LeaseLost):
            await a.cursor_set("crm", {"since": 0}, kind="stream")
        with pytest.raises(LeaseLost):
            await a.state_set("poll", "crm", {"learnt": "stale"})
    CURRENT.set(None)
    assert await b.cursor_get("crm") == {"since": 2}  # never moved back
    assert await b.cursor_get("crm", "stream") is None
    assert await b.state_get("poll", "crm") is None
    assert await b.event_count() == 2  # e3 was not stored either
    assert len(refused) == 1  # the owner hears of it once
    assert "commit refused by the fencing token" in caplog.text


async def test_one_stale_commit_in_a_group_commit_fails_alone(stores: Any) -> None:
    (a,) = await stores(1)
    await a.acquire_lease("source:crm", "A", TTL)
    stale = Fence("source:crm", 99, valid_until=time.monotonic() + 60)

    async def fenced() -> Any:
        CURRENT.set(stale)
        return await a.enqueue_with_cursor([(ev("bad"), ["out"])], "crm", {"since": 9})

    webhooks = [a.enqueue([(Event(id=f"w{i}", source="hook", type="t", data={}), ["out"])]) for i in range(20)]
    results = await asyncio.gather(asyncio.create_task(fenced()), *webhooks, return_exceptions=True)
    assert isinstance(results[0], LeaseLost)
    assert all(not isinstance(r, BaseException) for r in results[1:])
    assert await a.event_count() == 20 and await a.cursor_get("crm") is None


async def test_a_node_past_its_local_lease_does_not_start_a_poll(stores: Any) -> None:
    (a,) = await stores(1)
    token = await a.acquire_lease("source:crm", "A", TTL)
    assert token is not None
    f = Fence("source:crm", token, valid_until=time.monotonic() - 0.1)  # e.g. it was SIGSTOPped meanwhile
    CURRENT.set(f)
    try:
        with pytest.raises(LeaseLost, match="lapsed before this node could renew it"):
            await a.cursor_get("crm")
    finally:
        CURRENT.set(None)
    assert f.lost


class Node:
    """A ClusterOwner with the daemon's spawn/tasks bookkeeping, whose singletons are a loop recording who runs."""

    def __init__(
        self, store: PgStore, node_id: str, wanted: list[str], running: dict[str, list[str]], ttl: float = TTL
    ):
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.running = running
        self.owner = ClusterOwner(
            store,
            node_id,
            ttl=ttl,
            spawn=self.spawn,
            tasks=self.tasks,
            start=self.start,
            wanted=lambda: wanted,
        )
        self.loop: asyncio.Task[None] | None = None

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        t = asyncio.create_task(coro, name=name)
        self.tasks[name] = t
        return t

    def start(self, singleton: str) -> None:
        self.owner.spawn_singleton(f"run:{singleton}", singleton, self.work(singleton))

    async def work(self, singleton: str) -> None:
        holders = self.running.setdefault(singleton, [])
        holders.append(self.owner.node_id)
        try:
            await asyncio.Event().wait()
        finally:
            holders.remove(self.owner.node_id)

    def go(self) -> None:
        self.loop = asyncio.create_task(self.owner.run())

    async def crash(self) -> None:
        """Stop renewing without handing anything back (what kill -9 leaves behind)."""
        assert self.loop is not None
        self.loop.cancel()
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(self.loop, *self.tasks.values(), return_exceptions=True)


async def test_singletons_spread_run_once_each_and_move_when_a_node_dies(stores: Any, pg_database: str) -> None:
    a, b, c = await stores(3)
    wanted = [f"source:s{i}" for i in range(6)]
    running: dict[str, list[str]] = {}
    nodes = [Node(s, f"n{i}", wanted, running) for i, s in enumerate((a, b, c))]
    for n in nodes:
        n.go()

    async def settled(expect: int, each: int) -> None:
        deadline = time.monotonic() + 6 * TTL
        while True:
            alive = [n for n in nodes if n.loop is not None and not n.loop.done()]
            per = [len(n.owner.held) for n in alive]
            if all(len(running.get(w, [])) == 1 for w in wanted) and len(alive) == expect and max(per) <= each:
                return
            assert time.monotonic() < deadline, f"not settled: {running} {per}"
            await asyncio.sleep(0.05)

    try:
        await settled(3, 2)
        victim = nodes[0]
        lost = sorted(victim.owner.held)
        died = time.monotonic()
        await victim.crash()
        await settled(2, 3)
        took = time.monotonic() - died
        assert took < TTL + 1.0, f"takeover took {took:.2f} s"
        conn = await asyncpg.connect(pg_database, server_settings={"search_path": a.server_settings["search_path"]})
        try:
            tokens = {r[0]: r[1] for r in await conn.fetch("SELECT name, token FROM leases")}
        finally:
            await conn.close()
        assert all(tokens[name] >= 2 for name in lost)  # taken over: a new token
        assert all(len(h) == 1 for h in running.values())
        survivor = nodes[1].owner
        held = {s.labels["lease"] for m in survivor.m.held.collect() for s in m.samples if s.value == 1}
        assert held == set(survivor.held) and held
        assert survivor.m.nodes.labels(survivor.node_id)._value.get() == 2
    finally:
        for n in nodes[1:]:
            await n.crash()


async def test_a_clean_stop_hands_its_singletons_over_at_once(stores: Any) -> None:
    """A node stopping hands its leases back and NOTIFYs: the other takes them without waiting for a round."""
    a, b = await stores(2)
    wanted = ["source:s0", "source:s1"]
    running: dict[str, list[str]] = {}
    first, second = Node(a, "n0", wanted, running, ttl=9.0), Node(b, "n1", wanted, running, ttl=9.0)
    first.go()
    deadline = time.monotonic() + 20
    while len(first.owner.held) < 2:  # alone: it runs both
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    second.go()
    try:
        while len(second.owner.held) < 1:  # a second node: one each (the first hands one back)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert first.owner.m.changes.labels("n0", "source:s1", "released")._value.get() == 1
        await asyncio.sleep(0.5)
        stopping = time.monotonic()
        assert first.loop is not None
        first.loop.cancel()
        await asyncio.gather(first.loop, return_exceptions=True)
        await first.owner.close()
        while len(second.owner.held) < 2:
            assert time.monotonic() - stopping < 2.0, "the handover waited for a round (3 s at this TTL)"
            await asyncio.sleep(0.02)
        assert all(h == ["n1"] for h in running.values())
    finally:
        await first.crash()
        await second.crash()


async def test_a_singleton_stopped_while_its_renewal_is_in_flight_does_not_break_the_round(
    stores: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a fenced commit refused (or a lease dropped as lapsed) during ``renew_leases``'s await popped
    the holding; the round then indexed ``held[name]``, raised KeyError and the node exited with status 1."""
    (a,) = await stores(1)
    running: dict[str, list[str]] = {}
    node = Node(a, "n0", ["source:s0"], running)
    owner = node.owner
    await owner.tick()
    assert owner.holds("source:s0")
    real = a.renew_leases

    async def renew_racing_a_refusal(held: dict[str, int], ttl: float) -> set[str]:
        owner._refused(owner.held["source:s0"].fence, "refused meanwhile")  # what a fenced commit does
        renewed: set[str] = await real(held, ttl)  # the database still renews it: the token is current
        return renewed

    monkeypatch.setattr(a, "renew_leases", renew_racing_a_refusal)
    try:
        await owner.tick()
    finally:
        monkeypatch.undo()
        for t in node.tasks.values():
            t.cancel()
        await asyncio.gather(*node.tasks.values(), return_exceptions=True)
    assert not owner.holds("source:s0")  # stopped, and the round went on to take it again or leave it
