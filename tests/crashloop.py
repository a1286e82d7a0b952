"""The crash loop: ``integrand run`` killed with SIGKILL at random moments under load, restarted, then the
whole history checked (Jepsen-style: what every client was told against what every sink received).

Load: signed webhooks from ``entities`` senders, each sending its entity's versions one after another
(the next only once the previous is acknowledged, retrying through the daemon's death), plus a local
"list changed records" API that changes all the while and is polled. Both go to the idempotent
``jsonl`` sink. At each kill the database the dead process left is checked on the spot (integrity,
every acknowledged webhook stored, no poll cursor ahead of the events stored with it); after the last
round the daemon drains and the sink's file is checked: nothing acknowledged lost, nothing twice,
per-entity order kept, every polled record at its final version.

Used by ``tests/test_crash_loop.py`` (a few rounds) and ``bench/soak_crashloop.py`` (``make soak``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .daemon_proc import DaemonProcess
from .fake_rest import FakeRest
from .helpers import DEMO_SECRET, read_jsonl, signed_headers, wait_for

CONFIG = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "5s"

[admin]
enabled = false

[store]
busy_timeout = "60s"

[dispatcher]
workers = 4

[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{secret}"
entity_field = "object"
entity_id_field = "data.id"

[sources.crm]
connector = "http-poll"
url = "{api}/records?since={{since}}"
page_param = "after"
items = "$.results[*]"
id = "$.id"
updated = "$.updated_at"
next_page = "$.next"
entity = "contact"
lookback = "1s"

[sources.crm.poll]
min_interval = "20ms"
max_interval = "200ms"
target_latency = "100ms"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "demo"
to = ["out"]

[[routes]]
from = "crm"
to = ["out"]
"""


@dataclass
class Figures:
    rounds: int = 0
    kills_mid_poll: int = 0
    webhooks_acked: int = 0
    webhook_retries: int = 0
    polled_changes: int = 0
    lines_at_sink: int = 0
    events_checked: int = 0
    lost: int = 0
    duplicates: int = 0
    order_violations: int = 0
    cursor_ahead: int = 0
    acked_not_stored: int = 0
    integrity_failures: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "problems"}
        d["problems"] = self.problems[:20]
        return d


@dataclass
class Senders:
    """One task per entity: version n+1 only after n was acknowledged; retried until it is."""

    url: str = ""
    entities: int = 16
    acked: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    running: bool = True

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
            await asyncio.gather(*(self._entity(s, f"e{i:03d}") for i in range(self.entities)))

    async def _entity(self, s: aiohttp.ClientSession, entity: str) -> None:
        v = 1
        while self.running:
            body = orjson.dumps({"object": "customer", "data": {"id": entity, "version": v}})
            try:
                async with s.post(self.url, data=body, headers=signed_headers(body, f"{entity}-v{v}")) as r:
                    await r.read()
                    ok = r.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if ok:
                self.acked[entity] = v
                v += 1
            else:
                self.retries += 1
                await asyncio.sleep(0.02)  # the daemon is down or restarting: the sender's retry pace

    def acked_ids(self) -> set[str]:
        return {f"{e}-v{v}" for e, last in self.acked.items() for v in range(1, last + 1)}


def snapshot(db: Path) -> tuple[bool, set[str], Any, dict[str, str]]:
    """What a dead process left: integrity, webhook ids stored, the poll cursor, and per polled record the
    highest version stored."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = {r[0] for r in conn.execute("SELECT event_id FROM events WHERE source = 'demo'")}
        row = conn.execute("SELECT value FROM cursors WHERE source = 'crm' AND kind = 'poll'").fetchone()
        versions: dict[str, str] = {}
        for (body,) in conn.execute("SELECT body FROM events WHERE source = 'crm'"):
            ev = orjson.loads(body)
            rid, ver = ev["entity_id"], ev["version"]
            if ver > versions.get(rid, ""):
                versions[rid] = ver
    finally:
        conn.close()
    return ok, stored, (orjson.loads(row[0]) if row else None), versions


def cursor_ahead(cursor: Any, history: list[tuple[str, str]], stored: dict[str, str]) -> list[str]:
    """Records whose change at or before the committed cursor is not among the events stored with it."""
    if not cursor or not cursor.get("since"):
        return []
    since = str(cursor["since"])
    latest: dict[str, str] = {}
    for rid, stamp in history:
        if stamp <= since and stamp > latest.get(rid, ""):
            latest[rid] = stamp
    return [f"{rid}@{stamp} (stored {stored.get(rid)})" for rid, stamp in latest.items() if stored.get(rid, "") < stamp]


def check_sink(lines: list[dict[str, Any]], acked: set[str], api: FakeRest, f: Figures) -> None:
    keys = Counter(f"{ln['source']}:{ln['id']}" for ln in lines)
    f.lines_at_sink = len(lines)
    f.events_checked = len(keys)
    f.duplicates = sum(n - 1 for n in keys.values())
    if f.duplicates:
        f.problems.append(
            f"{f.duplicates} duplicates at the idempotent sink, e.g. {[k for k, n in keys.items() if n > 1][:5]}"
        )
    at_sink = {ln["id"] for ln in lines if ln["source"] == "demo"}
    lost = acked - at_sink
    f.lost = len(lost)
    if lost:
        f.problems.append(f"{len(lost)} acknowledged webhooks never delivered, e.g. {sorted(lost)[:5]}")
    last: dict[tuple[str, str], Any] = {}
    for ln in lines:
        order = ln["data"]["data"]["version"] if ln["source"] == "demo" else ln["version"]
        k = (ln["source"], ln["entity_id"])
        if k in last and last[k] >= order:
            f.order_violations += 1
            if f.order_violations <= 5:
                f.problems.append(f"{k}: {order} arrived after {last[k]}")
        last[k] = order
    finals = {rid: v for (src, rid), v in last.items() if src == "crm"}
    if finals != api.final_versions():
        missing = {r: v for r, v in api.final_versions().items() if finals.get(r) != v}
        f.lost += len(missing)
        f.problems.append(f"{len(missing)} polled records not at their final version, e.g. {list(missing.items())[:3]}")


async def crash_loop(
    workdir: Path,
    rounds: int,
    *,
    seed: int = 0,
    entities: int = 16,
    records: int = 40,
    run_for: tuple[float, float] = (0.3, 1.5),
    drain_timeout: float = 60.0,
) -> Figures:
    """Run the loop in ``workdir``; returns the figures (``problems`` empty when every property held)."""
    rng = random.Random(seed)
    started = time.monotonic()
    f = Figures()
    api = FakeRest(seed=seed, page_size=7)
    base = await api.start()
    cfg = workdir / "config.toml"
    cfg.write_text(CONFIG.format(secret=DEMO_SECRET, api=base))
    db, out = workdir / "var" / "integrand.db", workdir / "var" / "out.jsonl"
    daemon = DaemonProcess(cfg, workdir / "integrand.log")
    senders = Senders(entities=entities)
    kill_in_poll = asyncio.Event()
    original = api.list_records

    async def listing(request: web.Request) -> web.Response:
        # Some rounds end inside a poll: the daemon dies while its listing request is being answered.
        if kill_in_poll.is_set() and daemon.proc is not None and daemon.proc.returncode is None:
            kill_in_poll.clear()
            daemon.proc.kill()
            f.kills_mid_poll += 1
        return await original(request)

    api.list_records = listing  # type: ignore[method-assign]

    async def change_records() -> None:
        while True:
            await api.change(f"r{rng.randrange(records):03d}")
            await asyncio.sleep(rng.uniform(0.005, 0.03))  # the remote system's pace of change

    load: list[asyncio.Task[None]] = []
    try:
        await daemon.start()
        senders.url = daemon.url()
        load = [asyncio.create_task(senders.run()), asyncio.create_task(change_records())]
        for _ in range(rounds):
            await asyncio.sleep(rng.uniform(*run_for))  # a random moment: mid-commit, mid-delivery, mid-poll
            if f.rounds % 4 == 1:  # every fourth round ends inside a poll
                kill_in_poll.set()
                with contextlib.suppress(AssertionError):
                    await wait_for(lambda: daemon.proc is not None and daemon.proc.returncode is not None, timeout=5)
                kill_in_poll.clear()
            acked_before = senders.acked_ids()
            await daemon.kill()
            f.rounds += 1
            ok, stored, cursor, versions = await asyncio.to_thread(snapshot, db)
            if not ok:
                f.integrity_failures += 1
                f.problems.append(f"round {f.rounds}: PRAGMA integrity_check failed")
            missing = acked_before - stored
            if missing:
                f.acked_not_stored += len(missing)
                f.problems.append(f"round {f.rounds}: {len(missing)} acknowledged webhooks not in the store")
            ahead = cursor_ahead(cursor, list(api.versions), versions)
            if ahead:
                f.cursor_ahead += len(ahead)
                f.problems.append(f"round {f.rounds}: poll cursor {cursor} ahead of stored events: {ahead[:3]}")
            await daemon.start()
            senders.url = daemon.url()
        # Drain: no more changes, every sender's last version acknowledged, then wait for the sink.
        load[1].cancel()
        senders.running = False
        await asyncio.wait_for(load[0], 60)
        api.settle()
        acked = senders.acked_ids()

        def drained() -> bool:
            lines = read_jsonl(out)
            demo = {ln["id"] for ln in lines if ln["source"] == "demo"}
            crm = {ln["entity_id"]: ln["version"] for ln in lines if ln["source"] == "crm"}
            return demo >= acked and crm == api.final_versions()

        with contextlib.suppress(AssertionError):
            await wait_for(drained, timeout=drain_timeout, interval=0.1)
        daemon.signal(signal.SIGTERM)
        if await daemon.wait(30) != 0:
            f.problems.append("integrand did not exit 0 on SIGTERM after the last round")
        ok, _, _, _ = await asyncio.to_thread(snapshot, db)
        if not ok:
            f.integrity_failures += 1
            f.problems.append("final PRAGMA integrity_check failed")
        f.webhooks_acked = len(acked)
        f.webhook_retries = senders.retries
        f.polled_changes = len(api.versions)
        check_sink(read_jsonl(out), acked, api, f)
    finally:
        for t in load:
            t.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        await daemon.kill()
        await api.close()
    f.seconds = round(time.monotonic() - started, 1)
    return f
