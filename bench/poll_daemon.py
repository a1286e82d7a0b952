"""The adaptive poller on the real code path: `integrand run` polling a local bursty "changed since" API.

One daemon (a subprocess) polls several copies of the same fake API, each its own
source with its own request log: ``adaptive`` with integrand's defaults at min 0.2 s,
max 20 s, target 1 s; ``fixed-*`` with min = max = the interval, for the best fixed
interval on the same schedule in the same run; and ``hooks``, adaptive plus a signed
webhook for every change, 10 % of them dropped. The fake behaves like a real provider:
each change shows up in the listing only after an index lag (uniform 0-0.3 s), keyset
pages of 50, 3 % of requests answer 500, and one request per source answers 429 with
``Retry-After: 2``. Every change is a new record, so "missed" and "twice" are exact.

Detection latency is the time from a change to the first response of the fake that
listed it (or, for ``hooks``, the webhook's acceptance), requests are counted from
the fake's log, and the sinks' files are checked for every change exactly once.

    python bench/poll_daemon.py --seeds 1 2 3    # ~6 minutes a seed; prints the table, --json writes it
    python bench/poll_daemon.py --workload random --warmup --seeds 1 2   # ~11 minutes a seed

``--warmup`` runs the schedule twice back to back in one daemon and measures the second
run only (requests, latencies; missed and twice over both): the first is the warm-up,
what a daemon that has been running for five minutes knows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from integrand.testing import standard_webhook_headers, wait_for

TARGET, MIN, MAX = 1.0, 0.2, 20.0
LAG, PAGE, FAIL, RETRY_AFTER = 0.3, 50, 0.03, 2
FIXED = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)
# The patternless source's p95 may sit anywhere from the target to max_interval: a wider grid.
FIXED_RANDOM = (0.6, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0, 20.0)
RANDOM_RATE = 1 / 6  # changes per second: the simulation's "random" workload (10/h at a 60 s target) in target units
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def random_schedule(seed: int, scale: float = 1.0) -> list[float]:
    """No pattern: a Poisson process at RANDOM_RATE for 300 s (the simulation's ``random`` workload)."""
    rng = random.Random(f"random/{seed}")
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(RANDOM_RATE / scale)
        if t >= 300 * scale:
            return out
        out.append(t)


def schedule(seed: int, scale: float = 1.0) -> list[float]:
    """A compressed week's shape in 300 s: quiet, a working stretch with bursts, a shoulder, a long quiet.

    ``scale`` stretches it (shorter runs for a smoke test). Rates mirror the simulation's
    bursty workload with the target latency as the unit (quiet 0.01/s, shoulders
    0.05/s, working 0.33/s) and so do the proportions (working 27 % of the time); bulk
    imports of 100-200 changes over 5-15 s inside the working stretch, from 25 s after it
    starts. (A burst that starts while the poller is still slow is the simulation's
    ``slow-start`` case; the profile that warms up before working hours in ``bursty``
    needs a week to learn, which a 5-minute run cannot have: see docs/benchmarks.md.)
    """
    rng = random.Random(seed)
    parts = [(0, 45, 0.01), (45, 60, 0.05), (60, 140, 0.33), (140, 160, 0.05), (160, 300, 0.01)]
    bursts = [(85, 10, 150), (100, 15, 200), (118, 5, 100), (128, 8, 120)]
    out: list[float] = []
    for a, b, r in parts:
        t = a * scale
        while True:
            t += rng.expovariate(r)
            if t >= b * scale:
                break
            out.append(t)
    for s, d, n in bursts:
        out.extend(s * scale + rng.uniform(0, d * scale) for _ in range(int(n * scale)))
    return sorted(out)


@dataclass
class Copy:
    """One source's view of the fake: its request log and when each record was first listed."""

    rng: random.Random
    requests: list[tuple[float, int]] = field(default_factory=list)  # (time, status)
    first: dict[str, float] = field(default_factory=dict)
    throttled: bool = False
    retry_after_ok: bool = True


class Fake:
    def __init__(self, start: float, offsets: list[float], seed: int, throttle_at: float) -> None:
        self.offsets, self.throttle_after = offsets, throttle_at
        self.copies: dict[str, Copy] = {}
        self.seed = seed
        self.begin(start)

    def begin(self, start: float) -> None:
        """Put the schedule's start at ``start`` (once the daemon is up: on a loaded machine it may take a while)."""
        rng = random.Random(self.seed)
        self.changes = [(start + o, f"r{i:05d}", rng.uniform(0, LAG)) for i, o in enumerate(self.offsets)]
        self.throttle_at = start + self.throttle_after

    def copy(self, name: str) -> Copy:
        if name not in self.copies:
            self.copies[name] = Copy(random.Random(f"{self.seed}/{name}"))
        return self.copies[name]

    async def records(self, request: web.Request) -> web.Response:
        now = time.time()
        c = self.copy(request.match_info["src"])
        if c.requests and c.requests[-1][1] == 429 and now < c.requests[-1][0] + RETRY_AFTER:
            c.retry_after_ok = False
        if not c.throttled and now >= self.throttle_at:
            c.throttled = True
            c.requests.append((now, 429))
            return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": str(RETRY_AFTER)})
        if c.rng.random() < FAIL:
            c.requests.append((now, 500))
            return web.json_response({"error": "transient"}, status=500)
        c.requests.append((now, 200))
        since = datetime.fromisoformat(request.query["since"].replace("Z", "+00:00")).timestamp()
        after = request.query.get("after")
        key = (float(after.split("|")[0]), after.split("|")[1]) if after else None
        items = []
        for t, rid, lag in self.changes:
            if t + lag > now or t < since or (key is not None and (t, rid) <= key):
                continue
            items.append((t, rid))
            if len(items) > PAGE:
                break
        more = len(items) > PAGE
        items = items[:PAGE]
        for _t, rid in items:
            c.first.setdefault(rid, now)
        body = {
            "results": [{"id": rid, "updated_at": iso(t)} for t, rid in items],
            "next": f"{items[-1][0]!r}|{items[-1][1]}" if more else None,
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(api: str, port: int, start: float, grid: tuple[float, ...] = FIXED) -> str:
    out = [
        f'[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "var"\nlog_level = "info"\nshutdown_grace = "5s"\n',
        "[admin]\nenabled = false\n",
    ]
    sources = [("adaptive", MIN, MAX), *((f"fixed-{round(t * 1000)}ms", t, t) for t in grid), ("hooks", MIN, MAX)]
    for name, lo, hi in sources:
        out.append(
            f'[sources.{name}]\nconnector = "http-poll"\nurl = "{api}/{name}/records?since={{since}}"\n'
            f'page_param = "after"\nitems = "$.results[*]"\nid = "$.id"\nupdated = "$.updated_at"\n'
            f'next_page = "$.next"\nentity = "record"\nlookback = "500ms"\nstart = "{iso(start - 1)}"\n'
        )
        if name == "hooks":
            out.append(
                f'[sources.{name}.webhook]\nsignature = "standard-webhooks"\nsecret = "{SECRET}"\n'
                f'entity_id_field = "id"\nversion_field = "updated_at"\n'
            )
        out.append(
            f'[sources.{name}.poll]\nmin_interval = "{lo}s"\nmax_interval = "{hi}s"\ntarget_latency = "{TARGET}s"\n'
            + ('nudge_debounce = "100ms"\n' if name == "hooks" else "")
        )
        out.append(f'[sinks.out-{name}]\nconnector = "jsonl"\npath = "var/{name}.jsonl"\n')
        out.append(f'[[routes]]\nfrom = "{name}"\nto = ["out-{name}"]\n')
    return "\n".join(out)


async def send_hooks(port: int, fake: Fake, drop: float, seed: int, seen: dict[str, float]) -> int:
    """Post a signed webhook for every change when it happens, except a ``drop`` share of them."""
    rng = random.Random(f"hooks/{seed}")
    url = f"http://127.0.0.1:{port}/hooks/hooks"
    dropped = 0
    async with aiohttp.ClientSession() as s:
        for t, rid, _ in fake.changes:
            await asyncio.sleep(max(0.0, t - time.time()))
            if rng.random() < drop:
                dropped += 1
                continue
            body = orjson.dumps({"id": rid, "updated_at": iso(t)})
            async with s.post(url, data=body, headers=standard_webhook_headers(body, f"m-{rid}", SECRET)) as r:
                if r.status < 300:
                    seen.setdefault(rid, time.time())
    return dropped


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def delivered(path: Path) -> set[str]:
    """The record ids a sink's file holds (complete lines only: the daemon may be writing)."""
    if not path.exists():
        return set()
    out = set()
    for line in path.read_bytes().split(b"\n")[:-1]:
        if line:
            out.add(orjson.loads(line)["entity_id"])
    return out


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))] if s else 0.0


async def run(seed: int, scale: float, workdir: Path, workload: str = "bursty", warmup: bool = False) -> dict[str, Any]:
    offsets = random_schedule(seed, scale) if workload == "random" else schedule(seed, scale)
    duration = 300 * scale
    skip = duration if warmup else 0.0  # the warm-up: the same schedule once before the measured one
    if warmup:
        offsets = [*offsets, *(duration + o for o in offsets)]
    start = time.time()  # provisional: the schedule starts 3 s after the daemon listens (fake.begin below)
    fake = Fake(start + 3600, offsets, seed, throttle_at=skip + duration * 0.55)
    app = web.Application()
    app.router.add_get("/{src}/records", fake.records)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    port = free_port()
    grid = FIXED_RANDOM if workload == "random" else FIXED
    (workdir / "config.toml").write_text(config(f"http://127.0.0.1:{api_port}", port, start, grid))
    exe = Path(sys.executable).with_name("integrand")
    log = (workdir / "daemon.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(exe),
        "run",
        "--config",
        str(workdir / "config.toml"),
        cwd=workdir,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    pushed: dict[str, float] = {}
    try:
        await wait_for(lambda: listening(port), 120, 0.2)  # the schedule starts once the daemon is up
        start = time.time() + 3
        fake.begin(start)
        await asyncio.sleep(max(0.0, start - time.time()))
        hooks = asyncio.create_task(send_hooks(port, fake, 0.1, seed, pushed))
        await asyncio.sleep(skip + duration + 2 * MAX + 5)
        dropped = await hooks
        # "Missed" must mean lost, not late: give every sink up to two minutes more (a loaded machine
        # stalls the daemon for tens of seconds) before the files are judged.
        want = {rid for _, rid, _ in fake.changes}
        with contextlib.suppress(AssertionError):  # not all there in time: the table says "missed"
            await wait_for(
                lambda: all(want <= delivered(workdir / "var" / f"{n}.jsonl") for n in fake.copies), 120, 1.0
            )
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        log.close()
        if proc.returncode not in (0, -signal.SIGTERM):
            sys.exit(f"integrand run exited with {proc.returncode}: {(workdir / 'daemon.log').read_text()[-2000:]}")
        await runner.cleanup()
    start += skip
    end = start + duration
    rows: dict[str, Any] = {}
    for name, c in fake.copies.items():
        lat = []
        for t, rid, _ in fake.changes:
            if t < start:
                continue  # a warm-up change
            seen = min(c.first.get(rid, math.inf), pushed.get(rid, math.inf) if name == "hooks" else math.inf)
            lat.append(seen - t)
        lines = [orjson.loads(x) for x in (workdir / "var" / f"{name}.jsonl").read_bytes().splitlines() if x]
        ids = [ln["entity_id"] for ln in lines]
        rows[name] = {
            "requests": sum(1 for t, _ in c.requests if start <= t < end),
            "errors": sum(1 for t, st in c.requests if start <= t < end and st >= 500),
            "p50": pct(lat, 50),
            "p95": pct(lat, 95),
            "p99": pct(lat, 99),
            "missed": len({rid for _, rid, _ in fake.changes} - set(ids)),
            "twice": len(ids) - len(set(ids)),
            "retry_after_honoured": c.retry_after_ok,
        }
    rows["hooks"]["webhooks_dropped"] = dropped
    lost = [t for t, rid, _ in fake.changes if rid not in pushed and t >= start]
    lost_lat = [
        fake.copies["hooks"].first.get(rid, math.inf) - t
        for t, rid, _ in fake.changes
        if rid not in pushed and t >= start
    ]
    rows["hooks"]["lost"] = len(lost)
    rows["hooks"]["lost_within_target"] = sum(1 for x in lost_lat if x <= TARGET)
    rows["hooks"]["lost_p95"] = pct(lost_lat, 95)
    rows["hooks"]["lost_max"] = max(lost_lat, default=0.0)
    measured = sum(1 for t, _, _ in fake.changes if t >= start)
    return {"seed": seed, "workload": workload, "warmup": warmup, "changes": measured, "sources": rows}


def best_fixed(rows: dict[str, Any], p95: float) -> tuple[float, float] | None:
    """Requests of the longest fixed interval meeting ``p95``, interpolated between the two grid points around it."""
    fx = sorted((float(k[6:-2]) / 1000, v) for k, v in rows.items() if k.startswith("fixed-"))
    ok = [(t, v) for t, v in fx if v["p95"] <= p95]
    if not ok:
        return None
    t, v = ok[-1]
    above = [(u, w) for u, w in fx if u > t and w["p95"] > p95]
    if above:
        u, w = above[0]
        f = (p95 - v["p95"]) / (w["p95"] - v["p95"]) if w["p95"] > v["p95"] else 0.0
        return t + f * (u - t), v["requests"] + f * (w["requests"] - v["requests"])
    return t, float(v["requests"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[1])
    ap.add_argument("--scale", type=float, default=1.0, help="stretch the schedule (0.25 for a smoke run)")
    ap.add_argument("--workload", choices=("bursty", "random"), default="bursty")
    ap.add_argument("--warmup", action="store_true", help="run the schedule once before the measured one")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    results = []
    for seed in args.seeds:
        load = os.getloadavg()[0]
        print(f"seed {seed}: load average (1 min) at the start {load:.1f}", flush=True)
        with tempfile.TemporaryDirectory(prefix="poll-daemon-") as d:
            results.append(asyncio.run(run(seed, args.scale, Path(d), args.workload, args.warmup)))
        results[-1]["load"] = load
    print("| seed | source | requests | p50 / p95 / p99 (s) | missed | twice | Retry-After honoured |")
    print("|---:|---|---:|---|---:|---:|---|")
    for r in results:
        for name, v in r["sources"].items():
            print(
                f"| {r['seed']} | {name} | {v['requests']} | {v['p50']:.2f} / {v['p95']:.2f} / {v['p99']:.2f} "
                f"| {v['missed']} | {v['twice']} | {v['retry_after_honoured']} |"
            )
        a = r["sources"]["adaptive"]
        bf = best_fixed(r["sources"], a["p95"])
        r["best_fixed_at_equal_p95"] = bf
        if bf is not None:
            print(
                f"\nseed {r['seed']}: {r['changes']} changes; best fixed interval at the adaptive p95 "
                f"({a['p95']:.2f} s): {bf[0]:.2f} s, {bf[1]:.0f} requests; fixed ÷ adaptive {bf[1] / a['requests']:.2f}x"
            )
        h = r["sources"]["hooks"]
        bfh = best_fixed(r["sources"], h["p95"])
        if bfh is not None:
            print(f"hooks: fixed at the same p95 ÷ hooks {bfh[1] / h['requests']:.2f}x")
        r["best_fixed_at_hooks_p95"] = bfh
        print(
            f"hooks: {h['lost']} webhooks lost, {h['lost_within_target']} of them seen within the target, "
            f"p95 {h['lost_p95']:.2f} s, max {h['lost_max']:.2f} s"
        )
    if len(results) > 1:
        ratios = [
            r["best_fixed_at_equal_p95"][1] / r["sources"]["adaptive"]["requests"]
            for r in results
            if r["best_fixed_at_equal_p95"]
        ]
        print(f"median fixed ÷ adaptive: {statistics.median(ratios):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
