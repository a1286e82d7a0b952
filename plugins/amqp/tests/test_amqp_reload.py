"""Reloads that restart the AMQP source while messages flow: per-entity order kept, nothing lost, each once.

A reload that changes the source's table stops the old consumer and starts a new one. Whatever the old
one had been sent (up to ``prefetch``) and not yet acknowledged goes back to the queue when its channel
closes; if the new consumer were handed newer messages first, the store's stale-version guard would drop
the older ones when they came back (what the crash loop found for NATS). This runs a dozen such reloads
under a steady publisher and checks the whole history."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import aio_pika
import orjson
import pytest
from amqp_support import (
    channel,
    consuming,
    name,
    vhost_session,  # noqa: F401 - the `vhost` fixture
)

from integrand.testing import daemon_config, in_entity_order, read_jsonl, running_daemon, stored_event_ids, wait_for

SOURCE = """
[sources.bus]
connector = "amqp"
vhost = "{vhost}"
queue = "{queue}"
batch = {batch}
prefetch = {prefetch}

[sources.bus.streaming]
backoff_base = "50ms"
backoff_cap = "300ms"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "bus"
to = ["out"]
"""
VARIANTS = ({"batch": 20, "prefetch": 40}, {"batch": 25, "prefetch": 50})


@pytest.mark.timeout(300)
async def test_reloads_restarting_the_amqp_source_keep_entity_order_and_lose_nothing(
    tmp_path: Path, vhost: str
) -> None:
    q, reloads = name("work"), 12
    out, db = tmp_path / "var" / "out.jsonl", tmp_path / "var" / "integrand.db"
    rng = random.Random(5)

    def write(variant: int) -> Path:
        return daemon_config(tmp_path, SOURCE.format(vhost=vhost, queue=q, **VARIANTS[variant % 2]))

    async with channel(vhost) as ch:
        await ch.declare_queue(q, durable=True, arguments={"x-queue-type": "quorum"})
        async with running_daemon(write(0)) as d:
            await wait_for(lambda: consuming(vhost, q), timeout=20)

            stop = asyncio.Event()
            sent = 0

            async def publish() -> None:
                nonlocal sent
                while not stop.is_set():  # 25 confirmed at a time, a little apart: the flow goes on through reloads
                    lo = sent
                    await asyncio.gather(
                        *(
                            ch.default_exchange.publish(
                                aio_pika.Message(
                                    orjson.dumps({"n": i}),
                                    message_id=f"m{i}",
                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                    headers={
                                        "integrand-entity": "item",
                                        "integrand-entity-id": f"k{i % 13}",
                                        "integrand-version": str(i),
                                    },
                                ),
                                q,
                            )
                            for i in range(lo, lo + 25)
                        )
                    )
                    sent += 25
                    await asyncio.sleep(rng.uniform(0.005, 0.02))  # the publisher's pace

            publisher = asyncio.create_task(publish())
            for variant in range(1, reloads + 1):
                await asyncio.sleep(rng.uniform(0.1, 0.4))  # a random moment mid-flow
                done = d.reloads

                def reloaded(done: int = done) -> bool:
                    return bool(d.reloads > done)

                write(variant)
                d.request_reload()
                await wait_for(reloaded, timeout=30)
            stop.set()
            await publisher
            n = sent
            with contextlib.suppress(AssertionError):  # what is missing then is said below
                await wait_for(lambda: len({ln["id"] for ln in read_jsonl(out)}) >= n, timeout=60)
            assert d.reloads == reloads
    assert n > 25 * reloads, f"only {n} messages published across {reloads} reloads"
    lines = read_jsonl(out)
    missing = {f"m{i}" for i in range(n)} - {ln["id"] for ln in lines}
    assert not missing, f"{len(missing)} of {n} confirmed messages never delivered, e.g. {sorted(missing)[:5]}"
    assert in_entity_order(lines)
    ids = stored_event_ids(db, "bus")
    assert sorted(ids) == sorted(f"m{i}" for i in range(n)), "each message stored exactly once"
