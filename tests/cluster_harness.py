"""Three (or more) real ``integrand run`` nodes on one PostgreSQL store, under load, killed and restarted.

Used by tests/test_cluster_failover.py (a few rounds) and bench/cluster_failover.py (a long campaign and
the failover figures). What it builds:

- a database of its own on 127.0.0.1:5432 (random name, dropped at the end), with a trigger that logs
  every committed cursor value (``cursor_log``), so "no cursor moved backwards" is checked on every
  commit, not on samples;
- polling sources ``crm0..`` against local fake APIs (tests/fake_rest.py) whose request log records
  which node asked (the User-Agent names it) and when each request started and ended;
- a signed webhook source ``demo`` whose events carry an entity and a version, sent by per-entity
  sequential senders to whichever nodes are up (so acknowledged order is version order);
- one idempotent HTTP sink endpoint (tests/receiver.py) that every node delivers to, so per-entity
  order is checked across nodes.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from .daemon_proc import DaemonProcess
from .fake_rest import FakeRest
from .helpers import DEMO_SECRET, signed_headers
from .pgdb import ADMIN_DSN, START_HINT
from .receiver import Receiver

NODE_IN_AGENT = re.compile(r"\(node ([^)]+)\)")

CURSOR_LOG = """
CREATE TABLE cursor_log (id BIGSERIAL PRIMARY KEY, source TEXT, kind TEXT, value BYTEA, at DOUBLE PRECISION);
CREATE FUNCTION log_cursor() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO cursor_log (source, kind, value, at) VALUES (NEW.source, NEW.kind, NEW.value, NEW.updated_at);
  RETURN NEW;
END $$;
CREATE TRIGGER cursor_logged AFTER INSERT OR UPDATE ON cursors FOR EACH ROW EXECUTE FUNCTION log_cursor();
"""


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A new database of its own (random name), dropped afterwards even if nodes still hold connections."""
    name = f"integrand_cluster_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(ADMIN_DSN, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as e:
        raise AssertionError(
            f"PostgreSQL on 127.0.0.1:5432 is unreachable ({type(e).__name__}: {e}); {START_HINT}"
        ) from None
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin = await asyncpg.connect(ADMIN_DSN, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@dataclass
class Asked:
    node: str
    start: float
    end: float = 0.0


class NodeLoggingRest(FakeRest):
    """The fake API, recording which node asked and when each request started and ended."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.asked: list[Asked] = []
        self.hold_node: str | None = None  # requests from this node wait for ``release`` (the SIGSTOP test)
        self.release = asyncio.Event()
        self.held = asyncio.Event()

    async def list_records(self, request: web.Request) -> web.Response:
        m = NODE_IN_AGENT.search(request.headers.get("User-Agent", ""))
        a = Asked(m.group(1) if m else "?", time.time())
        self.asked.append(a)
        if self.hold_node is not None and a.node == self.hold_node:
            self.held.set()
            await self.release.wait()
        try:
            return await super().list_records(request)
        finally:
            a.end = time.time()


def node_config(apis: list[str], sink_url: str, *, ttl: float, extra: str = "", admin: bool = False) -> str:
    polls = "".join(
        f"""
[sources.crm{i}]
connector = "http-poll"
url = "{base}/records?since={{since}}"
page_param = "after"
items = "$.results[*]"
id = "$.id"
updated = "$.updated_at"
next_page = "$.next"
deleted = "$.archived"
entity = "contact"
lookback = "1s"

[sources.crm{i}.poll]
min_interval = "100ms"
max_interval = "400ms"
target_latency = "200ms"

[[routes]]
from = "crm{i}"
to = ["out"]
"""
        for i, base in enumerate(apis)
    )
    admin_keys = 'listen = "127.0.0.1:0"' if admin else "enabled = false"  # the CLI's unix socket comes with it
    return f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "5s"

[admin]
{admin_keys}

[store]
backend = "postgres"
dsn = {{env = "INTEGRAND_CLUSTER_DSN"}}
pool_size = 4

[cluster]
lease_ttl = "{ttl}s"

[dispatcher]
workers = 4
lease = "30s"

[dispatcher.retry]
base = "200ms"
cap = "1s"

[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_field = "entity"
entity_id_field = "key"
version_field = "v"

[sinks.out]
connector = "http"
url = "{sink_url}"

[[routes]]
from = "demo"
to = ["out"]
{polls}
{extra}
"""


@dataclass
class Round:
    """One kill: when, which node, what it held, and when each was taken up elsewhere."""

    node: str
    killed_at: float
    sources: list[str]
    deliveries: list[int]
    source_failover: dict[str, float] = field(default_factory=dict)  # source → seconds until polled elsewhere
    deliveries_done: float | None = None  # seconds until every delivery it had leased was done


class Cluster:
    def __init__(
        self,
        tmp: Path,
        dsn: str,
        *,
        nodes: int = 3,
        sources: int = 3,
        ttl: float = 2.0,
        seed: int = 0,
        admin: bool = False,
    ):
        self.tmp = tmp
        self.admin = admin
        self.dsn = dsn
        self.n_nodes = nodes
        self.n_sources = sources
        self.ttl = ttl
        self.rng = random.Random(seed)
        self.apis = [NodeLoggingRest(seed=seed * 10 + i, page_size=20) for i in range(sources)]
        self.sink = Receiver()
        self.nodes: list[DaemonProcess] = []
        self.node_ids: dict[int, str] = {}  # pid → node id
        self.acked: dict[str, tuple[str, int]] = {}  # webhook id → (entity key, version)
        self.sent = 0
        self.refused = 0
        self.rounds: list[Round] = []
        self._stop = asyncio.Event()
        self._load: list[asyncio.Task[None]] = []
        self.db: asyncpg.Pool[asyncpg.Record] | None = None  # a pool: rounds are measured concurrently

    # --- set up and tear down -------------------------------------------------------------------

    async def start(self) -> None:
        bases = [await api.start() for api in self.apis]
        await self.sink.start()
        cfg_body = node_config(bases, self.sink.url, ttl=self.ttl, admin=self.admin)
        env = {"INTEGRAND_CLUSTER_DSN": self.dsn}
        for i in range(self.n_nodes):
            d = self.tmp / f"n{i}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.toml").write_text(cfg_body)
            self.nodes.append(DaemonProcess(d / "config.toml", self.tmp / f"n{i}.log", env=env))
        await self.nodes[0].start(timeout=60)  # migrates the schema; then the cursor log goes in
        self.db = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4)
        await self.db.execute(CURSOR_LOG)
        await asyncio.gather(*(n.start(timeout=60) for n in self.nodes[1:]))
        await self._learn_ids()

    async def _learn_ids(self) -> None:
        assert self.db is not None
        for r in await self.db.fetch("SELECT node_id, pid FROM nodes"):
            self.node_ids[r["pid"]] = r["node_id"]

    async def close(self) -> None:
        self._stop.set()
        for t in self._load:
            t.cancel()
        await asyncio.gather(*self._load, return_exceptions=True)
        for n in self.nodes:
            await n.kill()
        if self.db is not None:
            await self.db.close()
        await self.sink.stop()
        for api in self.apis:
            await api.close()

    # --- load -----------------------------------------------------------------------------------

    def start_load(self, *, entities: int = 40, senders: int = 8, changes_per_second: float = 6.0) -> None:
        keys = [f"k{i}" for i in range(entities)]
        for s in range(senders):
            self._load.append(asyncio.create_task(self._sender(keys[s::senders])))
        self._load.append(asyncio.create_task(self._changer(changes_per_second)))

    async def _sender(self, keys: list[str]) -> None:
        """One webhook at a time per entity, retried at another node until acknowledged (as a provider does)."""
        version = dict.fromkeys(keys, 0)
        ids = itertools.count()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while not self._stop.is_set():
                key = self.rng.choice(keys)
                version[key] += 1
                msg_id = f"w_{key}_{version[key]}_{next(ids)}"
                body = orjson.dumps({"type": "thing.updated", "entity": "thing", "key": key, "v": version[key]})
                self.sent += 1
                for _attempt in range(50):
                    up = [n for n in self.nodes if n.proc is not None and n.proc.returncode is None and n.port]
                    node = self.rng.choice(up) if up else None
                    if node is not None:
                        try:
                            async with session.post(
                                node.url(), data=body, headers=signed_headers(body, msg_id)
                            ) as resp:
                                await resp.read()
                                if 200 <= resp.status < 300:
                                    self.acked[msg_id] = (key, version[key])
                                    break
                        except (TimeoutError, aiohttp.ClientError):
                            pass
                    self.refused += 1
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.01)

    async def _changer(self, per_second: float) -> None:
        """The remote systems change: a record of a random API every 1/rate seconds."""
        while not self._stop.is_set():
            api = self.rng.choice(self.apis)
            await api.change(f"c{self.rng.randrange(30)}")
            await asyncio.sleep(self.rng.expovariate(per_second))

    async def stop_load(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._load, return_exceptions=True)
        self._load = []

    # --- kills ----------------------------------------------------------------------------------

    def node_id(self, n: DaemonProcess) -> str:
        return self.node_ids.get(n.pid, "?")

    async def kill_one(self, index: int | None = None) -> Round:
        """kill -9 a node (random unless given) and note what it held at that moment."""
        assert self.db is not None
        i = self.rng.randrange(len(self.nodes)) if index is None else index
        victim = self.nodes[i]
        nid = self.node_id(victim)
        victim.proc.kill()  # type: ignore[union-attr]
        killed_at = time.time()
        await victim.proc.wait()  # type: ignore[union-attr]
        held = [
            r[0].removeprefix("source:")
            for r in await self.db.fetch(
                "SELECT name FROM leases WHERE owner = $1 AND expires_at > integrand_now()", nid
            )
        ]
        leased = [
            r[0]
            for r in await self.db.fetch(
                "SELECT d.id FROM deliveries d JOIN nodes n ON starts_with(d.lease_owner, n.store_owner || '.') "
                "WHERE n.node_id = $1 AND d.state = 'leased'",
                nid,
            )
        ]
        rnd = Round(nid, killed_at, held, leased)
        self.rounds.append(rnd)
        return rnd

    async def restart(self, index: int) -> None:
        await self.nodes[index].start(timeout=60)
        await self._learn_ids()

    async def measure(self, rnd: Round, timeout: float) -> None:
        """Wait until the victim's sources were polled by another node and its deliveries are done."""
        assert self.db is not None
        deadline = time.time() + timeout
        while time.time() < deadline:
            for s in rnd.sources:
                if s in rnd.source_failover:
                    continue
                api = self.apis[int(s.removeprefix("crm"))]
                first = next((a for a in api.asked if a.start > rnd.killed_at and a.node != rnd.node), None)
                if first is not None:
                    rnd.source_failover[s] = first.start - rnd.killed_at
            if rnd.deliveries_done is None:
                # When the last of them was marked done (its row's time: one machine, one clock), however late we look.
                row = await self.db.fetchrow(
                    "SELECT count(*) FILTER (WHERE state <> 'done'), max(updated_at) FROM deliveries "
                    "WHERE id = ANY($1::bigint[])",
                    rnd.deliveries,
                )
                assert row is not None
                left, last = row[0], row[1]
                if left == 0:
                    rnd.deliveries_done = last - rnd.killed_at if rnd.deliveries else 0.0
            if rnd.deliveries_done is not None and len(rnd.source_failover) == len(rnd.sources):
                return
            await asyncio.sleep(0.05)

    # --- the verdict ----------------------------------------------------------------------------

    async def settle(self, timeout: float) -> None:
        """Every acknowledged webhook and every final version of every record reached the sink."""
        for api in self.apis:
            api.settle()
        deadline = time.monotonic() + timeout
        while True:
            problems = self.missing()
            if not problems:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not delivered after {timeout:.0f} s: {problems[:5]} …({len(problems)})")
            await asyncio.sleep(0.2)

    def first_deliveries(self) -> list[dict[str, Any]]:
        """What an idempotent sink keeps: the first successful delivery of each event."""
        seen: set[str] = set()
        out = []
        for ev in self.sink.delivered():
            if ev["id"] not in seen:
                seen.add(ev["id"])
                out.append(ev)
        return out

    def missing(self) -> list[str]:
        got = self.first_deliveries()
        ids = {(e["source"], e["id"]) for e in got}
        problems = [f"webhook {i}" for i in self.acked if ("demo", i) not in ids]
        final: dict[tuple[str, str], str] = {}
        for e in got:
            if e["source"].startswith("crm"):
                final[(e["source"], e["entity_id"])] = e["version"]
        for i, api in enumerate(self.apis):
            for rid, v in api.final_versions().items():
                if final.get((f"crm{i}", rid)) != v:
                    problems.append(f"crm{i} {rid} at {v} (sink has {final.get((f'crm{i}', rid))})")
        return problems

    async def verdict(self) -> dict[str, Any]:
        """Check the campaign's guarantees; returns its counts (AssertionError names what broke)."""
        assert self.db is not None
        got = self.first_deliveries()
        # per-entity order across nodes: each entity's first deliveries in version order
        last: dict[tuple[str, str], Any] = {}
        for e in got:
            if e.get("entity_id") is None:
                continue
            k = (e["source"], e["entity_id"])
            v = int(e["version"]) if e["source"] == "demo" else e["version"]
            assert k not in last or last[k] < v, f"{k}: version {v} delivered after {last[k]}"
            last[k] = v
        # no cursor ever moved backwards, on any commit
        since: dict[str, str] = {}
        commits = 0
        for r in await self.db.fetch("SELECT source, value FROM cursor_log WHERE kind = 'poll' ORDER BY id"):
            commits += 1
            value = orjson.loads(r["value"])
            s = value.get("since") if isinstance(value, dict) else None
            if s is None:
                continue
            assert since.get(r["source"], "") <= s, (
                f"cursor of {r['source']} moved back: {s} after {since[r['source']]}"
            )
            since[r["source"]] = s
        # each source polled by at most one node at any moment
        overlaps = 0
        for i, api in enumerate(self.apis):
            asked = sorted((a for a in api.asked if a.end), key=lambda a: a.start)
            for prev, nxt in itertools.pairwise(asked):
                if prev.node != nxt.node and prev.end > nxt.start:
                    overlaps += 1
                    raise AssertionError(f"crm{i}: {prev.node} and {nxt.node} polled at once: {prev} {nxt}")
            assert all(a.node != "?" for a in asked), "a poll without a node in its User-Agent"
        dups = Counter(e["id"] for e in self.sink.delivered())
        return {
            "webhooks_acked": len(self.acked),
            "webhooks_sent": self.sent,
            "polled_versions": sum(len(api.versions) for api in self.apis),
            "delivered_events": len(got),
            "redelivered_to_idempotent_sink": sum(n - 1 for n in dups.values() if n > 1),
            "cursor_commits_checked": commits,
            "poll_requests": sum(len(api.asked) for api in self.apis),
            "kills": len(self.rounds),
        }
