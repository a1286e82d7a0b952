"""The NATS connector against a real JetStream: publish with dedup ids, consume with commit-then-ack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from integrand_nats import NatsConnector
from integrand_nats.connector import _waves, stream_sequence
from nats.js.api import StreamConfig
from nats_support import NATS_URL, connect, random_name, temp_stream

from integrand.connector import Event, EventTemplate, RetryableError, StreamBatch
from integrand.errors import ConfigError
from integrand.store import Store
from integrand.testing import daemon_config, running_connector, running_daemon, standard_webhook_headers, wait_for

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def event(i: int, entity_id: str = "o1", type_: str = "order.created") -> Event:
    return Event(
        id=f"e{i}", source="shop", type=type_, data={"n": i}, entity="order", entity_id=entity_id, version=str(i)
    )


def test_subject_tokens_are_made_safe_for_nats() -> None:
    t = EventTemplate("x.{entity_id}")  # the connector's default alphabet: NATS tokens
    assert t.render(event(1, entity_id="a b*>")) == "x.a_b__"
    assert t.render(Event(id="1", source="s", type="t", data=None)) == "x._"


async def test_bad_config_names_the_key(tmp_path: Path, integrand_store: Store) -> None:
    with pytest.raises(ConfigError) as e:
        async with running_connector(
            NatsConnector, {"subject": "{nope}"}, integrand_store, base_dir=tmp_path, role="sink"
        ):
            pass
    assert any(p.startswith("sinks.contract.subject: unknown field {nope}") for p in e.value.problems)


async def test_sink_waits_for_pubacks_and_msg_id_dedups_retries(tmp_path: Path, integrand_store: Store) -> None:
    async with temp_stream() as (_nc, js, stream):
        table = {"servers": [NATS_URL], "subject": stream + ".{entity}.{type}"}
        async with running_connector(NatsConnector, table, integrand_store, base_dir=tmp_path, role="sink") as sink:
            assert isinstance(sink, NatsConnector)
            evs = [event(i, entity_id=f"o{i % 3}") for i in range(20)]
            assert await sink.deliver_batch(evs) == [None] * 20
            assert await sink.deliver_batch(evs[5:10]) == [None] * 5  # integrand retrying: absorbed by Nats-Msg-Id
            info = await js.stream_info(stream)
            assert info.state.messages == 20
            msg = await js.get_msg(stream, 1)
            assert msg.subject == f"{stream}.order.order.created"
            assert msg.headers is not None
            assert msg.headers["Nats-Msg-Id"] == "shop:e0"
            assert msg.headers["Integrand-Entity-Id"] == "o0"
            assert orjson.loads(msg.data or b"")["data"] == {"n": 0}
            # A subject no stream takes is an error with its reason, not a silent drop.
            other = Event(id="x", source="nowhere", type="t", data=None)
            table2 = {"servers": [NATS_URL], "subject": "integrand_test_unbound.{source}"}
            async with running_connector(
                NatsConnector, table2, integrand_store, base_dir=tmp_path, role="sink", name="u"
            ) as s2:
                assert isinstance(s2, NatsConnector)
                [err] = await s2.deliver_batch([other])
            assert isinstance(err, RetryableError)
            assert "no JetStream stream takes subject 'integrand_test_unbound.nowhere'" in str(err)


def test_stream_sequence_from_both_ack_subject_forms() -> None:
    assert stream_sequence("$JS.ACK.ORDERS.integrand.1.42.40.1733570000000000000.7") == 42
    assert stream_sequence("$JS.ACK._.ACCHASH.ORDERS.integrand.2.43.41.1733570000000000000.6.tok") == 43
    assert stream_sequence("$JS.ACK.hub.ACCHASH.ORDERS.integrand.2.44.41.1733570000000000000.6") == 44
    with pytest.raises(RetryableError, match="not a JetStream message"):
        stream_sequence("_INBOX.abc")


@given(st.lists(st.sampled_from(["a", "b", "c", None]), max_size=30))
def test_waves_hold_one_event_per_entity_in_batch_order(entities: list[str | None]) -> None:
    evs = [Event(id=f"e{i}", source="s", type="t", data=None, entity="x", entity_id=e) for i, e in enumerate(entities)]
    waves = _waves(evs)
    assert sorted(i for w in waves for i in w) == list(range(len(evs)))
    for w in waves:
        assert len({evs[i].entity_key for i in w}) == len(w)  # never two of one entity in flight together
    order = [i for w in waves for i in w]
    for key in {e.entity_key for e in evs}:
        mine = [i for i in order if evs[i].entity_key == key]
        assert mine == sorted(mine)  # each entity's events go out in batch order
    assert len(waves) == max([entities.count(e) for e in set(entities) if e is not None] + [1 if evs else 0])


async def test_a_failed_event_holds_back_the_rest_of_its_entity(tmp_path: Path, integrand_store: Store) -> None:
    """In one batch, entity o1's first event cannot be stored: its second is not sent; other entities go on."""
    nc = await connect()
    js = nc.jetstream()
    stream = random_name()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.ok"], duplicate_window=120.0))
    try:
        table = {"servers": [NATS_URL], "subject": stream + ".{type}", "publish_timeout": "3s"}
        async with running_connector(NatsConnector, table, integrand_store, base_dir=tmp_path, role="sink") as sink:
            assert isinstance(sink, NatsConnector)
            evs = [event(0, "o1", "bad"), event(1, "o2", "ok"), event(2, "o1", "ok"), event(3, "o2", "ok")]
            res = await sink.deliver_batch(evs)
            assert res[1] is None and res[3] is None
            assert isinstance(res[0], RetryableError) and f"no JetStream stream takes subject '{stream}.bad'" in str(
                res[0]
            )
            assert isinstance(res[2], RetryableError) and "shop:e0, before it in its entity, failed" in str(res[2])
            info = await js.stream_info(stream)
            assert info.state.messages == 2
            assert [(await js.get_msg(stream, s)).headers["Nats-Msg-Id"] for s in (1, 2)] == ["shop:e1", "shop:e3"]  # type: ignore[index]
    finally:
        await js.delete_stream(stream)
        await nc.close()


async def _first_batch(it: Any) -> StreamBatch:
    return await asyncio.wait_for(it.__anext__(), 15)


async def test_source_batches_positions_nak_on_refusal_and_in_progress(tmp_path: Path, integrand_store: Store) -> None:
    async with temp_stream() as (_nc, js, stream):
        for i in range(10):
            await js.publish(f"{stream}.order", orjson.dumps({"n": i}), headers={"Nats-Msg-Id": f"m{i}"})
        await js.publish(f"{stream}.order", b"\x00 not json")
        table = {"stream": stream, "durable": "integrand", "batch": 20, "ack_wait": "1s", "nak_delay": "200ms"}
        async with running_connector(NatsConnector, table, integrand_store, base_dir=tmp_path, role="source") as src:
            assert isinstance(src, NatsConnector)
            it = cast(AsyncGenerator[StreamBatch, None], src.stream(None))
            batch = await _first_batch(it)
            assert [e.id for e in batch.events] == [f"m{i}" for i in range(10)]
            assert batch.position == 11
            [poison] = batch.rejected
            assert poison.reason.startswith(f"NATS message {stream}:11 on {stream}.order: not JSON (")
            assert poison.headers == {"subject": f"{stream}.order", "stream": stream, "seq": "11"}
            # The store refused: handed back with a delay, redelivered as the same messages.
            assert await src.refused(batch, RuntimeError("full")) is True
            again = await _first_batch(it)
            assert [e.id for e in again.events] == [f"m{i}" for i in range(10)]
            assert again.events[0].meta["nats"]["seq"] == 1
            # A commit slower than ack_wait: in_progress keeps the batch ours (no redelivery meanwhile).
            await asyncio.sleep(2.5)
            ci = await js.consumer_info(stream, "integrand")
            assert ci.num_redelivered == 11  # the nak'ed ones, once; nothing more during the long commit
            await src.ack(again)
            await wait_for(lambda: _ack_pending(js, stream), timeout=10)
            await it.aclose()
        ci = await js.consumer_info(stream, "integrand")
        assert ci.ack_floor is not None and ci.ack_floor.stream_seq == 11  # the poison one was term-ed


async def _ack_pending(js: Any, stream: str) -> bool:
    ci = await js.consumer_info(stream, "integrand")
    return bool(ci.num_ack_pending == 0)


def round_trip_config(stream: str, extra: str = "") -> str:
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
connector = "nats"
servers = ["{NATS_URL}"]
subject = "{stream}.{{source}}.{{entity}}.{{type}}"

[[routes]]
from = "shop"
to = ["bus"]

[sources.bus_in]
connector = "nats"
servers = ["{NATS_URL}"]
stream = "{stream}"
durable = "integrand"
batch = 50

[sources.bus_in.streaming]
backoff_base = "20ms"
backoff_cap = "200ms"
alert_retry = "200ms"
{extra}
"""


async def post(session: aiohttp.ClientSession, url: str, payload: dict[str, Any], msg_id: str) -> int:
    body = orjson.dumps(payload)
    async with session.post(url, data=body, headers=standard_webhook_headers(body, msg_id, WHSEC)) as r:
        return r.status


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(ln) for ln in path.read_bytes().splitlines() if ln.strip()]


async def test_round_trip_webhook_to_jetstream_to_sink_in_order(tmp_path: Path) -> None:
    out = tmp_path / "var" / "out.jsonl"
    async with temp_stream() as (_nc, js, stream):
        cfg = daemon_config(
            tmp_path,
            round_trip_config(
                stream,
                """
[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "bus_in"
to = ["out"]
""",
            ),
        )
        async with running_daemon(cfg) as d, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/shop"
            for i in range(60):
                payload = {"type": "order.updated", "entity": "order", "id": f"o{i % 5}", "version": i, "n": i}
                assert await post(s, url, payload, f"w{i}") == 200
            await wait_for(lambda: len(read_jsonl(out)) == 60, timeout=30)
            rejections = await d.store.rejections(source="bus_in")
        lines = read_jsonl(out)
        assert len({ln["id"] for ln in lines}) == 60
        assert {ln["id"] for ln in lines} == {f"shop:w{i}" for i in range(60)}
        by_entity: dict[str, list[int]] = {}
        for ln in lines:
            assert ln["source"] == "bus_in" and ln["meta"]["origin"] == "shop"
            by_entity.setdefault(ln["entity_id"], []).append(int(ln["version"]))
        assert all(v == sorted(v) for v in by_entity.values()) and len(by_entity) == 5
        assert rejections == []
        assert (await js.stream_info(stream)).state.messages == 60


async def test_order_created_fans_out_and_a_failing_sink_blocks_only_itself(tmp_path: Path) -> None:
    """The bus example: a service publishes order.created; integrand feeds inventory and email independently."""
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
    try:
        async with temp_stream() as (_nc, js, stream):
            cfg = daemon_config(
                tmp_path,
                f"""
[sources.orders]
connector = "nats"
servers = ["{NATS_URL}"]
stream = "{stream}"
durable = "integrand"

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
            async with running_daemon(cfg):
                # The order service publishes on the bus, exactly as it would without integrand.
                for i in range(12):
                    body = orjson.dumps({"order": f"ord-{i}", "total": 10 * i})
                    await js.publish(
                        f"{stream}.order.created",
                        body,
                        headers={
                            "Nats-Msg-Id": f"ord-{i}",
                            "Integrand-Type": "order.created",
                            "Integrand-Entity": "order",
                            "Integrand-Entity-Id": f"ord-{i}",
                        },
                    )
                await wait_for(lambda: len(read_jsonl(emails)) == 12, timeout=30)
                assert inventory == []  # down the whole time, and email never waited for it
                inventory_up.set()
                await wait_for(lambda: len({b["id"] for b in inventory}) == 12, timeout=30)
            assert [ln["type"] for ln in read_jsonl(emails)] == ["order.created"] * 12
            assert {ln["data"]["order"] for ln in read_jsonl(emails)} == {f"ord-{i}" for i in range(12)}
    finally:
        await runner.cleanup()


async def test_server_unreachable_is_retryable_with_a_clear_reason(tmp_path: Path, integrand_store: Store) -> None:
    table = {"servers": ["nats://127.0.0.1:1"], "connect_timeout": "1s"}
    async with running_connector(NatsConnector, table, integrand_store, base_dir=tmp_path, role="sink") as sink:
        assert isinstance(sink, NatsConnector)
        with pytest.raises(RetryableError, match=r"cannot connect to NATS nats://127.0.0.1:1"):
            await sink.deliver(event(1))
