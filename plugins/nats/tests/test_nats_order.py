"""Per-subject order across a restart or a reload: what a previous session left unacknowledged comes first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

import orjson
from integrand_nats import NatsConnector
from nats_support import temp_stream

from integrand.connector import StreamBatch
from integrand.store import Store
from integrand.testing import running_connector


async def _publish(js: Any, stream: str, lo: int, hi: int) -> None:
    for i in range(lo, hi):
        headers = {"Nats-Msg-Id": f"m{i}", "Integrand-Entity-Id": "k", "Integrand-Version": str(i)}
        await js.publish(f"{stream}.item", orjson.dumps({"n": i}), headers=headers)


async def test_messages_a_previous_session_held_unacked_are_not_overtaken(
    tmp_path: Path, integrand_store: Store
) -> None:
    """A session that fetched a partial batch and died (kill -9 and a quick restart, or a reload that restarts
    the source) leaves those messages pending until ack_wait; the consumer's max_ack_pending (one batch) then
    still has room, so without care the next session is handed *newer* messages first — and the store's
    stale-version guard drops the older ones when they are redelivered (found by the crash loop's reloads:
    PubAck'ed messages never stored)."""
    async with temp_stream() as (_nc, js, stream):
        await _publish(js, stream, 0, 4)
        table = {"stream": stream, "durable": "integrand", "batch": 10, "ack_wait": "1s", "fetch_wait": "200ms"}
        async with running_connector(NatsConnector, table, integrand_store, base_dir=tmp_path, role="source") as src:
            assert isinstance(src, NatsConnector)
            first = cast(AsyncGenerator[StreamBatch, None], src.stream(None))
            held = await asyncio.wait_for(first.__anext__(), 15)
            assert [e.id for e in held.events] == ["m0", "m1", "m2", "m3"]
            await first.aclose()  # the session ends without acking: its connection closes
        await _publish(js, stream, 4, 20)
        async with running_connector(
            NatsConnector, table, integrand_store, base_dir=tmp_path, role="source", name="again"
        ) as src2:
            assert isinstance(src2, NatsConnector)
            it = cast(AsyncGenerator[StreamBatch, None], src2.stream(held.position))
            seen: list[int] = []
            while len(set(seen)) < 20:
                batch = await asyncio.wait_for(it.__anext__(), 15)
                seen += [int(e.version or 0) for e in batch.events]
                await src2.ack(batch)
            await it.aclose()
        assert seen[:4] == [0, 1, 2, 3], f"newer messages overtook the unacked ones: {seen}"
        assert seen == sorted(seen)
