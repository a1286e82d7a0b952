"""The crm-sync case study under load: change → all sinks confirmed latency, consistency, manual interventions.

    .venv/bin/python bench/crm_sync.py [--steady 200] [--rate 20] [--burst 200] [--sf-latency 0.1] [--crm-latency 0.2]

Runs `integrand run` (shipped defaults, plus the demo's short HubSpot poll interval) on the
examples/crm-sync shape against the three local fakes of plugins/demo_crm_sync.py, with provider
latency injected (Salesforce REST and the CRM; the HubSpot fake has none), Contacts created in
Salesforce steadily and then in one burst, and faults injected in the middle of each phase: three
Salesforce 503s, a dropped CDC stream, and three CRM 503s. For each Contact it records when it
reached HubSpot, the CRM, and when both ids were back on the Salesforce Contact (the confirmation),
then checks the three systems agree and counts dead letters (changes that would need a person).
Writes bench/crm_sync.json and prints a summary; docs/benchmarks.md quotes it with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("demo_crm_sync", ROOT / "plugins" / "demo_crm_sync.py")
assert spec is not None and spec.loader is not None
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class FlakyCRM(demo.FakeCRM):  # type: ignore[misc,name-defined]
    """The demo's CRM, answering 503 to the next ``fail`` upserts."""

    fail = 0

    async def _upsert(self, request: web.Request) -> web.Response:
        if self.fail > 0:
            self.fail -= 1
            await request.read()
            return web.json_response({"error": "maintenance"}, status=503)
        return await super()._upsert(request)  # type: ignore[no-any-return]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from integrand_hubspot.fake import FakeHubSpot
    from integrand_salesforce.testing import fake_salesforce

    from integrand.testing import fake_api_server, wait_for

    work = ROOT / "var" / "bench-crm"
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hs = FakeHubSpot()
    await hs.start()
    crm = FlakyCRM(demo.CRM_SECRET, latency=args.crm_latency)
    results: dict[str, Any] = {}
    async with fake_salesforce(pubsub=True) as sf, fake_api_server(crm.app()) as crm_url:
        assert sf.pubsub is not None
        sf.pubsub.enable("Contact", demo.CONTACT_FIELDS)
        sf.fake.latency = args.sf_latency
        cfg = work / "config.toml"
        cfg.write_text(demo.config(sf, hs, crm_url))
        proc, port = await demo.start_integrand(cfg)
        try:
            crm.webhook_url = f"http://127.0.0.1:{port}/hooks/crm"
            await wait_for(lambda: sf.pubsub is not None and sf.pubsub.subscribes >= 1, timeout=30)
            created: dict[str, tuple[str, float]] = {}  # key → (record id, created at)
            reached: dict[str, dict[str, Any]] = {}
            n = 0

            def make(phase: str) -> None:
                nonlocal n
                n += 1
                key = f"C-{n}"
                rec = sf.fake.create(
                    "Contact", FirstName=f"F{n}", LastName=f"L{n}", Email=f"c{n}@example.com", Integration_Key__c=key
                )
                created[key] = (rec["Id"], time.monotonic())
                reached[key] = {"phase": phase}

            async def watch(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    now = time.monotonic()
                    for key, (rid, t0) in created.items():
                        r = reached[key]
                        if "hubspot" not in r and hs.find("contacts", "email", f"c{key[2:]}@example.com"):
                            r["hubspot"] = now - t0
                        if "crm" not in r and key in crm.customers:
                            r["crm"] = now - t0
                        if "confirmed" not in r:
                            rec = sf.fake.get("Contact", rid) or {}
                            if rec.get("CRM_Id__c") and rec.get("HubSpot_Id__c"):
                                r["confirmed"] = now - t0
                    await asyncio.sleep(0.005)

            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(stop))
            started = time.monotonic()
            for i in range(args.steady):
                make("steady")
                if i == args.steady // 3:
                    sf.fake.fail(503, times=3)
                if i == args.steady // 2:
                    sf.pubsub.disconnect()
                if i == 2 * args.steady // 3:
                    crm.fail = 3
                await asyncio.sleep(1 / args.rate)
            for _ in range(args.burst):
                make("burst")
            sf.pubsub.disconnect()
            crm.fail = 3
            with contextlib.suppress(AssertionError):  # what is still unconfirmed at the deadline is reported
                await wait_for(lambda: all("confirmed" in r for r in reached.values()), timeout=args.timeout)
            elapsed = time.monotonic() - started
            stop.set()
            await watcher
            await asyncio.sleep(1.0)
        finally:
            await demo.stop_integrand(proc)
            await hs.stop()
        listing = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "integrand.cli", "dlq", "list", "--config", str(cfg), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await listing.communicate()
        skip = ("id", "no ", "dead-letter queue is empty")
        dead = [x for x in out.decode().splitlines() if x.strip() and not x.startswith(skip)]
        differ = []
        for key, (rid, _) in created.items():
            rec = sf.fake.get("Contact", rid) or {}
            contact = hs.find("contacts", "email", rec.get("Email", "").lower()) or {}
            cust = crm.customers.get(key) or {}
            ok = (
                contact.get("properties", {}).get("salesforce_key") == key
                and cust.get("email") == rec.get("Email", "").lower()
                and cust.get("name") == f"{rec.get('FirstName')} {rec.get('LastName')}"
                and rec.get("CRM_Id__c") == cust.get("id")
                and rec.get("HubSpot_Id__c") == contact.get("id")
            )
            if not ok:
                differ.append(key)
        for phase in ("steady", "burst"):
            rows = [r for r in reached.values() if r.get("phase") == phase]
            results[phase] = {
                "changes": len(rows),
                **{
                    f"{what}_ms": {
                        p: round(pct([r[what] * 1000 for r in rows if what in r], q), 1)
                        for p, q in (("p50", 50), ("p95", 95), ("p99", 99))
                    }
                    for what in ("crm", "hubspot", "confirmed")
                },
                "unconfirmed": sum(1 for r in rows if "confirmed" not in r),
            }
        results["elapsed_s"] = round(elapsed, 1)
        results["differences_after_run"] = differ
        results["dead_letters"] = dead
        results["requests"] = {
            "salesforce_api": sf.fake.api_usage,
            "crm_upserts": crm.requests,
            "hubspot_contacts": len(hs.objects.get("contacts", {})),
        }
        results["settings"] = {
            "steady": args.steady,
            "rate_per_s": args.rate,
            "burst": args.burst,
            "sf_latency_s": args.sf_latency,
            "crm_latency_s": args.crm_latency,
            "median_of_confirmed_ms": round(
                statistics.median([r["confirmed"] * 1000 for r in reached.values() if "confirmed" in r] or [0]), 1
            ),
        }
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steady", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--sf-latency", type=float, default=0.1)
    ap.add_argument("--crm-latency", type=float, default=0.2)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    res = asyncio.run(run(args))
    (ROOT / "bench" / "crm_sync.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
