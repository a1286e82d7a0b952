"""The long runs: the kill -9 loop for many rounds, then a steady soak with a sink failing 1 % of the time.

    make soak                                   # ROUNDS=200, SOAK_SECONDS=3600
    .venv/bin/python bench/soak.py --rounds 20 --seconds 120

Crash loop: tests/crashloop.py (the same harness as the short test in make test), ROUNDS rounds.
Steady soak: ``integrand run`` with an ``http`` sink to a local receiver that answers 500 to 1 % of
requests; peak ingest measured first (64 concurrent senders, 5 s), then signed webhooks at
``--fraction`` of it for ``--seconds``; every window the daemon's RSS, open fds, database and WAL
size, the backlog, and the window's p50/p99 latency and errors are sampled. Store retention is set
to a few minutes (labelled in the output) so pruning runs within the hour and the database can level.
Figures go to bench/results-soak.json and into docs/reliability.md between the soak markers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
from aiohttp import web  # noqa: E402

from integrand.testing import standard_webhook_headers  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from reliability_doc import put_block  # noqa: E402

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
READY = re.compile(r"ready: webhooks on [^:]+:(\d+)")


# --- crash loop ---------------------------------------------------------------------------------------


async def crashloop(rounds: int, seed: int, budget: float | None) -> dict[str, Any]:
    from tests.crashloop import crash_loop

    work = Path(tempfile.mkdtemp(prefix="integrand-crashloop-"))
    started_at, load = now(), os.getloadavg()[0]
    progress = work / "progress.jsonl"
    print(f"crash loop in {work}; per-round figures in {progress}", flush=True)

    def on_round(r: dict[str, Any]) -> None:
        line = json.dumps(r)
        print(line, flush=True)
        with progress.open("a") as fh:
            fh.write(line + "\n")

    # A shared machine may leave a restart a small share of a CPU: slow to start is not what is checked here.
    f = await crash_loop(
        work,
        rounds,
        seed=seed,
        entities=32,
        records=60,
        start_timeout=120.0,
        drain_timeout=600.0,
        budget=budget,
        on_round=on_round,
    )
    return {
        "at": started_at,
        "load_1min_at_start": round(load, 1),
        "nice": os.nice(0),
        "rounds_asked": rounds,
        "seed": seed,
        "workdir": str(work),
        **f.as_dict(),
    }


# --- steady soak ----------------------------------------------------------------------------------------


def config(sink_url: str, retention: str) -> str:
    return f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"

[admin]
enabled = false

[store]
retention = "{retention}"

[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{SECRET}"
entity_field = "object"
entity_id_field = "data.id"

[sinks.crm]
connector = "http"
url = "{sink_url}"
timeout = "5s"

[[routes]]
from = "demo"
to = ["crm"]
"""


async def serve_sink(fail: float, seed: int) -> None:
    """The flaky sink in a process of its own, so the load generator's loop does not slow the sink."""
    sink = FlakySink(fail, seed)
    url = await sink.start()
    print(url, flush=True)
    await asyncio.Event().wait()


class FlakySink:
    """200, or 500 for ``fail`` of requests at random."""

    def __init__(self, fail: float, seed: int):
        self.fail = fail
        self.rng = random.Random(seed)
        self.ok = 0
        self.failed = 0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.rng.random() < self.fail:
            self.failed += 1
            return web.json_response({"error": "flaky"}, status=500)
        self.ok += 1
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": self.ok, "500": self.failed})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/in", self.handle)
        app.router.add_get("/stats", self.stats)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/in"


def cpu_seconds(pid: int) -> float:
    """user + system CPU of ``pid`` so far (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_sample(pid: int, db: Path) -> dict[str, float]:
    rss = 0.0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    size = lambda p: p.stat().st_size / 2**20 if p.exists() else 0.0  # noqa: E731
    backlog = -1
    with contextlib.suppress(sqlite3.Error):
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        backlog = c.execute("SELECT COUNT(*) FROM deliveries WHERE state IN ('ready', 'leased')").fetchone()[0]
        c.close()
    return {
        "daemon_cpu_s": round(cpu_seconds(pid), 2),
        "load_1min": round(os.getloadavg()[0], 2),
        "rss_mib": round(rss, 1),
        "fds": fds,
        "db_mib": round(size(db), 2),
        "wal_mib": round(size(Path(f"{db}-wal")), 2),
        "backlog": backlog,
    }


async def post(s: aiohttp.ClientSession, url: str, i: int) -> tuple[float, bool]:
    body = orjson.dumps({"object": "customer", "data": {"id": f"c{i % 500}", "n": i}})
    t0 = time.monotonic()
    try:
        async with s.post(url, data=body, headers=standard_webhook_headers(body, f"soak-{i}", SECRET)) as r:
            await r.read()
            return time.monotonic() - t0, r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return time.monotonic() - t0, False


async def peak(url: str, seconds: float = 5.0, concurrency: int = 64) -> float:
    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while time.monotonic() < stop:
                _, ok = await post(s, url, 10_000_000 + i)
                done += ok
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / seconds


async def steady(seconds: float, fraction: float, window: float, seed: int) -> dict[str, Any]:
    load_at_start = round(os.getloadavg()[0], 1)
    sink_proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--sink-server", "0.01", str(seed), stdout=asyncio.subprocess.PIPE
    )
    assert sink_proc.stdout is not None
    sink_url = (await sink_proc.stdout.readline()).decode().strip()
    work = Path(tempfile.mkdtemp(prefix="integrand-soak-"))
    retention = f"{int(max(60, min(300, seconds / 4)))}s"
    (work / "config.toml").write_text(config(sink_url, retention))
    log = (work / "integrand.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "integrand.cli",
        "run",
        "--config",
        str(work / "config.toml"),
        stdout=log,
        stderr=log,
        cwd=work,
    )
    port = 0
    for _ in range(400):
        if m := READY.search((work / "integrand.log").read_text(errors="replace")):
            port = int(m.group(1))
            break
        await asyncio.sleep(0.05)
    url = f"http://127.0.0.1:{port}/hooks/demo"
    db = work / "var" / "integrand.db"
    # Capacity: ingest flat out for 5 s, then how long until the sink has every event (end to end).
    burst_started = time.monotonic()
    measured_peak = await peak(url)
    burst = measured_peak * 5
    while (await asyncio.to_thread(proc_sample, proc.pid, db))["backlog"] > 0:  # noqa: ASYNC110 - another process
        await asyncio.sleep(0.2)
    end_to_end = burst / (time.monotonic() - burst_started)
    rate = min(measured_peak, end_to_end) * fraction
    windows: list[dict[str, Any]] = []
    lat: list[tuple[float, float, bool]] = []
    start = time.monotonic()
    end = start + seconds

    async def sampler() -> None:
        t = start
        cpu_before = (await asyncio.to_thread(proc_sample, proc.pid, db))["daemon_cpu_s"]
        while t < end:
            t = min(end, t + window)
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            rows = [(d, ok) for at, d, ok in lat if t - window <= at < t]
            ms = sorted(d * 1000 for d, ok in rows if ok)
            q = statistics.quantiles(ms, n=100) if len(ms) > 1 else [0.0] * 99
            sample = await asyncio.to_thread(proc_sample, proc.pid, db)
            # The daemon's CPU per event sent in the window: flat if a growing backlog is the machine's doing
            # (the daemon got less CPU), rising if it is the daemon's (each event costs it more).
            used, cpu_before = sample["daemon_cpu_s"] - cpu_before, sample["daemon_cpu_s"]
            windows.append(
                {
                    "t_s": round(t - start),
                    "requests": len(rows),
                    "errors": sum(1 for _, ok in rows if not ok),
                    "p50_ms": round(q[49], 1),
                    "p99_ms": round(q[98], 1),
                    "daemon_cpu_of_one_core": round(used / window, 3),
                    "daemon_cpu_ms_per_event": round(used * 1000 / max(1, len(rows)), 3),
                    **sample,
                }
            )
            print(json.dumps(windows[-1]), flush=True)

    async def sender() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
            tasks: set[asyncio.Task[None]] = set()
            n = 0

            async def one(i: int) -> None:
                at = time.monotonic()
                d, ok = await post(s, url, i)
                lat.append((at, d, ok))

            while time.monotonic() < end:
                task = asyncio.create_task(one(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
                await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))  # the steady pace
            await asyncio.gather(*tasks)

    await asyncio.gather(sender(), sampler())
    proc.terminate()
    await proc.wait()
    async with aiohttp.ClientSession() as s, s.get(sink_url.replace("/in", "/stats")) as r:
        answers = await r.json()
    sink_proc.kill()
    await sink_proc.wait()
    warm = [w for w in windows if w["t_s"] > min(seconds * 0.1, 300)] or windows
    return {
        "at": now(),
        "load_1min_at_start": load_at_start,
        "nice": os.nice(0),
        "machine": f"{os.cpu_count()} cores, shared with other agents' work",
        "seconds": seconds,
        "peak_ingest_per_s": round(measured_peak),
        "end_to_end_per_s": round(end_to_end),
        "rate_per_s": round(rate),
        "fraction_of_peak": fraction,
        "sink_failure_rate": 0.01,
        "sink_answers": answers,
        "retention (tuned for the soak)": retention,
        "first_after_warmup": warm[0],
        "last": windows[-1],
        "max": {k: max(w[k] for w in warm) for k in ("rss_mib", "fds", "db_mib", "wal_mib", "p99_ms", "backlog")},
        "errors": sum(w["errors"] for w in windows),
        "windows": windows,
    }


# --- figures into the docs --------------------------------------------------------------------------------


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def crashloop_block(r: dict[str, Any], cmd: str) -> str:
    stopped = (
        f" (asked {r['rounds_asked']}; the time budget ended it, then the drain and every check ran)"
        if r.get("stopped_by_budget")
        else ""
    )
    return f"""
`{cmd}` at {r["at"]} (2 shared cores, load {r.get("load_1min_at_start", "?")} at the start, nice {r.get("nice", "?")}): **{r["rounds"]} rounds**{stopped} of kill -9 ({r["kills_mid_poll"]} inside a poll,
{r["kills_mid_reload"]} mid-reload), {r["reloads"]:,} SIGHUP reloads sent ({r["reloads_done"]:,} completed, each restarting
the streaming source, the polled source and the sink), {r["webhooks_acked"]:,} webhooks acknowledged
({r["webhook_retries"]:,} sender retries while the daemon was down), {r["stream_acked"]:,} messages PubAck'ed into the
NATS stream, {r["polled_changes"]:,} changes made at the polled API, {r["events_checked"]:,} distinct events checked
at the sink in {r["seconds"]:.0f} s.

| acknowledged but lost | duplicates at the idempotent sink | per-entity order violations | cursor ahead of its events | acknowledged but not in the store at the kill | integrity_check failures |
|---|---|---|---|---|---|
| **{r["lost"]}** | **{r["duplicates"]}** | **{r["order_violations"]}** | **{r["cursor_ahead"]}** | **{r["acked_not_stored"]}** | **{r["integrity_failures"]}** |
"""


def steady_block(r: dict[str, Any], cmd: str) -> str:
    a, b = r["first_after_warmup"], r["last"]

    def row(label: str, w: dict[str, Any]) -> str:
        return (
            f"| {label} | {w['t_s']} | {w['rss_mib']} | {w['fds']} | {w['db_mib']} | {w['wal_mib']} | {w['backlog']} "
            f"| {w['p50_ms']} | {w['p99_ms']} | {w.get('daemon_cpu_ms_per_event', '-')} | {w.get('load_1min', '-')} |"
        )

    return f"""
`{cmd}` at {r["at"]} ({r["machine"]}; load {r.get("load_1min_at_start", "?")} at the start, nice {r.get("nice", "?")}): {r["seconds"]:.0f} s at {r["rate_per_s"]}/s
({r["fraction_of_peak"]:.0%} of the capacity measured just before: {r["peak_ingest_per_s"]}/s ingest,
{r["end_to_end_per_s"]}/s end to end, the lower taken), `http` sink (its own process) answering 500
to {r["sink_failure_rate"]:.0%} ({r["sink_answers"]["500"]:,} of {r["sink_answers"]["ok"] + r["sink_answers"]["500"]:,}),
store retention {r["retention (tuned for the soak)"]} (tuned: so pruning runs within the run). Errors seen by the sender: **{r["errors"]}**.

| | t (s) | RSS (MiB) | fds | DB (MiB) | WAL (MiB) | backlog | p50 (ms) | p99 (ms) | daemon CPU per event (ms) | load (1 min) |
|---|---|---|---|---|---|---|---|---|---|---|
{row("first window after warm-up", a)}
{row("last window", b)}
| max after warm-up | | {r["max"]["rss_mib"]} | {r["max"]["fds"]} | {r["max"]["db_mib"]} | {r["max"]["wal_mib"]} | {r["max"]["backlog"]} | | {r["max"]["p99_ms"]} | | |
"""


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--sink-server":
        asyncio.run(serve_sink(float(sys.argv[2]), int(sys.argv[3])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200, help="kill -9 rounds (0: skip the crash loop)")
    ap.add_argument("--budget", type=float, default=None, help="crash loop: no new round after this many seconds")
    ap.add_argument("--seconds", type=float, default=3600, help="steady soak duration (0: skip it)")
    ap.add_argument("--fraction", type=float, default=0.5, help="of measured peak ingest")
    ap.add_argument("--window", type=float, default=0, help="sampling window (default: duration / 30)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    out = ROOT / "bench" / "results-soak.json"
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    ok = True
    if args.rounds:
        r = asyncio.run(crashloop(args.rounds, args.seed, args.budget))
        results["crashloop"] = r
        put_block("crashloop", crashloop_block(r, f"make soak ROUNDS={args.rounds}"))
        print(json.dumps({k: v for k, v in r.items() if k != "problems"}), flush=True)
        ok &= not r["problems"]
        for p in r["problems"]:
            print("PROBLEM:", p, file=sys.stderr)
    if args.seconds:
        window = args.window or max(5.0, args.seconds / 30)
        r = asyncio.run(steady(args.seconds, args.fraction, window, args.seed))
        results["steady"] = r
        put_block("steady", steady_block(r, f"make soak SOAK_SECONDS={args.seconds:.0f}"))
        ok &= r["errors"] == 0
    # Read again: a crash loop and a steady soak may run side by side, each writing only its own part.
    latest: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    ran = [k for k, n in (("crashloop", args.rounds), ("steady", args.seconds)) if n]
    out.write_text(json.dumps({**latest, **{k: results[k] for k in ran}}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
