"""kill -9 of the consuming integrand, a NATS server killed mid-publish and mid-consume, a lost position."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nats.js.api import StreamConfig
from nats_support import NATS_URL, OwnServer, connect, random_name, temp_stream

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


def stored(db: Path, source: str) -> list[str]:
    return stored_event_ids(db, source)


CONSUMER = """
[sources.bus]
connector = "nats"
servers = ["{url}"]
stream = "{stream}"
durable = "integrand"
batch = 100
ack_wait = "3s"

[sources.bus.streaming]
backoff_base = "50ms"
backoff_cap = "500ms"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "bus"
to = ["out"]
"""


async def test_kill9_of_the_consuming_integrand_loses_nothing_and_stores_once(tmp_path: Path) -> None:
    n = 3000
    db = tmp_path / "var" / "integrand.db"
    out = tmp_path / "var" / "out.jsonl"
    async with temp_stream() as (_nc, js, stream):
        acked: list[str] = []
        for i in range(n):  # the publishing service: every PubAck'ed message must arrive
            ack = await js.publish(
                f"{stream}.item",
                orjson.dumps({"n": i}),
                headers={
                    "Nats-Msg-Id": f"m{i}",
                    "Integrand-Entity": "item",
                    "Integrand-Entity-Id": f"k{i % 97}",
                    "Integrand-Version": str(i),
                },
            )
            assert ack.seq == i + 1
            acked.append(f"m{i}")
        cfg = daemon_config(tmp_path, CONSUMER.format(url=NATS_URL, stream=stream))
        d = DaemonProcess(cfg, tmp_path / "daemon.log")
        await d.start()
        try:
            await wait_for(lambda: db.exists() and len(stored(db, "bus")) >= n // 3, timeout=60)
            await d.kill()
            mid = len(stored(db, "bus"))
            assert n // 3 <= mid < n, "the kill came too late to be mid-stream"
            await d.start()
            await wait_for(lambda: len(stored(db, "bus")) == n, timeout=90)
            await wait_for(lambda: len({ln["id"] for ln in read_jsonl(out)}) == n, timeout=90)
            await wait_for(lambda: _settled(js, stream), timeout=30)
        finally:
            assert await d.stop() == 0
        assert stored(db, "bus") == acked  # each stored once, in stream order
        assert in_entity_order(read_jsonl(out))


PUBLISHER = (
    signed_webhook_source("shop", WHSEC)
    + """
[sinks.bus]
connector = "nats"
servers = ["{url}"]
subject = "{stream}.{{source}}.{{entity}}"

[[routes]]
from = "shop"
to = ["bus"]
"""
)


async def test_round_trip_with_kill9_of_the_consuming_integrand(tmp_path: Path) -> None:
    """integrand -> JetStream -> integrand, two daemons: the consuming one is killed -9 while the publishing
    one goes on publishing. Every webhook the publishing side acknowledged arrives, stored once, in entity order."""
    n = 800
    pub, con = tmp_path / "pub", tmp_path / "con"
    pub.mkdir()
    con.mkdir()
    db, out = con / "var" / "integrand.db", con / "var" / "out.jsonl"
    async with temp_stream() as (_nc, js, stream):
        consumer = DaemonProcess(daemon_config(con, CONSUMER.format(url=NATS_URL, stream=stream)), con / "daemon.log")
        await consumer.start()
        try:
            publisher_cfg = daemon_config(pub, PUBLISHER.format(url=NATS_URL, stream=stream))
            async with running_daemon(publisher_cfg) as p, aiohttp.ClientSession() as s:
                hooks = SignedSender(s, f"http://127.0.0.1:{p.ports['webhooks']}/hooks/shop", WHSEC)
                sender = hooks.lanes(n, 4)
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
        ids = stored(db, "bus")
        assert sorted(ids) == sorted(hooks.sent) and len(set(ids)) == n  # all of them, each stored once
        assert_arrived_once_in_order(out, hooks.sent)
        assert (await js.stream_info(stream)).state.messages == n  # the publisher published each once


async def _settled(js: Any, stream: str) -> bool:
    ci = await js.consumer_info(stream, "integrand")
    return bool(ci.num_ack_pending == 0 and ci.num_pending == 0)


ROUND_TRIP = (
    signed_webhook_source("shop", WHSEC)
    + """
[sinks.bus]
connector = "nats"
servers = ["{url}"]
subject = "{stream}.{{source}}.{{entity}}"
publish_timeout = "2s"

[[routes]]
from = "shop"
to = ["bus"]

[sources.bus_in]
connector = "nats"
servers = ["{url}"]
stream = "{stream}"
durable = "integrand"
batch = 20
fetch_wait = "200ms"

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
"""
)


async def test_server_killed_during_publish_and_consume_loses_nothing(tmp_path: Path) -> None:
    """integrand -> JetStream -> integrand while the server dies (kill -9) and comes back: every webhook
    acknowledged arrives once; no delivery was marked done without its PubAck (the stream has them all)."""
    server = OwnServer(tmp_path / "nats")
    await server.start()
    out = tmp_path / "var" / "out.jsonl"
    stream = random_name()
    nc = await connect(server.url)
    await nc.jetstream().add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"], duplicate_window=120.0))
    await nc.close()
    try:
        cfg = daemon_config(tmp_path, ROUND_TRIP.format(url=server.url, stream=stream))
        async with running_daemon(cfg) as d, aiohttp.ClientSession() as s:
            hooks = SignedSender(s, f"http://127.0.0.1:{d.ports['webhooks']}/hooks/shop", WHSEC, entities=9)
            await hooks.send(range(150))
            await wait_for(lambda: len(read_jsonl(out)) >= 50, timeout=30)
            await server.kill()  # mid-publish and mid-consume
            await hooks.send(range(150, 300))  # integrand keeps accepting: they wait in its store
            await asyncio.sleep(0.5)
            await server.start()
            await wait_for(lambda: len({ln["id"] for ln in read_jsonl(out)}) == 300, timeout=90)
        assert_arrived_once_in_order(out, hooks.sent)
        nc = await connect(server.url)
        info = await nc.jetstream().stream_info(stream)
        await nc.close()
        assert info.state.messages == 300  # retries after the outage were absorbed by Nats-Msg-Id
    finally:
        await server.kill()


async def test_connections_dropped_by_a_proxy_mid_publish_and_mid_consume_lose_nothing(tmp_path: Path) -> None:
    """integrand -> JetStream -> integrand through a TCP proxy that aborts every connection (bytes in flight
    lost: publishes, PubAcks, fetched messages, acks) twice, with the server unreachable for a while between.
    Every acknowledged webhook arrives once and in entity order; the stream holds each message once."""
    proxy = TcpProxy("127.0.0.1", 4222)
    await proxy.start()
    out = tmp_path / "var" / "out.jsonl"
    n = 600
    try:
        async with temp_stream() as (_nc, js, stream):
            url = f"nats://127.0.0.1:{proxy.port}"
            cfg = daemon_config(tmp_path, ROUND_TRIP.format(url=url, stream=stream))
            async with running_daemon(cfg) as d, aiohttp.ClientSession() as s:
                hooks = SignedSender(s, f"http://127.0.0.1:{d.ports['webhooks']}/hooks/shop", WHSEC, entities=9)

                def reconnects() -> float:
                    v = d.metrics.registry.get_sample_value("integrand_stream_reconnects_total", {"source": "bus_in"})
                    return v or 0.0

                def arrived() -> int:
                    return len(read_jsonl(out))

                sender = hooks.lanes(n, 3)
                await wait_for(lambda: arrived() >= 80, timeout=60)
                assert not sender.done(), "the cut came too late to be mid-publish"
                proxy.cut()  # mid-publish and mid-consume; the clients reconnect on their own
                await wait_for(lambda: arrived() >= 200, timeout=60)
                before = reconnects()
                proxy.refuse()  # unreachable until the source has given up its connection and retried
                await wait_for(lambda: reconnects() >= before + 1, timeout=60)
                proxy.accept()
                await wait_for(lambda: arrived() >= 350, timeout=60)
                proxy.cut()
                await sender
                await wait_for(lambda: len({ln["id"] for ln in read_jsonl(out)}) == n, timeout=80)
            assert (await js.stream_info(stream)).state.messages == n  # lost PubAcks' retries absorbed by Msg-Id
    finally:
        await proxy.stop()
    assert_arrived_once_in_order(out, hooks.sent)
    assert sorted(stored(tmp_path / "var" / "integrand.db", "bus_in")) == sorted(hooks.sent)  # each stored once


async def test_a_lost_position_alerts_and_never_skips_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "var" / "integrand.db"
    async with temp_stream(max_msgs=5) as (_nc, js, stream):
        for i in range(3):
            await js.publish(f"{stream}.x", orjson.dumps({"n": i}))
        body = CONSUMER.format(url=NATS_URL, stream=stream).replace(
            'cap = "500ms"', 'cap = "500ms"\nalert_retry = "100ms"'
        )
        cfg = daemon_config(tmp_path, body)
        async with running_daemon(cfg):
            await wait_for(lambda: db.exists() and len(stored(db, "bus")) == 3, timeout=30)
        # While integrand is down its consumer is removed and the stream (max 5) drops 4..7 unseen.
        await js.delete_consumer(stream, "integrand")
        for i in range(3, 13):
            await js.publish(f"{stream}.x", orjson.dumps({"n": i}))
        caplog.set_level(logging.INFO)
        async with running_daemon(cfg) as d:
            await wait_for(
                lambda: (
                    (
                        d.metrics.registry.get_sample_value(
                            "integrand_stream_alerts_total", {"source": "bus", "reason": "permanent"}
                        )
                        or 0
                    )
                    >= 1
                ),
                timeout=30,
            )
            assert d.streamers["bus"].status()["state"].startswith("alert")
        assert "stream " + stream + " now starts at sequence 9" in caplog.text
        assert "sequences 4..8 expired or were purged before integrand stored them" in caplog.text
        assert len(stored(db, "bus")) == 3  # nothing after the gap was taken as if the gap were not there
        # The operator accepts the gap: on_gap = "skip" logs the range and goes on.
        cfg.write_text(cfg.read_text().replace('durable = "integrand"', 'durable = "integrand"\non_gap = "skip"'))
        async with running_daemon(cfg):
            await wait_for(lambda: len(stored(db, "bus")) == 3 + 5, timeout=30)
        assert "skipping a gap" in caplog.text
