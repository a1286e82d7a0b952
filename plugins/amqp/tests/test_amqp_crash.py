"""kill -9 of the consuming integrand, and connections cut by the broker during publish and consume."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
from amqp_support import (
    channel,
    consuming,
    cut_connections,
    name,
    vhost_session,  # noqa: F401 - the `vhost` fixture
)

from integrand.testing import DaemonProcess, daemon_config, running_daemon, standard_webhook_headers, wait_for

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(ln) for ln in path.read_bytes().splitlines() if ln.strip()]


def stored(db: Path, source: str) -> list[str]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT event_id FROM events WHERE source = ? ORDER BY id", (source,))]


def first_copies(lines: list[dict[str, Any]]) -> dict[str, list[int]]:
    seen: set[str] = set()
    by_entity: dict[str, list[int]] = {}
    for ln in lines:
        if ln["id"] not in seen:
            seen.add(ln["id"])
            by_entity.setdefault(ln["entity_id"], []).append(int(ln["version"]))
    return by_entity


async def test_kill9_of_the_consuming_integrand_loses_nothing_and_stores_once(tmp_path: Path, vhost: str) -> None:
    n = 3000
    q = name("work")
    db = tmp_path / "var" / "integrand.db"
    out = tmp_path / "var" / "out.jsonl"
    async with channel(vhost) as ch:
        await ch.declare_queue(q, durable=True, arguments={"x-queue-type": "quorum"})

        def msg(i: int) -> aio_pika.Message:
            return aio_pika.Message(
                orjson.dumps({"n": i}),
                message_id=f"m{i}",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={"integrand-entity": "item", "integrand-entity-id": f"k{i % 97}", "integrand-version": str(i)},
            )

        for lo in range(0, n, 250):  # persistent, each confirmed by the broker (250 in flight on one channel)
            await asyncio.gather(*(ch.default_exchange.publish(msg(i), q) for i in range(lo, lo + 250)))
    cfg = daemon_config(
        tmp_path,
        f"""
[sources.bus]
connector = "amqp"
vhost = "{vhost}"
queue = "{q}"
batch = 100
prefetch = 200

[sources.bus.streaming]
backoff_base = "50ms"
backoff_cap = "500ms"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "bus"
to = ["out"]
""",
    )
    d = DaemonProcess(cfg, tmp_path / "daemon.log")
    await d.start()
    try:
        await wait_for(lambda: len(stored(db, "bus")) >= n // 3, timeout=60)
        await d.kill()
        mid = len(stored(db, "bus"))
        assert n // 3 <= mid < n, "the kill came too late to be mid-stream"
        await d.start()
        await wait_for(lambda: len(stored(db, "bus")) == n, timeout=90)
        await wait_for(lambda: len({ln["id"] for ln in read_jsonl(out)}) == n, timeout=90)
    finally:
        assert await d.stop() == 0
    assert stored(db, "bus") == [f"m{i}" for i in range(n)]  # once each, in queue order
    assert all(v == sorted(v) for v in first_copies(read_jsonl(out)).values())
    async with channel(vhost) as ch:
        left = await ch.declare_queue(q, passive=True)
        assert left.declaration_result.message_count == 0  # all acknowledged after the restart


async def test_cut_connections_during_publish_and_consume_lose_nothing(tmp_path: Path, vhost: str) -> None:
    """integrand -> RabbitMQ -> integrand while the broker closes every connection of the vhost, twice:
    each acknowledged webhook arrives; a publish is done only with its confirm (so none is missing from
    the queue), and what a lost confirm made integrand publish twice is absorbed by message_id."""
    ex, q = name("bus"), name("in")
    out = tmp_path / "var" / "out.jsonl"
    cfg = daemon_config(
        tmp_path,
        f"""
[sources.shop]
connector = "webhook"
signature = "standard-webhooks"
secret = "{WHSEC}"
entity_field = "entity"
entity_id_field = "id"
version_field = "version"

[sinks.bus]
connector = "amqp"
vhost = "{vhost}"
exchange = "{ex}"
declare_exchange = true
publish_timeout = "3s"

[[routes]]
from = "shop"
to = ["bus"]

[sources.bus_in]
connector = "amqp"
vhost = "{vhost}"
exchange = "{ex}"
declare_exchange = true
queue = "{q}"
declare_queue = {{ type = "quorum", bind = ["shop.#"] }}
batch = 20

[sources.bus_in.streaming]
backoff_base = "50ms"
backoff_cap = "300ms"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "bus_in"
to = ["out"]

[dispatcher.breaker]
open_for = "200ms"
max_open_for = "1s"
""",
    )
    async with running_daemon(cfg) as d, aiohttp.ClientSession() as s:
        await wait_for(lambda: consuming(vhost, q), timeout=20)
        hook = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/shop"
        sent: list[str] = []

        async def send(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                body = orjson.dumps({"entity": "order", "id": f"o{i % 9}", "version": i, "n": i})
                async with s.post(hook, data=body, headers=standard_webhook_headers(body, f"w{i}", WHSEC)) as r:
                    assert r.status == 200
                sent.append(f"shop:w{i}")

        sender = asyncio.create_task(send(0, 400))
        for cut_at in (60, 200):

            def reached(cut_at: int = cut_at) -> bool:
                return len(read_jsonl(out)) >= cut_at

            await wait_for(reached, timeout=60)
            await asyncio.to_thread(cut_connections, vhost)
        await sender
        await wait_for(lambda: len({ln["id"] for ln in read_jsonl(out)}) == 400, timeout=90)
        reconnects = d.metrics.registry.get_sample_value("integrand_stream_reconnects_total", {"source": "bus_in"})
    assert {ln["id"] for ln in read_jsonl(out)} == set(sent)
    assert all(v == sorted(v) for v in first_copies(read_jsonl(out)).values())
    ids = stored(tmp_path / "var" / "integrand.db", "bus_in")
    assert sorted(ids) == sorted(sent)  # each stored once
    assert reconnects is not None and reconnects >= 2  # the consumer really lost its connection, twice
