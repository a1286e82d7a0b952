"""Reloads that restart the NATS source while messages flow: per-entity order kept, nothing lost, each once.

The crash loop's 200-round campaign (session 6) found PubAck'ed messages missing below the committed
stream position after some hundred reloads: a reload's one cancel of the old stream task can be swallowed
inside nats-py (its ``next_msg`` waits with ``asyncio.wait_for``, which on Python 3.11 drops a cancel that
arrives as a message does), the old session then fetches on beside the new one and the store's
stale-version guard drops whichever batch comes in behind a newer one. This runs many reloads under a
steady publisher and checks the whole history; the reload now cancels again until the task has ended."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import orjson
import pytest
from nats_support import NATS_URL, temp_stream

from integrand.testing import daemon_config, in_entity_order, read_jsonl, running_daemon, stored_event_ids, wait_for

SOURCE = """
[sources.bus]
connector = "nats"
servers = ["{url}"]
stream = "{stream}"
durable = "integrand"
batch = {batch}
fetch_wait = "50ms"
ack_wait = "500ms"
format = "json"

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
VARIANTS = (20, 25)


@pytest.mark.timeout(300)
@pytest.mark.xfail(
    strict=False,
    reason="open (issue 10, docs/reliability.md 'Open: reloads can still lose a batch of a NATS stream'): "
    "fails about 1 run in 5 at a load of 10+ (before waits.stop_tasks it lost 40-50 % every run); in the failing "
    "runs the lead captured, every message was stored and delivery stalled (store writer / a leased batch)",
)
async def test_reloads_restarting_the_nats_source_keep_entity_order_and_lose_nothing(tmp_path: Path) -> None:
    reloads = 40
    out, db = tmp_path / "var" / "out.jsonl", tmp_path / "var" / "integrand.db"
    rng = random.Random(9)
    async with temp_stream() as (_nc, js, stream):

        def write(variant: int) -> Path:
            return daemon_config(tmp_path, SOURCE.format(url=NATS_URL, stream=stream, batch=VARIANTS[variant % 2]))

        async with running_daemon(write(0)) as d:
            stop = asyncio.Event()
            acked: list[str] = []

            async def publish(entity: int) -> None:
                v = 0
                while not stop.is_set():  # each entity's versions in order, each PubAck'ed before the next
                    v += 1
                    mid = f"k{entity}-v{v}"
                    headers = {"Nats-Msg-Id": mid, "Integrand-Entity-Id": f"k{entity}", "Integrand-Version": str(v)}
                    await js.publish(f"{stream}.item", orjson.dumps({"v": v}), headers=headers)
                    acked.append(mid)
                    await asyncio.sleep(rng.uniform(0.001, 0.01))  # the publishers' pace

            publishers = [asyncio.create_task(publish(e)) for e in range(8)]
            for variant in range(1, reloads + 1):
                await asyncio.sleep(rng.uniform(0.05, 0.3))  # a random moment mid-flow
                done = d.reloads

                def reloaded(done: int = done) -> bool:
                    return bool(d.reloads > done)

                write(variant)
                d.request_reload()
                await wait_for(reloaded, timeout=30)
            stop.set()
            await asyncio.gather(*publishers)
            n = len(acked)
            with contextlib.suppress(AssertionError):  # what is missing then is said below
                await wait_for(lambda: len({ln["id"] for ln in read_jsonl(out)}) >= n, timeout=60)
    assert n > 10 * reloads, f"only {n} messages published across {reloads} reloads"
    lines = read_jsonl(out)
    missing = set(acked) - {ln["id"] for ln in lines}
    assert not missing, f"{len(missing)} of {n} PubAck'ed messages never delivered, e.g. {sorted(missing)[:5]}"
    assert in_entity_order(lines)
    assert sorted(stored_event_ids(db, "bus")) == sorted(acked), "each message stored exactly once"
