"""Crash safety: ``kill -9`` mid-stream loses nothing that was acknowledged, and redelivers only what was in flight."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections import Counter
from pathlib import Path

import aiohttp

from .daemon_proc import DaemonProcess, jsonl_ids, send_many
from .helpers import DEMO, DEMO_SECRET, post_signed, wait_for, write_config
from .receiver import Receiver

BASE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "5s"

[admin]
enabled = false

[dispatcher]
workers = 4
"""

TOTAL = 3000
KILL_AFTER = 1200


def db_snapshot(db: Path) -> tuple[set[str], set[str]]:
    """(event ids stored, event ids whose delivery was leased — in flight — at the moment of the crash)."""
    conn = sqlite3.connect(db)
    try:
        stored = {r[0] for r in conn.execute("SELECT event_id FROM events")}
        leased = {
            r[0]
            for r in conn.execute(
                "SELECT e.event_id FROM deliveries d JOIN events e ON e.id = d.event WHERE d.state = 'leased'"
            )
        }
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()
    return stored, leased


async def test_kill_9_mid_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    config = write_config(tmp_path, DEMO, BASE)
    out = tmp_path / "var" / "out.jsonl"
    db = tmp_path / "var" / "integrand.db"
    daemon = DaemonProcess(config, tmp_path / "integrand.log")
    ids = [f"msg_{i:05d}" for i in range(TOTAL)]
    try:
        await daemon.start()
        acked, unacked = await send_many(daemon.url(), ids, stop_after_acks=KILL_AFTER, on_enough=daemon.kill)
        assert daemon.proc is not None and daemon.proc.returncode == -signal.SIGKILL
        assert len(acked) >= KILL_AFTER
        assert unacked, "the kill came after every request had been answered; nothing was in flight"

        # Persist, then acknowledge: every 2xx is in the store the dead process left behind.
        stored, in_flight = db_snapshot(db)
        assert acked <= stored, f"{len(acked - stored)} acknowledged webhooks are not in the store"
        # The kill may have cut the sink's last write short: that line was never acknowledged (restart cuts it).
        at_sink_before = Counter(jsonl_ids(out, torn_tail_ok=True))

        # Restart; senders retry what was not acknowledged (a duplicate of a stored one is a 2xx no-op).
        await daemon.start()
        retried, still_failing = await send_many(daemon.url(), sorted(unacked))
        assert not still_failing
        assert retried == unacked
        await wait_for(lambda: set(jsonl_ids(out)) >= set(ids), timeout=30, interval=0.1)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.kill()

    at_sink = Counter(jsonl_ids(out))
    assert set(at_sink) == set(ids)
    duplicated = {i for i, n in at_sink.items() if n > 1}
    # At-least-once: only deliveries that were leased (in flight to the sink) when the process died come twice,
    # and no more than twice.
    assert duplicated <= in_flight, f"duplicates that were not in flight: {sorted(duplicated - in_flight)[:10]}"
    assert max(at_sink.values()) <= 2
    assert all(at_sink_before[i] == 1 for i in duplicated)
    _, leased_after = db_snapshot(db)
    assert not leased_after


async def test_sigterm_mid_stream_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, DEMO, BASE)
    out = tmp_path / "var" / "out.jsonl"
    daemon = DaemonProcess(config, tmp_path / "integrand.log")
    ids = [f"msg_{i:05d}" for i in range(TOTAL // 2)]
    try:
        await daemon.start()
        acked, unacked = await send_many(
            daemon.url(), ids, stop_after_acks=KILL_AFTER // 2, on_enough=lambda: daemon.signal(signal.SIGTERM)
        )
        assert await daemon.wait() == 0
        assert unacked, "SIGTERM came after every request had been answered"
        stored, leased = db_snapshot(db := tmp_path / "var" / "integrand.db")
        assert acked <= stored
        assert not leased

        await daemon.start()
        retried, still_failing = await send_many(daemon.url(), sorted(unacked))
        assert retried == unacked and not still_failing
        await wait_for(lambda: set(jsonl_ids(out)) >= set(ids), timeout=30, interval=0.1)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.kill()
    at_sink = Counter(jsonl_ids(out))
    assert set(at_sink) == set(ids)
    # A clean stop finishes what it leased and records it: nothing is delivered twice.
    assert [i for i, n in at_sink.items() if n > 1] == []
    assert db_snapshot(db)[1] == set()


ORDERED = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_field = "object"
entity_id_field = "data.id"
version_field = "data.version"

[sinks.crm]
connector = "http"
url = "{{url}}"
timeout = "5s"

[[routes]]
from = "demo"
to = ["crm"]
"""


async def send_in_order(url: str, entity: str, versions: range, stop: asyncio.Event) -> list[int]:
    """One entity's versions, each sent only after the previous one was acknowledged; returns the acknowledged."""
    acked: list[int] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for v in versions:
            if stop.is_set():
                break
            payload = {"object": "customer", "data": {"id": entity, "version": v}}
            try:
                status, _ = await post_signed(s, url, payload, f"{entity}-v{v}")
            except (TimeoutError, aiohttp.ClientError):
                break
            if status != 200:
                break
            acked.append(v)
    return acked


async def test_kill_9_keeps_per_entity_order_at_an_http_sink(tmp_path: Path) -> None:
    receiver = Receiver()
    await receiver.start()
    config = write_config(tmp_path, ORDERED.format(url=receiver.url), BASE)
    daemon = DaemonProcess(config, tmp_path / "integrand.log")
    entities, versions = [f"c{i}" for i in range(12)], range(1, 41)
    try:
        await daemon.start()
        stop = asyncio.Event()

        async def kill_when_enough() -> None:
            await wait_for(lambda: len(receiver.delivered()) >= 150, timeout=30)
            await daemon.kill()
            stop.set()

        killer = asyncio.create_task(kill_when_enough())
        acked = await asyncio.gather(*(send_in_order(daemon.url(), e, versions, stop) for e in entities))
        await killer
        _, in_flight = db_snapshot(tmp_path / "var" / "integrand.db")

        # Restart; each sender resumes after its last acknowledged version.
        await daemon.start()
        resumed = await asyncio.gather(
            *(
                send_in_order(daemon.url(), e, range(len(a) + 1, 41), asyncio.Event())
                for e, a in zip(entities, acked, strict=True)
            )
        )
        assert all(len(a) + len(r) == len(versions) for a, r in zip(acked, resumed, strict=True))
        await wait_for(
            lambda: {(e["id"]) for e in receiver.delivered()} >= {f"{e}-v{v}" for e in entities for v in versions},
            timeout=30,
        )
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.kill()
        await receiver.stop()

    seen: dict[str, list[int]] = {}
    for ev in receiver.delivered():
        seen.setdefault(ev["entity_id"], []).append(int(ev["version"]))
    for e in entities:
        got = seen[e]
        assert got == sorted(got), f"{e}: an older version arrived after a newer one: {got}"
        assert sorted(set(got)) == list(versions)
        again = {f"{e}-v{v}" for v in got if got.count(v) > 1}
        assert again <= in_flight, f"{e}: redelivered though not in flight: {again - in_flight}"
