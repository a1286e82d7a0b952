"""If the store's writer task dies, every write fails at once (webhooks get 503) instead of hanging;
a flood of refused webhooks is recorded in bounded memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from integrand.app import DaemonFailed
from integrand.errors import StoreUnavailable
from integrand.events import Event
from integrand.store import REJECTIONS_BUFFERED, Store

from .helpers import hook_url, post_signed, running, settings_for


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "q.db")
    await s.open()
    yield s
    await s.close()


def break_writer(store: Store) -> None:
    """A bug in the writer's own code (not in an op, which only fails its caller): it kills the task."""

    def boom() -> None:
        raise RuntimeError("a bug in the writer")

    store._maybe_checkpoint = boom  # type: ignore[method-assign]


async def test_writes_fail_fast_once_the_writer_died(store: Store) -> None:
    break_writer(store)
    # The op whose commit killed the writer, and one queued behind it, fail instead of hanging.
    first = store.enqueue([(Event(id="a", source="s", type="t", data={}), ["k"])])
    second = store.state_set("x", "y", 1)
    results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5)
    assert all(isinstance(r, StoreUnavailable) and "writer stopped" in str(r) for r in results), results
    with pytest.raises(StoreUnavailable, match="writer stopped"):
        await asyncio.wait_for(store.enqueue([(Event(id="b", source="s", type="t", data={}), ["k"])]), 5)
    with pytest.raises(StoreUnavailable, match="writer stopped"):
        await store.ping()


async def test_a_webhook_gets_503_when_the_writer_died(tmp_path: Path) -> None:
    # A dead writer is fatal for the daemon (app.py): it stops and `integrand run` exits 1, so systemd's
    # Restart=on-failure brings a working writer back. Until the port closes, webhooks get 503, never a hang.
    async def scenario() -> None:
        async with running(settings_for(tmp_path)) as d, aiohttp.ClientSession() as s:
            break_writer(d.store)
            status, got = await asyncio.wait_for(post_signed(s, hook_url(d, "demo"), {"n": 1}, "msg_1"), 10)
            assert status in (200, 503), got  # committed before the writer died, or refused
            try:
                status, got = await asyncio.wait_for(post_signed(s, hook_url(d, "demo"), {"n": 2}, "msg_2"), 10)
                assert status == 503, got
            except aiohttp.ClientConnectionError:
                pass  # the port has already closed: the daemon is on its way out
            await asyncio.wait_for(d.stop_event.wait(), 10)
            assert not d.ready

    with pytest.raises(DaemonFailed, match="store-writer failed"):
        await scenario()


async def test_a_flood_of_rejections_stays_in_bounded_memory(store: Store) -> None:
    n = REJECTIONS_BUFFERED * 5
    for i in range(n):  # all before the writer runs once: the worst case
        store.record_rejection("s", 401, f"bad {i}", "127.0.0.1", {"a": "b"}, keep=50)
    assert len(store._rejection_buffer) == REJECTIONS_BUFFERED
    assert len(store._queue._items) <= 1  # one flush op, however many arrived
    assert store.rejections_dropped == n - REJECTIONS_BUFFERED
    await store.ping()
    rows = await store.rejections(limit=1000)
    assert rows[0].reason == f"bad {n - 1}"  # the newest are the ones kept
    assert len(rows) == 50
