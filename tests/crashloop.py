"""The crash loop: ``integrand run`` killed with SIGKILL at random moments under load, restarted, then the
whole history checked (Jepsen-style: what every client was told against what every sink received).

Load: signed webhooks from ``entities`` senders, each sending its entity's versions one after another
(the next only once the previous is acknowledged, retrying through the daemon's death), a local
"list changed records" API that changes all the while and is polled, and a publisher into a NATS
JetStream stream (the machine's server on 127.0.0.1:4222, a random stream deleted afterwards) that
integrand consumes with the ``nats`` streaming source. All three go to the idempotent ``jsonl`` sink.
Meanwhile the config file is rewritten and SIGHUP sent at random moments (each reload changes the
streaming source, the polled source and the sink, so it restarts all three); some kills land mid-reload.
At each kill the database the dead process left is checked on the spot (integrity, every acknowledged
webhook stored, no poll cursor or stream position ahead of the events stored with it); after the last
round the daemon drains and the sink's file is checked: nothing acknowledged lost (webhooks answered
200, messages the publisher got a PubAck for), nothing twice, per-entity order kept, every polled record
at its final version.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import orjson
from aiohttp import web
from nats.js.api import StreamConfig

from .daemon_proc import DaemonProcess
from .fake_rest import FakeRest
from .helpers import DEMO_SECRET, read_jsonl, signed_headers, wait_for

NATS_URL = "nats://127.0.0.1:4222"
NATS_HOW_TO_START = (
    "NATS with JetStream is not reachable on 127.0.0.1:4222; start it with: start-stop-daemon --start --oknodo "
    "--background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server "
    "-l /var/log/nats-server.log"
)

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
max_interval = "{max_interval}"
target_latency = "100ms"

[sources.bus]
connector = "nats"
servers = ["{nats}"]
stream = "{stream}"
durable = "integrand"
batch = {batch}
fetch_wait = "100ms"
ack_wait = "500ms"
format = "json"

[sources.bus.streaming]
backoff_base = "50ms"
backoff_cap = "500ms"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"
dedupe_window = {dedupe_window}

[[routes]]
from = "demo"
to = ["out"]

[[routes]]
from = "crm"
to = ["out"]

[[routes]]
from = "bus"
to = ["out"]
"""

# What a reload toggles: a changed streaming source, polled source and sink are each restarted by it.
VARIANTS = (
    {"max_interval": "200ms", "batch": 50, "dedupe_window": 65536},
    {"max_interval": "250ms", "batch": 64, "dedupe_window": 65535},
)


@dataclass
class Figures:
    rounds: int = 0
    kills_mid_poll: int = 0
    kills_mid_reload: int = 0
    reloads: int = 0
    reloads_done: int = 0
    webhooks_acked: int = 0
    webhook_retries: int = 0
    polled_changes: int = 0
    stream_acked: int = 0
    stream_publish_retries: int = 0
    lines_at_sink: int = 0
    events_checked: int = 0
    lost: int = 0
    duplicates: int = 0
    order_violations: int = 0
    cursor_ahead: int = 0
    acked_not_stored: int = 0
    integrity_failures: int = 0
    seconds: float = 0.0
    stopped_by_budget: bool = False
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


@dataclass
class Publisher:
    """One task per entity publishing its versions into JetStream; a version counts once it got a PubAck."""

    stream: str = ""
    entities: int = 8
    pace: tuple[float, float] = (0.01, 0.05)
    acked: dict[str, int] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)  # message id -> stream sequence, from the PubAck
    retries: int = 0
    running: bool = True

    async def run(self, js: Any, rng: random.Random) -> None:
        await asyncio.gather(*(self._entity(js, f"n{i:02d}", rng) for i in range(self.entities)))

    async def _entity(self, js: Any, entity: str, rng: random.Random) -> None:
        v = 1
        while self.running:
            mid = f"{entity}-v{v}"
            headers = {
                "Nats-Msg-Id": mid,  # a retry after a lost PubAck is absorbed by the stream's duplicate window
                "Integrand-Entity": "item",
                "Integrand-Entity-Id": entity,
                "Integrand-Version": str(v),
            }
            try:
                ack = await js.publish(f"{self.stream}.{entity}", orjson.dumps({"v": v}), headers=headers, timeout=5)
            except (nats.errors.Error, TimeoutError):
                self.retries += 1
                await asyncio.sleep(0.05)
                continue
            self.seqs[mid] = int(ack.seq)
            self.acked[entity] = v
            v += 1
            await asyncio.sleep(rng.uniform(*self.pace))

    def acked_ids(self) -> set[str]:
        return {f"{e}-v{v}" for e, last in self.acked.items() for v in range(1, last + 1)}


async def nats_stream() -> tuple[Any, Any, str]:
    """(connection, JetStream context, stream name): a random stream on the machine's NATS, taking ``NAME.>``."""
    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False)
        js = nc.jetstream()
        name = f"crash_{random.randbytes(4).hex()}"
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], duplicate_window=120.0))
    except (nats.errors.Error, OSError, TimeoutError) as e:
        raise AssertionError(f"{NATS_HOW_TO_START} ({type(e).__name__}: {e})") from None
    return nc, js, name


def write_config(path: Path, variant: int, **fields: Any) -> None:
    """Atomically, so a SIGHUP never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(CONFIG.format(**fields, **VARIANTS[variant % len(VARIANTS)]))
    tmp.replace(path)


def stream_ahead(position: Any, seqs: dict[str, int], stored: set[str]) -> list[str]:
    """Messages PubAck'ed at or below the committed stream position that are not in the store."""
    if position is None:
        return []
    return sorted(m for m, seq in seqs.items() if seq <= int(position) and m not in stored)


@dataclass
class Snapshot:
    ok: bool
    stored: set[str]  # webhook event ids
    cursor: Any
    versions: dict[str, str]  # polled record -> highest version stored
    bus: set[str]  # streamed message ids
    position: Any  # the stream position committed


def snapshot(db: Path) -> Snapshot:
    """What a dead process left: integrity, webhook and streamed ids stored, the poll cursor and stream
    position, and per polled record the highest version stored."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = {r[0] for r in conn.execute("SELECT event_id FROM events WHERE source = 'demo'")}
        bus = {r[0] for r in conn.execute("SELECT event_id FROM events WHERE source = 'bus'")}
        row = conn.execute("SELECT value FROM cursors WHERE source = 'crm' AND kind = 'poll'").fetchone()
        pos = conn.execute("SELECT value FROM cursors WHERE source = 'bus' AND kind = 'stream'").fetchone()
        versions: dict[str, str] = {}
        for (body,) in conn.execute("SELECT body FROM events WHERE source = 'crm'"):
            ev = orjson.loads(body)
            rid, ver = ev["entity_id"], ev["version"]
            if ver > versions.get(rid, ""):
                versions[rid] = ver
    finally:
        conn.close()
    return Snapshot(
        ok, stored, orjson.loads(row[0]) if row else None, versions, bus, orjson.loads(pos[0]) if pos else None
    )


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


def written_lines(path: Path) -> list[dict[str, Any]]:
    """The sink's complete lines while it is still writing: a batch being appended may be half there."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [orjson.loads(ln) for ln in data[: data.rfind(b"\n") + 1].splitlines() if ln.strip()]


def order_of(line: dict[str, Any]) -> Any:
    """What increases per entity: the sender's version, the polled record's stamp, the streamed version."""
    if line["source"] == "demo":
        return line["data"]["data"]["version"]
    if line["source"] == "bus":
        return int(line["version"])
    return line["version"]


@dataclass
class SinkWatch:
    """The sink's file checked as it grows, at each kill: duplicates and per-entity order so far, so a run
    stopped before its end still has figures for what it ran. Only complete lines are read; a torn last line
    (its write cut by the kill) is cut off by the restarted sink and written again, so the offset stays valid."""

    offset: int = 0
    keys: Counter[str] = field(default_factory=Counter)
    last: dict[tuple[str, str], Any] = field(default_factory=dict)
    duplicates: int = 0
    order_violations: int = 0

    def advance(self, path: Path) -> None:
        if not path.exists():
            return
        with path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for raw in data[:end].splitlines():
            if not raw.strip():
                continue
            ln = orjson.loads(raw)
            key = f"{ln['source']}:{ln['id']}"
            self.keys[key] += 1
            self.duplicates += self.keys[key] > 1
            order, k = order_of(ln), (ln["source"], ln["entity_id"])
            if k in self.last and self.last[k] >= order:
                self.order_violations += 1
            self.last[k] = order


def check_sink(
    lines: list[dict[str, Any]], acked: set[str], api: FakeRest, f: Figures, published: set[str] | None = None
) -> None:
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
    if published is not None:
        gone = published - {ln["id"] for ln in lines if ln["source"] == "bus"}
        f.lost += len(gone)
        if gone:
            f.problems.append(f"{len(gone)} PubAck'ed messages never delivered, e.g. {sorted(gone)[:5]}")
    last: dict[tuple[str, str], Any] = {}
    for ln in lines:
        order = order_of(ln)
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
    streamers: int = 8,
    run_for: tuple[float, float] = (0.3, 1.5),
    drain_timeout: float = 60.0,
    start_timeout: float = 20.0,
    kills: bool = True,
    reloads: bool = True,
    budget: float | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> Figures:
    """Run the loop in ``workdir``; returns the figures (``problems`` empty when every property held).

    ``budget``: seconds after which no new round starts (the drain and the whole-history check still run), so
    a long campaign on a slow machine ends with figures for the rounds it ran. ``on_round`` gets, after each
    kill, what has been checked so far (the per-kill checks, and duplicates and order at the sink so far)."""
    rng = random.Random(seed)
    started = time.monotonic()
    f = Figures()
    api = FakeRest(seed=seed, page_size=7)
    base = await api.start()
    nc, js, stream = await nats_stream()
    cfg = workdir / "config.toml"
    fields = {"secret": DEMO_SECRET, "api": base, "nats": NATS_URL, "stream": stream}
    variant = 0
    write_config(cfg, variant, **fields)
    db, out = workdir / "var" / "integrand.db", workdir / "var" / "out.jsonl"
    daemon = DaemonProcess(cfg, workdir / "integrand.log")
    senders = Senders(entities=entities)
    publisher = Publisher(stream=stream, entities=streamers)
    kill_in_poll = asyncio.Event()
    up = asyncio.Event()  # the daemon is ready: a SIGHUP now reloads (before its handler is set, it kills)
    original = api.list_records
    watch = SinkWatch()

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

    def hup() -> int:
        """Rewrite the config (the other variant) and send SIGHUP; returns how many reloads were logged before."""
        nonlocal variant
        variant += 1
        write_config(cfg, variant, **fields)
        done = daemon.output().count("reloaded ")
        daemon.signal(signal.SIGHUP)
        f.reloads += 1
        return done

    async def reload_now_and_then() -> None:
        while reloads:
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            await up.wait()
            if up.is_set():  # not cleared meanwhile: a SIGHUP before the restarted daemon's handler kills it
                # The daemon may have just been killed (from inside a poll): then this reload is not sent. Before,
                # the ProcessLookupError ended this task and the rest of a long run had no reloads at all.
                with contextlib.suppress(ProcessLookupError):
                    hup()

    load: list[asyncio.Task[None]] = []
    try:
        await daemon.start(timeout=start_timeout)
        up.set()
        senders.url = daemon.url()
        load = [
            asyncio.create_task(senders.run()),
            asyncio.create_task(change_records()),
            asyncio.create_task(publisher.run(js, random.Random(seed + 1))),
            asyncio.create_task(reload_now_and_then()),
        ]
        for _ in range(rounds):
            if budget is not None and time.monotonic() - started > budget:
                f.stopped_by_budget = True  # not a problem: the rounds run are drained and checked all the same
                break
            await asyncio.sleep(rng.uniform(*run_for))  # a random moment: mid-commit, mid-delivery, mid-poll
            if not kills:
                f.rounds += 1
                continue
            if f.rounds % 4 == 1:  # every fourth round ends inside a poll
                kill_in_poll.set()
                with contextlib.suppress(AssertionError):
                    await wait_for(lambda: daemon.proc is not None and daemon.proc.returncode is not None, timeout=5)
                kill_in_poll.clear()
            up.clear()
            if reloads and f.rounds % 4 == 3:  # and every fourth mid-reload: once the daemon has logged the SIGHUP

                def since_last_hup() -> str:
                    return daemon.output().rsplit("SIGHUP received", 1)[-1]

                with contextlib.suppress(AssertionError):  # the reloads sent before are done (none is sent now)
                    await wait_for(
                        lambda: "SIGHUP received" not in daemon.output() or "reloaded " in since_last_hup(),
                        timeout=30,
                    )
                seen = daemon.output().count("SIGHUP received")

                def logged_ours(n: int = seen) -> bool:
                    return daemon.output().count("SIGHUP received") > n

                hup()
                with contextlib.suppress(AssertionError):
                    await wait_for(logged_ours, timeout=30, interval=0.005)
                await asyncio.sleep(rng.uniform(0, 0.03))
                mid_reload = logged_ours() and "reloaded " not in since_last_hup()
            else:
                mid_reload = False
            acked_before = senders.acked_ids()
            await daemon.kill()
            f.rounds += 1
            f.kills_mid_reload += mid_reload
            snap = await asyncio.to_thread(snapshot, db)
            if not snap.ok:
                f.integrity_failures += 1
                f.problems.append(f"round {f.rounds}: PRAGMA integrity_check failed")
            missing = acked_before - snap.stored
            if missing:
                f.acked_not_stored += len(missing)
                f.problems.append(f"round {f.rounds}: {len(missing)} acknowledged webhooks not in the store")
            ahead = cursor_ahead(snap.cursor, list(api.versions), snap.versions)
            if ahead:
                f.cursor_ahead += len(ahead)
                f.problems.append(f"round {f.rounds}: poll cursor {snap.cursor} ahead of stored events: {ahead[:3]}")
            s_ahead = stream_ahead(snap.position, dict(publisher.seqs), snap.bus)
            if s_ahead:
                f.cursor_ahead += len(s_ahead)
                f.problems.append(f"round {f.rounds}: stream position {snap.position} ahead of stored: {s_ahead[:3]}")
            await asyncio.to_thread(watch.advance, out)
            if on_round is not None:
                on_round(
                    {
                        "round": f.rounds,
                        "seconds": round(time.monotonic() - started, 1),
                        "kills_mid_poll": f.kills_mid_poll,
                        "kills_mid_reload": f.kills_mid_reload,
                        "reloads": f.reloads,
                        "webhooks_acked": len(acked_before),
                        "stream_acked": sum(publisher.acked.values()),
                        "events_at_sink": len(watch.keys),
                        "duplicates_so_far": watch.duplicates,
                        "order_violations_so_far": watch.order_violations,
                        "acked_not_stored": f.acked_not_stored,
                        "cursor_ahead": f.cursor_ahead,
                        "integrity_failures": f.integrity_failures,
                    }
                )
            await daemon.start(timeout=start_timeout)
            up.set()
            senders.url = daemon.url()
        # Drain: no more changes or reloads, every sender's last version acknowledged, then wait for the sink.
        for task, what in ((load[1], "the polled API's changes"), (load[3], "the reloads")):
            if task.done() and not task.cancelled() and task.exception() is not None:
                f.problems.append(f"harness: {what} stopped early: {task.exception()!r}")
        load[1].cancel()
        load[3].cancel()
        senders.running = False
        publisher.running = False
        await asyncio.wait_for(asyncio.gather(load[0], load[2]), 60)
        api.settle()
        acked = senders.acked_ids()
        published = publisher.acked_ids()

        def drained() -> bool:
            lines = written_lines(out)
            demo = {ln["id"] for ln in lines if ln["source"] == "demo"}
            bus = {ln["id"] for ln in lines if ln["source"] == "bus"}
            crm = {ln["entity_id"]: ln["version"] for ln in lines if ln["source"] == "crm"}
            return demo >= acked and bus >= published and crm == api.final_versions()

        with contextlib.suppress(AssertionError):
            await wait_for(drained, timeout=drain_timeout, interval=0.1)
        daemon.signal(signal.SIGTERM)
        if await daemon.wait(30) != 0:
            f.problems.append("integrand did not exit 0 on SIGTERM after the last round")
        if not (await asyncio.to_thread(snapshot, db)).ok:
            f.integrity_failures += 1
            f.problems.append("final PRAGMA integrity_check failed")
        log = (workdir / "integrand.log").read_text(errors="replace")
        f.reloads_done = log.count("reloaded ")
        if "reload failed" in log or "reload of" in log:
            f.problems.append("a reload was rejected or failed: see integrand.log")
        f.webhooks_acked = len(acked)
        f.webhook_retries = senders.retries
        f.polled_changes = len(api.versions)
        f.stream_acked = len(published)
        f.stream_publish_retries = publisher.retries
        check_sink(read_jsonl(out), acked, api, f, published)
    finally:
        for t in load:
            t.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        await daemon.kill()
        await api.close()
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        await nc.close()
    f.seconds = round(time.monotonic() - started, 1)
    return f
