"""The ``http`` sink against a real local receiver that goes down, throttles, refuses, and comes back."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from integrand import signing
from integrand.app import Daemon

from .helpers import DEMO_SECRET, admin_url, hook_url, post_signed, read_jsonl, running, settings_for, wait_for
from .receiver import Receiver

OUTBOUND_SECRET = "whsec_" + "b3V0Ym91bmQtc2lnbmluZy1rZXktZm9yLXRlc3Rz"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def config(url: str, extra: str = "") -> str:
    return f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_field = "object"
entity_id_field = "data.id"
version_field = "data.version"

[sinks.crm]
connector = "http"
url = "{url}"
secret = "{OUTBOUND_SECRET}"
timeout = "2s"
{extra}

[[routes]]
from = "demo"
to = ["crm"]
"""


def db_rows(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(tmp_path / "var" / "integrand.db")
    try:
        return list(db.execute(sql))
    finally:
        db.close()


async def breaker_status(s: aiohttp.ClientSession, d: Daemon) -> str:
    async with s.get(admin_url(d, "/status")) as resp:
        return str((await resp.json())["breakers"]["crm"]["status"])


async def test_outage_then_recovery_delivers_everything_in_entity_order(tmp_path: Path, receiver: Receiver) -> None:
    # A long backoff (exactly base·2^(n-1) with rand=1) and few attempts: a delivery that went out
    # at the end of its backoff, or whose attempts the outage burned, would fail this test.
    extra = """
retry = { base = "30s", cap = "1h", max_attempts = 2 }
breaker = { failure_threshold = 3, open_for = "200ms", max_open_for = "500ms" }
"""
    settings = settings_for(tmp_path, config(receiver.url, extra))
    receiver.status = 503
    entities, versions = ["c1", "c2", "c3", "c4"], range(1, 9)
    async with running(settings) as d, aiohttp.ClientSession() as s:
        d.dispatcher.rand = lambda: 1.0
        for v in versions:
            for e in entities:
                payload = {"object": "customer", "data": {"id": e, "version": v}}
                status, _ = await post_signed(s, hook_url(d), payload, f"{e}-v{v}")
                assert status == 200
        await wait_for(lambda: _is_open(s, d), timeout=10)

        # Now the receiver is gone altogether: connection refused.
        await receiver.stop()
        await wait_for(
            lambda: bool(
                db_rows(tmp_path, "SELECT 1 FROM audit WHERE action = 'deferred' AND detail LIKE '%cannot reach%'")
            ),
            timeout=10,
        )
        failed_before_recovery = len(receiver.log)
        assert failed_before_recovery >= 3
        assert all(r.status == 503 for r in receiver.log)
        assert ("crm", "dead") not in await d.store.counts()
        # The deliveries that failed while the breaker was still closed are scheduled ≥ 30 s out.
        [(latest,)] = db_rows(tmp_path, "SELECT MAX(next_attempt_at) FROM deliveries WHERE state = 'ready'")
        assert latest > time.time() + 20

        # Back up, on the same port.
        receiver.status = 200
        await receiver.start()
        await wait_for(lambda: len(receiver.delivered()) >= len(entities) * len(versions), timeout=10)

        async def all_acked() -> bool:  # the receiver answers before the ack commits
            return (await d.store.counts()).get(("crm", "done")) == len(entities) * len(versions)

        await wait_for(all_acked)
        counts = await d.store.counts()
        assert counts.get(("crm", "done")) == len(entities) * len(versions)
        assert ("crm", "dead") not in counts
        assert await breaker_status(s, d) == "closed"

    got: dict[str, list[int]] = {}
    for ev in receiver.delivered():
        got.setdefault(ev["entity_id"], []).append(int(ev["version"]))
    assert got == {e: list(versions) for e in entities}
    [(max_attempts,)] = db_rows(tmp_path, "SELECT MAX(attempts) FROM deliveries")
    assert max_attempts <= 2


async def _is_open(s: aiohttp.ClientSession, d: Daemon) -> bool:
    return await breaker_status(s, d) in ("open", "half_open")


async def test_429_retry_after_is_honoured(tmp_path: Path, receiver: Receiver) -> None:
    receiver.per_event["slow-1"] = [(429, {"Retry-After": "1"})]
    settings = settings_for(tmp_path, config(receiver.url))
    async with running(settings) as d, aiohttp.ClientSession() as s:
        d.dispatcher.rand = lambda: 0.0  # no backoff of our own: only Retry-After can make it wait
        status, _ = await post_signed(s, hook_url(d), {"object": "x", "data": {"id": "1"}}, "slow-1")
        assert status == 200
        await wait_for(lambda: len(receiver.delivered()) == 1, timeout=10)
    first, second = receiver.log
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 0.95
    [(attempts, state)] = db_rows(tmp_path, "SELECT attempts, state FROM deliveries")
    assert (attempts, state) == (2, "done")


async def test_400_from_the_sink_dead_letters_at_once(tmp_path: Path, receiver: Receiver) -> None:
    receiver.per_event["bad-1"] = [(400, {"X-Request-Id": "req-42"})]
    settings = settings_for(tmp_path, config(receiver.url))
    async with running(settings) as d, aiohttp.ClientSession() as s:
        for msg_id in ("bad-1", "good-1"):
            status, _ = await post_signed(s, hook_url(d), {"object": "x", "data": {"id": msg_id}}, msg_id)
            assert status == 200
        await wait_for(lambda: len(receiver.delivered()) == 1, timeout=10)
        await wait_for(lambda: _has_dead(d), timeout=10)
        [dead] = await d.store.dead_letters()
        assert (dead.event_id, dead.sink, dead.attempts) == ("bad-1", "crm", 1)
        assert dead.last_error.startswith("PermanentError: HTTP 400 from " + receiver.url)
        assert "(request id req-42)" in dead.last_error
    assert [r.event["id"] for r in receiver.log].count("bad-1") == 1
    assert receiver.delivered()[0]["id"] == "good-1"


async def _has_dead(d: Daemon) -> bool:
    return bool(await d.store.dead_letters())


async def test_outbound_headers_are_signed_standard_webhooks(tmp_path: Path, receiver: Receiver) -> None:
    settings = settings_for(tmp_path, config(receiver.url, 'headers = { "X-Tenant" = "acme" }'))
    async with running(settings) as d, aiohttp.ClientSession() as s:
        before = time.time()
        status, _ = await post_signed(s, hook_url(d), {"object": "customer", "data": {"id": "7"}}, "msg_hdr")
        assert status == 200
        await wait_for(lambda: len(receiver.delivered()) == 1, timeout=10)
    [r] = receiver.log
    h = r.headers
    assert h["Content-Type"] == "application/json"
    assert h["Idempotency-Key"] == "demo:msg_hdr"
    assert h["webhook-id"] == "demo:msg_hdr"
    assert h["X-Tenant"] == "acme"
    assert int(before) - 1 <= int(h["webhook-timestamp"]) <= time.time() + 1
    assert signing.standard_verify([OUTBOUND_SECRET], h, r.body, time.time()) == "demo:msg_hdr"
    ev = r.event
    assert (ev["id"], ev["source"], ev["entity"], ev["entity_id"]) == ("msg_hdr", "demo", "customer", "7")


async def test_a_sink_that_is_down_delays_only_its_own_deliveries(tmp_path: Path, receiver: Receiver) -> None:
    extra = """
retry = { base = "30s", cap = "1h" }
breaker = { failure_threshold = 2, open_for = "300ms", max_open_for = "300ms" }

[sinks.archive]
connector = "jsonl"
path = "var/archive.jsonl"

[[routes]]
from = "demo"
to = ["archive"]
"""
    receiver.status = 503
    ids = [f"m{i}" for i in range(20)]
    async with running(settings_for(tmp_path, config(receiver.url, extra))) as d, aiohttp.ClientSession() as s:
        for i in ids:
            assert (await post_signed(s, hook_url(d), {"object": "x", "data": {"id": i}}, i))[0] == 200
        # Same events, two sinks: the archive gets everything while crm is down and its breaker open.
        await wait_for(lambda: {e["id"] for e in read_jsonl(tmp_path / "var" / "archive.jsonl")} == set(ids))
        await wait_for(lambda: _is_open(s, d), timeout=10)
        assert receiver.delivered() == []
        receiver.status = 200
        await wait_for(lambda: {e["id"] for e in receiver.delivered()} == set(ids), timeout=10)
