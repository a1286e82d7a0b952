"""The AMQP connector against the real RabbitMQ: confirms, returns, manual acks, dead-lettering with a reason."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from amqp_support import (
    channel,
    consuming,
    name,
    url,
    vhost_session,  # noqa: F401 - the `vhost` fixture
)
from integrand_amqp import AmqpConnector
from integrand_amqp.connector import REASON_HEADER

from integrand.connector import Event, EventTemplate, PermanentError, RetryableError
from integrand.errors import ConfigError
from integrand.store import Store
from integrand.testing import daemon_config, running_connector, running_daemon, standard_webhook_headers, wait_for

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def event(i: int, entity_id: str = "o1", type_: str = "order.created") -> Event:
    return Event(
        id=f"e{i}", source="shop", type=type_, data={"n": i}, entity="order", entity_id=entity_id, version=str(i)
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(ln) for ln in path.read_bytes().splitlines() if ln.strip()]


async def drain(
    queue: aio_pika.abc.AbstractQueue, n: int, timeout: float = 10
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    out: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def got_n() -> bool:
        while len(out) < n:
            m = await queue.get(fail=False, no_ack=True)
            if m is None:
                return False
            out.append(m)
        return True

    await wait_for(got_n, timeout=timeout)
    return out


def test_routing_key_tokens_are_made_safe() -> None:
    assert EventTemplate("{entity_id}", allowed=r"A-Za-z0-9_\-.:/").render(event(1, entity_id="a:b c#*")) == "a:b_c__"


async def test_bad_config_names_the_key(tmp_path: Path, integrand_store: Store) -> None:
    table = {"url": "amqp://guest:guest@127.0.0.1/", "routing_key": "{x}"}
    with pytest.raises(ConfigError) as e:
        async with running_connector(AmqpConnector, table, integrand_store, base_dir=tmp_path, role="sink"):
            pass
    assert any(p.startswith("sinks.contract.url: put the password in `password`") for p in e.value.problems)
    assert any(p.startswith("sinks.contract.routing_key: unknown field {x}") for p in e.value.problems)


async def test_sink_confirms_persists_and_returns_unroutable_as_an_error(
    tmp_path: Path, integrand_store: Store, vhost: str
) -> None:
    ex, q = name("ex"), name("q")
    async with channel(vhost) as ch:
        exchange = await ch.declare_exchange(ex, "topic", durable=True)
        queue = await ch.declare_queue(q, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, "shop.order.#")
        table = {"url": "amqp://127.0.0.1:5672/", "vhost": vhost, "exchange": ex}
        async with running_connector(AmqpConnector, table, integrand_store, base_dir=tmp_path, role="sink") as sink:
            assert isinstance(sink, AmqpConnector)
            evs = [event(i, entity_id=f"o{i % 3}") for i in range(10)]
            assert await sink.deliver_batch(evs) == [None] * 10
            msgs = await drain(queue, 10)
            assert [m.message_id for m in msgs] == [f"shop:e{i}" for i in range(10)]
            m = msgs[0]
            assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert m.routing_key == "shop.order.order.created"
            assert m.content_type == "application/json"
            assert m.headers["integrand-entity-id"] == "o0"
            assert orjson.loads(m.body)["data"] == {"n": 0}
            # No queue bound for this key: returned by the broker, and that is an error with its reason.
            stray = Event(id="x", source="billing", type="invoice.paid", data={}, entity="invoice")
            [err] = await sink.deliver_batch([stray])
            assert isinstance(err, PermanentError)
            assert "RabbitMQ returned billing:x as unroutable: NO_ROUTE" in str(err)
            assert "routing key 'billing.invoice.invoice.paid'" in str(err)
        missing = {"vhost": vhost, "exchange": name("absent")}
        async with running_connector(AmqpConnector, missing, integrand_store, base_dir=tmp_path, role="sink") as s2:
            assert isinstance(s2, AmqpConnector)
            with pytest.raises(RetryableError, match=r"exchange 'absent_\w+' does not exist on RabbitMQ"):
                await s2.deliver(event(1))


async def test_sink_declares_only_when_configured(tmp_path: Path, integrand_store: Store, vhost: str) -> None:
    ex = name("decl")
    table = {"vhost": vhost, "exchange": ex, "declare_exchange": True, "mandatory": False}
    async with running_connector(AmqpConnector, table, integrand_store, base_dir=tmp_path, role="sink") as sink:
        assert isinstance(sink, AmqpConnector)
        assert await sink.deliver_batch([event(1)]) == [None]  # mandatory off: unrouted is dropped, by choice
    async with channel(vhost) as ch:
        await ch.get_exchange(ex, ensure=True)  # it exists now
        await ch.exchange_delete(ex)


def bus_config(vhost: str, ex: str, q: str, extra: str = "") -> str:
    return f"""
[sources.shop]
connector = "webhook"
signature = "standard-webhooks"
secret = "{WHSEC}"
entity_field = "entity"
entity_id_field = "id"
version_field = "version"
type_field = "type"

[sinks.bus]
connector = "amqp"
vhost = "{vhost}"
exchange = "{ex}"
declare_exchange = true

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

[sources.bus_in.streaming]
backoff_base = "50ms"
backoff_cap = "500ms"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "bus_in"
to = ["out"]
{extra}
"""


async def post(session: aiohttp.ClientSession, url_: str, payload: dict[str, Any], msg_id: str) -> int:
    body = orjson.dumps(payload)
    async with session.post(url_, data=body, headers=standard_webhook_headers(body, msg_id, WHSEC)) as r:
        return r.status


async def test_round_trip_webhook_to_rabbitmq_to_sink_in_order(tmp_path: Path, vhost: str) -> None:
    out = tmp_path / "var" / "out.jsonl"
    ex, q = name("bus"), name("in")
    async with running_daemon(daemon_config(tmp_path, bus_config(vhost, ex, q))) as d, aiohttp.ClientSession() as s:
        hook = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/shop"
        await wait_for(lambda: consuming(vhost, q), timeout=20)  # consumers bind before the bus is used
        for i in range(80):
            payload = {"type": "order.updated", "entity": "order", "id": f"o{i % 6}", "version": i, "n": i}
            assert await post(s, hook, payload, f"w{i}") == 200
        await wait_for(lambda: len(read_jsonl(out)) == 80, timeout=30)
        assert d.streamers["bus_in"].status()["position"] == 80
    lines = read_jsonl(out)
    assert sorted(ln["id"] for ln in lines) == sorted(f"shop:w{i}" for i in range(80))
    by_entity: dict[str, list[int]] = {}
    for ln in lines:
        assert ln["source"] == "bus_in" and ln["meta"]["origin"] == "shop"
        by_entity.setdefault(ln["entity_id"], []).append(int(ln["version"]))
    assert len(by_entity) == 6 and all(v == sorted(v) for v in by_entity.values())


async def test_poison_goes_to_the_dead_letter_exchange_with_its_reason_and_redeliveries_dedup(
    tmp_path: Path, vhost: str
) -> None:
    ex, q, dlx, dlq = name("src"), name("in"), name("dlx"), name("dlq")
    out = tmp_path / "var" / "out.jsonl"
    async with channel(vhost) as ch:
        exchange = await ch.declare_exchange(ex, "topic", durable=True)
        dead = await ch.declare_exchange(dlx, "fanout", durable=True)
        dq = await ch.declare_queue(dlq, durable=True)
        await dq.bind(dead)
        queue = await ch.declare_queue(q, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, "#")

        async def publish(body: bytes, **props: Any) -> None:
            await exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props), "order.created"
            )

        await publish(orjson.dumps({"order": 1}), message_id="ord-1", headers={"integrand-type": "order.created"})
        await publish(b"\xff\xfe not json", message_id="bad-1")
        await publish(orjson.dumps({"order": 1}), message_id="ord-1")  # the publisher's own retry: same id
        await publish(orjson.dumps({"order": 2}), message_id="ord-2")
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.orders]
connector = "amqp"
vhost = "{vhost}"
queue = "{q}"
dead_letter_exchange = "{dlx}"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "orders"
to = ["out"]
""",
        )
        async with running_daemon(cfg) as d:
            await wait_for(lambda: d.streamers["orders"].status()["position"] == 4, timeout=30)  # 4 received
            await wait_for(lambda: len(read_jsonl(out)) == 2, timeout=30)
            rejections = await d.store.rejections(source="orders")
        [poisoned] = await drain(dq, 1)
        assert poisoned.message_id == "bad-1"
        assert poisoned.body == b"\xff\xfe not json"
        assert str(poisoned.headers[REASON_HEADER]).startswith(f"AMQP message bad-1 from queue {q}: not JSON (")
        [r] = rejections
        assert r.reason == poisoned.headers[REASON_HEADER]
        assert r.headers["message_id"] == "bad-1" and r.headers["routing_key"] == "order.created"
        declared = await ch.declare_queue(q, durable=True, arguments={"x-queue-type": "quorum"})
        assert declared.declaration_result.message_count == 0  # nothing requeued, nothing left behind
    lines = read_jsonl(out)
    assert [ln["data"] for ln in lines] == [{"order": 1}, {"order": 2}]
    assert [ln["id"] for ln in lines] == ["ord-1", "ord-2"] and lines[0]["type"] == "order.created"


async def test_content_dedup_for_publishers_whose_ids_are_random(tmp_path: Path, vhost: str) -> None:
    """aiormq gives every publish without a message_id a random one, so a publisher's retry looks new;
    ``dedup = "content"`` makes the body (and routing key) the identity instead."""
    q = name("content")
    out = tmp_path / "var" / "out.jsonl"
    async with channel(vhost) as ch:
        await ch.declare_queue(q, durable=True)
        for body in (b'{"a": 1}', b'{"a": 1}', b'{"a": 2}'):
            await ch.default_exchange.publish(aio_pika.Message(body), q)
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.in]
connector = "amqp"
vhost = "{vhost}"
queue = "{q}"
dedup = "content"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "in"
to = ["out"]
""",
        )
        async with running_daemon(cfg) as d:
            await wait_for(lambda: d.streamers["in"].status()["position"] == 3, timeout=30)
            await wait_for(lambda: len(read_jsonl(out)) == 2, timeout=30)
    assert [ln["data"] for ln in read_jsonl(out)] == [{"a": 1}, {"a": 2}]


async def test_order_created_fans_out_and_a_failing_sink_blocks_only_itself(tmp_path: Path, vhost: str) -> None:
    """The seeds' bus: an order service publishes order.created to a topic exchange; integrand's queue is bound
    by pattern and feeds inventory and email; inventory down does not hold email back."""
    inventory_up = asyncio.Event()
    inventory: list[dict[str, Any]] = []

    async def inventory_api(request: aiohttp.web.Request) -> aiohttp.web.Response:
        if not inventory_up.is_set():
            return aiohttp.web.Response(status=503, text="inventory is down")
        inventory.append(await request.json())
        return aiohttp.web.json_response({"ok": True})

    app = aiohttp.web.Application()
    app.router.add_post("/stock", inventory_api)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    emails = tmp_path / "var" / "emails.jsonl"
    ex, q = name("shop"), name("integrand")
    try:
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.orders]
connector = "amqp"
vhost = "{vhost}"
exchange = "{ex}"
declare_exchange = true
queue = "{q}"
declare_queue = {{ type = "quorum", bind = ["order.*"] }}

[sinks.inventory]
connector = "http"
url = "http://127.0.0.1:{port}/stock"

[sinks.email]
connector = "jsonl"
path = "var/emails.jsonl"

[[routes]]
from = "orders"
to = ["inventory", "email"]
""",
        )
        async with running_daemon(cfg), channel(vhost) as ch:
            await wait_for(lambda: consuming(vhost, q), timeout=20)  # integrand declared and bound its queue
            exchange = await ch.get_exchange(ex)
            for i in range(12):  # the order service, publishing as it would without integrand
                msg = aio_pika.Message(
                    orjson.dumps({"order": f"ord-{i}", "total": 10 * i}),
                    message_id=f"ord-{i}",
                    type="order.created",
                    headers={"integrand-entity": "order", "integrand-entity-id": f"ord-{i}"},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await exchange.publish(msg, "order.created")
            await exchange.publish(aio_pika.Message(b"{}", message_id="not-ours"), "invoice.paid")  # not bound
            await wait_for(lambda: len(read_jsonl(emails)) == 12, timeout=30)
            assert inventory == []
            inventory_up.set()
            await wait_for(lambda: len({b["id"] for b in inventory}) == 12, timeout=30)
        assert [ln["type"] for ln in read_jsonl(emails)] == ["order.created"] * 12
        assert {ln["data"]["order"] for ln in read_jsonl(emails)} == {f"ord-{i}" for i in range(12)}
    finally:
        await runner.cleanup()


async def test_unreachable_broker_is_retryable_with_where(tmp_path: Path, integrand_store: Store) -> None:
    table = {"url": "amqp://127.0.0.1:1/", "connect_timeout": "1s"}
    async with running_connector(AmqpConnector, table, integrand_store, base_dir=tmp_path, role="sink") as sink:
        assert isinstance(sink, AmqpConnector)
        with pytest.raises(RetryableError, match=r"cannot connect to RabbitMQ at amqp://127.0.0.1:1/"):
            await sink.deliver(event(1))


def test_url_helper_is_for_the_tests_vhost(vhost: str) -> None:
    assert url(vhost).endswith("/" + vhost)
