"""The crm-sync case study under load: change → all sinks confirmed, integrand's own time per step, consistency, errors.

    .venv/bin/python bench/crm_sync.py [--runs 3] [--steady 150] [--rate 5] [--burst 100] [--latency 0.05 0.3]

Runs `integrand run` on the examples/crm-sync saga (Salesforce Contact → HubSpot contact → CRM
customer with the HubSpot id → both ids back on the Contact) with **shipped defaults** (the demo's
short retry backoff is taken out) against the three local fakes of plugins/demo_crm_sync.py. Every
provider call goes through a timing proxy in this process that adds a provider latency drawn
uniformly from ``--latency`` (50 to 300 ms by default) and injects faults: Salesforce 503s, HubSpot 429s
with Retry-After, CRM 503s, a dropped CDC stream (scenario ``cdc``), and dropped Outbound Messages
(scenario ``outbound``: 5 % never sent; a reconciliation pass afterwards catches them). Contacts are
created in Salesforce steadily (``--rate`` per second), then ``--burst`` at once (``cdc`` only).

What is measured, all from the proxies' timestamps (one process, one ``perf_counter`` clock):

- change → all sinks confirmed: from the Contact's creation in the fake to the end of the proxy's
  answer to the confirming Salesforce write (the saga's last step);
- provider time: the proxies' request-in → answer-out of a saga's four calls (the record fetch and
  the three steps), injected latency included;
- integrand's own time per step: for a saga whose calls all succeeded first time, the gap between
  one call's answer leaving the proxy and the saga's next call arriving at a proxy — receiving and
  parsing the answer, committing the saga's state (one fsynced store write), mapping, validating,
  signing and sending the next step. It is an upper bound: the proxy's own write of the answer and
  the client's rate limiter (HubSpot: 100 requests / 10 s, client-side) are counted as integrand's;
- consistency: records that differ between the three systems at the end (after reconciliation);
- error rate: sagas dead-lettered (compensated or needing a person) — the transient faults must
  cost none.

Writes bench/crm_sync.json; docs/benchmarks.md quotes it with the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("demo_crm_sync", ROOT / "plugins" / "demo_crm_sync.py")
assert spec is not None and spec.loader is not None
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

NO_FAULTS = False
HOP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def summary(xs: list[float]) -> dict[str, float]:
    return {k: round(pct(xs, q), 2) for k, q in (("p50", 50), ("p95", 95), ("p99", 99))} | {"n": len(xs)}


@dataclass
class Call:
    provider: str
    method: str
    path: str
    key: str | None
    t_in: float
    t_out: float
    status: int
    faulted: bool


@dataclass
class Proxy:
    """A provider's front door: latency, scripted faults, and a timestamp for every call."""

    name: str
    upstream: str
    latency: tuple[float, float]
    rng: random.Random
    key_of: Callable[[str, str, Any, bytes], str | None]
    calls: list[Call] = field(default_factory=list)
    faults: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # for the next writes
    session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t_in = time.perf_counter()
        body = await request.read()
        try:
            key = self.key_of(request.method, request.path, request.query, body)
        except Exception:
            key = None
        if self.faults and not NO_FAULTS and request.method in ("POST", "PATCH") and "/oauth2/" not in request.path:
            status, headers = self.faults.pop(0)
            await asyncio.sleep(self.rng.uniform(*self.latency))
            self.calls.append(
                Call(self.name, request.method, request.path, key, t_in, time.perf_counter(), status, True)
            )
            payload = b'[{"message": "injected fault", "errorCode": "SERVER_UNAVAILABLE"}]'
            if self.name == "hubspot":
                payload = b'{"status": "error", "message": "injected", "category": "RATE_LIMITS"}'
            return web.Response(body=payload, status=status, headers=headers, content_type="application/json")
        await asyncio.sleep(self.rng.uniform(*self.latency))
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with self.session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers, allow_redirects=False
        ) as r:
            answer = await r.read()
            out_headers = {k: v for k, v in r.headers.items() if k.lower() not in HOP}
            status = r.status
        self.calls.append(Call(self.name, request.method, request.path, key, t_in, time.perf_counter(), status, False))
        return web.Response(body=answer, status=status, headers=out_headers)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def run_once(args: argparse.Namespace, scenario: str, seed: int) -> dict[str, Any]:
    from integrand_hubspot.fake import FakeHubSpot
    from integrand_salesforce.testing import fake_salesforce

    from integrand.testing import fake_api_server, wait_for

    work = Path(args.work or ROOT / "var") / f"bench-crm-{scenario}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(seed)
    lat = (args.latency[0], args.latency[1])
    hs = FakeHubSpot()
    await hs.start()
    crm = demo.FakeCRM(demo.CRM_SECRET)
    id2key: dict[str, str] = {}
    created: dict[str, tuple[str, float]] = {}  # key → (record id, created at, perf_counter)

    def sf_key(method: str, path: str, query: Any, body: bytes) -> str | None:
        if "/sobjects/Contact/Integration_Key__c/" in path:
            return path.rsplit("/", 1)[-1]
        if path.endswith("/composite/sobjects/Contact") and method == "GET":  # the saga's record fetch
            ids = str(query.get("ids", "")).split(",")
            return id2key.get(ids[0]) if len(ids) == 1 else None
        return None

    def hs_key(method: str, path: str, query: Any, body: bytes) -> str | None:
        if path.endswith("/batch/upsert"):
            email = str(orjson.loads(body)["inputs"][0]["id"])
            return "C-" + email.split("@")[0][1:]
        return None

    def crm_key(method: str, path: str, query: Any, body: bytes) -> str | None:
        return str((orjson.loads(body).get("data") or {}).get("external_key")) or None

    async with (
        fake_salesforce(pubsub=(scenario == "cdc")) as sf,
        fake_api_server(crm.app()) as crm_url,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        if sf.pubsub is not None:
            sf.pubsub.enable("Contact", demo.CONTACT_FIELDS)
        proxies = {
            "salesforce": Proxy("salesforce", sf.fake.my_domain_url, lat, rng, sf_key, session=session),
            "hubspot": Proxy("hubspot", hs.url, lat, rng, hs_key, session=session),
            "crm": Proxy("crm", crm_url, lat, rng, crm_key, session=session),
        }
        runners = []
        urls = {}
        for name, p in proxies.items():
            runner, url = await serve(p.app())
            runners.append(runner)
            urls[name] = url
        sf.fake.my_domain_url = urls["salesforce"]  # the token answers' instance_url: every API call via the proxy
        cfg = work / "config.toml"
        cfg.write_text(
            demo.config(
                sf, hs, urls["crm"], hubspot_url=urls["hubspot"], feed=scenario, tuned=False, admin=scenario != "cdc"
            )
        )
        load_before = load()
        proc, port = await demo.start_integrand(cfg)
        results: dict[str, Any] = {"scenario": scenario, "seed": seed}
        try:
            if sf.pubsub is not None:
                await wait_for(lambda: sf.pubsub is not None and sf.pubsub.subscribes >= 1, timeout=30)
            hook = f"http://127.0.0.1:{port}/hooks/salesforce"
            n = 0
            dropped: list[str] = []
            sends: set[asyncio.Task[Any]] = set()

            def make(phase: str) -> None:
                nonlocal n
                n += 1
                key = f"C-{n}"
                rec = sf.fake.create(
                    "Contact", FirstName=f"F{n}", LastName=f"L{n}", Email=f"c{n}@example.com", Integration_Key__c=key
                )
                id2key[rec["Id"]] = key
                created[key] = (rec["Id"], time.perf_counter())
                phases[key] = phase
                if scenario == "outbound":
                    drop = n % 20 == 0
                    if drop:
                        dropped.append(key)
                    t = asyncio.create_task(sf.fake.send_outbound(hook, "Contact", [rec["Id"]], drop=drop))
                    sends.add(t)
                    t.add_done_callback(sends.discard)

            phases: dict[str, str] = {}
            started = time.perf_counter()
            for i in range(args.steady):
                make("steady")
                if i == args.steady // 4:
                    proxies["salesforce"].faults += [(503, {})] * 3
                if i == args.steady // 3:
                    proxies["hubspot"].faults += [(429, {"Retry-After": "1"})] * 3
                if i == args.steady // 2 and sf.pubsub is not None:
                    sf.pubsub.disconnect()
                if i == 2 * args.steady // 3:
                    proxies["crm"].faults += [(503, {})] * 3
                await asyncio.sleep(1 / args.rate)
            if scenario == "cdc":
                for _ in range(args.burst):
                    make("burst")
                assert sf.pubsub is not None
                sf.pubsub.disconnect()
                proxies["crm"].faults += [(503, {})] * 3
                proxies["hubspot"].faults += [(429, {"Retry-After": "1"})] * 3

            def confirmed_keys() -> set[str]:
                return {
                    c.key
                    for c in proxies["salesforce"].calls
                    if c.method == "PATCH" and c.status in (200, 201, 204) and c.key
                }

            want = set(created) - set(dropped)
            with contextlib.suppress(AssertionError):
                await wait_for(lambda: want <= confirmed_keys(), timeout=args.timeout, interval=0.05)
            load_during = load()
            if scenario == "outbound":
                while sends:
                    await asyncio.gather(*list(sends), return_exceptions=True)
                t_rec = time.perf_counter()
                rc = await (
                    await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "integrand.cli", "reconcile", "salesforce", "--window", "1h",
                        "--config", str(cfg), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                    )
                ).wait()  # fmt: skip
                results["reconcile_exit"] = rc
                with contextlib.suppress(AssertionError):
                    await wait_for(lambda: set(created) <= confirmed_keys(), timeout=args.timeout, interval=0.05)
                results["reconcile_caught_s"] = round(time.perf_counter() - t_rec, 2)
                results["dropped_outbound_messages"] = len(dropped)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(1.0)
            results["daemon_cpu_s"] = round(process_cpu(proc.pid), 2)
        finally:
            await demo.stop_integrand(proc)
            for runner in runners:
                await runner.cleanup()
            await hs.stop()
        results |= analyse(proxies, created, phases, set(dropped))
        for phase, figures in internal_overhead(work / "integrand.db", phases).items():
            if phase in results:
                results[phase] |= figures
        results["elapsed_s"] = round(elapsed, 1)
        results["load"] = {"before": load_before, "end_of_load": load_during, "cpus": os.cpu_count()}
        results["dead_letters"] = dead_letters(work / "integrand.db")
        results["sagas_per_contact"] = sagas_per_contact(work / "integrand.db")
        results["later_sagas_steps"] = later_saga_steps(work / "integrand.db")
        steps_ok = sum(1 for p in proxies.values() for c in p.calls if c.key and not c.faulted and c.status < 300)
        results["daemon_cpu_ms_per_provider_call"] = round(1000 * results["daemon_cpu_s"] / max(1, steps_ok), 2)
        results["differences"] = differences(sf, hs, crm, created)
        results["faults_injected"] = sum(1 for p in proxies.values() for c in p.calls if c.faulted)
    return results


def analyse(
    proxies: dict[str, Proxy], created: dict[str, tuple[str, float]], phases: dict[str, str], dropped: set[str]
) -> dict[str, Any]:
    by_key: dict[str, list[Call]] = {}
    for p in proxies.values():
        for c in p.calls:
            if c.key:
                by_key.setdefault(c.key, []).append(c)
    # A HubSpot 429 pauses every HubSpot call for its Retry-After (1 s here; the limit is the app's, not one
    # call's): a saga whose HubSpot call arrived in such a pause waited for the provider, not for integrand.
    pauses = [(c.t_out, c.t_out + 1.0) for c in proxies["hubspot"].calls if c.faulted and c.status == 429]

    def paused(a: Call, b: Call) -> float:
        if b.provider != "hubspot":
            return 0.0
        return max((min(b.t_in, end) - max(a.t_out, start) for start, end in pauses), default=0.0) if pauses else 0.0

    out: dict[str, Any] = {}
    for phase in ("steady", "burst"):
        e2e, provider, gaps, clean = [], [], [], 0
        rest: list[float] = []
        by_pos: dict[str, list[float]] = {}
        # Per saga: everything that is not the provider (e2e minus provider time), and that less the waits after a
        # faulted call (the shipped backoff after a 503, a 429's Retry-After): what integrand (and the feed) add.
        not_provider, not_provider_nor_fault_waits, feed, fault_waits = [], [], [], []
        keys = [k for k, ph in phases.items() if ph == phase and k not in dropped]
        if not keys:
            continue
        for key in keys:
            calls = sorted(by_key.get(key, []), key=lambda c: c.t_in)
            done = [c for c in calls if c.provider == "salesforce" and c.method == "PATCH" and c.status < 300]
            if not done:
                continue
            e2e.append((done[0].t_out - created[key][1]) * 1000)
            chain = [c for c in calls if c.t_out <= done[0].t_out]
            provider.append(sum(c.t_out - c.t_in for c in chain) * 1000)
            waits = sum(b.t_in - a.t_out for a, b in itertools.pairwise(chain) if a.faulted or a.status >= 300) * 1000
            feed.append((chain[0].t_in - created[key][1]) * 1000)
            fault_waits.append(waits)
            not_provider.append(e2e[-1] - provider[-1])
            not_provider_nor_fault_waits.append(e2e[-1] - provider[-1] - waits)
            in_pause = sum(
                max(0.0, paused(a, b)) for a, b in itertools.pairwise(chain) if not (a.faulted or a.status >= 300)
            )
            rest.append(e2e[-1] - provider[-1] - waits - in_pause * 1000)
            ok = [c for c in chain if not c.faulted and c.status < 300]
            if len(ok) == len(chain) == 4:  # fetch, hubspot, crm, confirm: each succeeded first time
                clean += 1
                for a, b in itertools.pairwise(ok):
                    gaps.append((b.t_in - a.t_out) * 1000)
                    by_pos.setdefault(f"{a.provider}→{b.provider}", []).append((b.t_in - a.t_out) * 1000)
        out[phase] = {
            "changes": len(keys),
            "confirmed": len(e2e),
            "e2e_ms": summary(e2e),
            "provider_ms": summary(provider),
            "e2e_minus_provider_ms": summary(not_provider),
            "fault_waits_ms": summary(fault_waits),
            "e2e_minus_provider_and_fault_waits_ms": summary(not_provider_nor_fault_waits),
            "e2e_minus_provider_fault_waits_and_429_pauses_ms": summary(rest),
            "feed_ms": summary(feed),
            "own_ms_per_step": summary(gaps),
            "sagas_measured_for_overhead": clean,
            "own_ms_by_gap": {k: summary(v) for k, v in by_pos.items()},
        }
    return out


def internal_overhead(db: Path, phases: dict[str, str]) -> dict[str, dict[str, Any]]:
    """integrand's own time per step as the daemon saw it: from one step's sink call returning to the next
    step's sink call starting, within one delivery attempt: the saga's state commit (fsynced), the mapping,
    validation and building the next step. The sink connector's own time (HTTP client, its rate limiter,
    network, provider) is outside; the proxies' gaps (own_ms_per_step) include it.

    Split in two from each entry's ``commit_ms`` (how long the previous outcome's commit took, queued behind
    the writer's other work and fsynced): ``…_commit`` and ``…_rest`` (mapping, validation and the wait for
    the event loop: other sagas, HTTP parsing, the CDC stream — scheduling, not work of this step)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT value FROM state WHERE scope = 'saga'").fetchall()
    finally:
        conn.close()
    out: dict[str, dict[str, list[float]]] = {}
    first: dict[str, dict[str, Any]] = {}  # the first saga per Contact (a reconciliation may start more)
    for (raw,) in rows:
        rec = orjson.loads(raw)
        key = str((rec["input"].get("data") or {}).get("Integration_Key__c"))
        if key not in first or rec["started_at"] < first[key]["started_at"]:
            first[key] = rec
    for key, rec in first.items():
        hist = rec["history"]
        if len(hist) != 3 or any(h["outcome"] != "ok" for h in hist):
            continue  # only sagas whose three steps each succeeded first time
        phase = phases.get(key)
        if phase is None:
            continue
        per = out.setdefault(phase, {})
        for a, b in itertools.pairwise(hist):
            gap = (b["t0"] - a["t"]) * 1000
            if a.get("run") != b.get("run"):  # redelivered between the two steps: not integrand's step time
                per.setdefault("own_ms_per_step_inside_redelivered", []).append(gap)
                continue
            per.setdefault("own_ms_per_step_inside", []).append(gap)
            if b.get("commit_ms") is not None:
                per.setdefault("own_ms_inside_commit", []).append(b["commit_ms"])
                per.setdefault("own_ms_inside_rest", []).append(gap - b["commit_ms"])
    return {phase: {k: summary(v) for k, v in per.items()} for phase, per in out.items()}


def later_saga_steps(db: Path) -> dict[str, int]:
    """The step outcomes of every saga after a Contact's first (a reconciliation's, of a confirmed Contact):
    ``unchanged`` steps were not sent (the loop guard), ``ok`` ones were."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT value FROM state WHERE scope = 'saga'").fetchall()
    finally:
        conn.close()
    by_key: dict[str, list[dict[str, Any]]] = {}
    for (raw,) in rows:
        rec = orjson.loads(raw)
        by_key.setdefault(str((rec["input"].get("data") or {}).get("Integration_Key__c")), []).append(rec)
    out: dict[str, int] = {}
    for recs in by_key.values():
        for rec in sorted(recs, key=lambda r: r["started_at"])[1:]:
            for h in rec["history"]:
                if h.get("action") == "run":
                    out[h["outcome"]] = out.get(h["outcome"], 0) + 1
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sagas_per_contact(db: Path) -> dict[str, int]:
    """How many sagas ran per Contact: more than one means a later event (a reconciliation) re-ran it."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT value FROM state WHERE scope = 'saga'").fetchall()
    finally:
        conn.close()
    per: dict[str, int] = {}
    for (raw,) in rows:
        rec = orjson.loads(raw)
        key = str((rec["input"].get("data") or {}).get("Integration_Key__c"))
        per[key] = per.get(key, 0) + 1
    hist: dict[str, int] = {}
    for n in per.values():
        hist[str(n)] = hist.get(str(n), 0) + 1
    return hist


def dead_letters(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT last_error FROM deliveries WHERE state = 'dead'").fetchall()
    finally:
        conn.close()
    kinds: dict[str, int] = {}
    for (err,) in rows:
        kind = str(err).split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def differences(sf: Any, hs: Any, crm: Any, created: dict[str, tuple[str, float]]) -> list[str]:
    """Keys whose record differs between the three systems (each difference named)."""
    out = []
    for key, (rid, _) in created.items():
        rec = sf.fake.get("Contact", rid) or {}
        contact = hs.find("contacts", "email", str(rec.get("Email", "")).lower()) or {}
        cust = crm.customers.get(key) or {}
        problems = []
        if contact.get("properties", {}).get("salesforce_key") != key:
            problems.append("hubspot")
        if cust.get("email") != str(rec.get("Email", "")).lower() or cust.get("hubspot_id") != contact.get("id"):
            problems.append("crm")
        if rec.get("CRM_Id__c") != cust.get("id") or rec.get("HubSpot_Id__c") != contact.get("id"):
            problems.append("salesforce ids")
        if problems:
            out.append(f"{key}: {', '.join(problems)}")
    return out


def median_of(runs: list[dict[str, Any]], phase: str, what: str, p: str) -> float:
    xs = [r[phase][what][p] for r in runs if phase in r and what in r[phase]]
    return round(statistics.median(xs), 2) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scenarios", nargs="+", default=["cdc", "outbound"], choices=["cdc", "outbound"])
    ap.add_argument("--steady", type=int, default=150)
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--latency", type=float, nargs=2, default=[0.05, 0.3], metavar=("MIN", "MAX"))
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--no-faults", action="store_true", help="inject no faults (a baseline of the same load)")
    ap.add_argument(
        "--work",
        help="where the daemon's store goes (default var/): /dev/shm takes the disk's fsync out of the figures, "
        "leaving integrand's own work and the event loop",
    )
    args = ap.parse_args()
    global NO_FAULTS
    NO_FAULTS = args.no_faults
    report: dict[str, Any] = {"settings": vars(args), "runs": {}}
    for scenario in args.scenarios:
        runs = []
        for i in range(args.runs):
            res = asyncio.run(run_once(args, scenario, seed=1000 + i))
            runs.append(res)
            print(json.dumps(res, indent=1), flush=True)
        report["runs"][scenario] = runs
        if not args.no_faults:
            # The bare baseline of the same run: the same load and latencies, no faults injected.
            NO_FAULTS = True
            base = asyncio.run(run_once(args, scenario, seed=2000))
            NO_FAULTS = False
            print(json.dumps(base, indent=1), flush=True)
            report.setdefault("baseline_no_faults", {})[scenario] = base
        report.setdefault("medians", {})[scenario] = {
            phase: {
                what: {p: median_of(runs, phase, what, p) for p in ("p50", "p95", "p99")}
                for what in (
                    "e2e_ms",
                    "provider_ms",
                    "e2e_minus_provider_ms",
                    "e2e_minus_provider_and_fault_waits_ms",
                    "e2e_minus_provider_fault_waits_and_429_pauses_ms",
                    "fault_waits_ms",
                    "feed_ms",
                    "own_ms_per_step",
                    "own_ms_per_step_inside",
                    "own_ms_inside_commit",
                    "own_ms_inside_rest",
                )
            }
            for phase in ("steady", "burst")
            if any(phase in r for r in runs)
        }
    (ROOT / "bench" / "crm_sync.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["medians"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
