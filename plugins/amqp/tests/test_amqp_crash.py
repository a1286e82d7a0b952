"""kill -9 of the consuming integrand, and connections cut by the broker during publish and consume."""

from __future__ import annotations

import asyncio
from pathlib import Path

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

from integrand.testing import (
    DaemonProcess,
    SignedSender,
    TcpProxy,
    assert_arrived_once_in_order,
    daemon_config,
    in_entity_order,
    read_jsonl,
    running_daemon,
    signed_webhook_source,
    stored_event_ids,
    wait_for,
)

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SHOP = signed_webhook_source("shop", WHSEC)


def stored(db: Path, source: str) -> list[str]:
    return stored_event_ids(db, source)


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
    assert in_entity_order(read_jsonl(out))
    async with channel(vhost) as ch:
        left = await ch.declare_queue(q, passive=True)
        assert left.declaration_result.message_count == 0  # all acknowledged after the restart


async def test_round_trip_with_kill9_of_the_consuming_integrand(tmp_path: Path, vhost: str) -> None:
    """integrand -> RabbitMQ -> integrand, two daemons: the consuming one is killed -9 while the publishing one
    goes on publishing. Every webhook the publishing side acknowledged arrives, stored once, in entity order."""
    n = 800
    ex, q = name("bus"), name("in")
    pub, con = tmp_path / "pub", tmp_path / "con"
    pub.mkdir()
    con.mkdir()
    db, out = con / "var" / "integrand.db", con / "var" / "out.jsonl"
    consumer_cfg = daemon_config(
        con,
        f"""
[sources.bus]
connector = "amqp"
vhost = "{vhost}"
exchange = "{ex}"
declare_exchange = true
queue = "{q}"
declare_queue = {{ type = "quorum", bind = ["shop.#"] }}
batch = 100

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
    publisher_cfg = daemon_config(
        pub,
        SHOP
        + f"""

[sinks.bus]
connector = "amqp"
vhost = "{vhost}"
exchange = "{ex}"
declare_exchange = true

[[routes]]
from = "shop"
to = ["bus"]
""",
    )
    consumer = DaemonProcess(consumer_cfg, con / "daemon.log")
    await consumer.start()
    try:
        await wait_for(lambda: consuming(vhost, q), timeout=30)  # the queue is bound before anything is published
        async with running_daemon(publisher_cfg) as p, aiohttp.ClientSession() as s:
            hooks = SignedSender(s, f"http://127.0.0.1:{p.ports['webhooks']}/hooks/shop", WHSEC)
            sender = hooks.lanes(n, 4)  # four at a time; each lane owns its entities, in version order
            await wait_for(lambda: len(stored(db, "bus")) >= n // 3, timeout=90)
            await consumer.kill()
            mid = len(stored(db, "bus"))
            assert mid < n and not sender.done(), "the kill came too late to be mid-stream"
            await consumer.start()
            await sender
            await wait_for(lambda: len(stored(db, "bus")) == n, timeout=120)
            await wait_for(lambda: len({ln["id"] for ln in read_jsonl(out)}) == n, timeout=120)
    finally:
        assert await consumer.stop() == 0
    assert sorted(stored(db, "bus")) == sorted(hooks.sent)  # all of them, each stored once
    assert_arrived_once_in_order(out, hooks.sent)
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
        SHOP
        + f"""

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
        hooks = SignedSender(s, f"http://127.0.0.1:{d.ports['webhooks']}/hooks/shop", WHSEC, entities=9)
        sender = asyncio.create_task(hooks.send(range(400)))
        for cut_at in (60, 200):

            def reached(cut_at: int = cut_at) -> bool:
                return len(read_jsonl(out)) >= cut_at

            await wait_for(reached, timeout=60)
            await asyncio.to_thread(cut_connections, vhost)
        await sender
        await wait_for(lambda: len({ln["id"] for ln in read_jsonl(out)}) == 400, timeout=90)
        reconnects = d.metrics.registry.get_sample_value("integrand_stream_reconnects_total", {"source": "bus_in"})
    assert_arrived_once_in_order(out, hooks.sent)
    assert sorted(stored(tmp_path / "var" / "integrand.db", "bus_in")) == sorted(hooks.sent)  # each stored once
    assert reconnects is not None and reconnects >= 2  # the consumer really lost its connection, twice


async def test_connections_dropped_by_a_proxy_mid_publish_and_mid_consume_lose_nothing(
    tmp_path: Path, vhost: str
) -> None:
    """integrand -> RabbitMQ -> integrand through a TCP proxy that aborts every connection twice (bytes in flight
    are lost: publishes, confirms, deliveries, acks) and refuses connections for a while between. Every
    acknowledged webhook arrives once and in entity order: no publish was taken as done without its confirm."""
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    ex, q = name("bus"), name("in")
    out = tmp_path / "var" / "out.jsonl"
    url = f"amqp://127.0.0.1:{proxy.port}/"
    cfg = daemon_config(
        tmp_path,
        SHOP
        + f"""

[sinks.bus]
connector = "amqp"
url = "{url}"
vhost = "{vhost}"
exchange = "{ex}"
declare_exchange = true
publish_timeout = "2s"
connect_timeout = "2s"

[[routes]]
from = "shop"
to = ["bus"]

[sources.bus_in]
connector = "amqp"
url = "{url}"
vhost = "{vhost}"
exchange = "{ex}"
declare_exchange = true
queue = "{q}"
declare_queue = {{ type = "quorum", bind = ["shop.#"] }}
batch = 20
connect_timeout = "2s"

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
    n = 600
    try:
        async with running_daemon(cfg) as d, aiohttp.ClientSession() as s:
            await wait_for(lambda: consuming(vhost, q), timeout=20)
            hooks = SignedSender(s, f"http://127.0.0.1:{d.ports['webhooks']}/hooks/shop", WHSEC, entities=9)

            def reconnects() -> float:
                v = d.metrics.registry.get_sample_value("integrand_stream_reconnects_total", {"source": "bus_in"})
                return v or 0.0

            def arrived() -> int:
                return len(read_jsonl(out))

            sender = hooks.lanes(n, 3)
            await wait_for(lambda: arrived() >= 80, timeout=60)
            assert not sender.done(), "the cut came too late to be mid-publish"
            proxy.cut()  # mid-publish and mid-consume
            await wait_for(lambda: arrived() >= 200, timeout=60)
            before = reconnects()
            proxy.refuse()  # the broker unreachable until the consumer has failed to reconnect at least once
            await wait_for(lambda: reconnects() >= before + 2, timeout=30)
            proxy.accept()
            await wait_for(lambda: arrived() >= 350, timeout=60)
            proxy.cut()
            await sender
            await wait_for(lambda: len({ln["id"] for ln in read_jsonl(out)}) == n, timeout=80)
            assert reconnects() >= 3
    finally:
        await proxy.stop()
    assert_arrived_once_in_order(out, hooks.sent)
    assert sorted(stored(tmp_path / "var" / "integrand.db", "bus_in")) == sorted(hooks.sent)  # each stored once
