"""The service's own figures: start to READY=1, idle RSS, RSS (and WAL size) after a 20,000-webhook burst,
and the unit's exposure score. Writes its section of docs/benchmarks.md (between the service markers).

    .venv/bin/python bench/service_bench.py [--runs 5] [--events 20000] [--concurrency 64]

Shipped defaults throughout (the repository's config.toml with free ports); the baseline for the start time
is the same interpreter importing integrand's dependencies and doing nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from integrand.testing import standard_webhook_headers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = HERE / "service_results.json"
BEGIN, END = "<!-- service-bench:begin -->", "<!-- service-bench:end -->"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def config_in(folder: Path) -> Path:
    text = (ROOT / "config.toml").read_text()
    text = text.replace("127.0.0.1:8080", "127.0.0.1:0").replace("127.0.0.1:8081", "127.0.0.1:0")
    path = folder / "config.toml"
    path.write_text(text)
    return path


class Run:
    """One ``integrand run`` with a NOTIFY_SOCKET: when it said READY=1, and its port."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.notify_dir = Path(tempfile.mkdtemp(prefix="sb-"))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_dir / "n"))
        self.sock.settimeout(60)
        self.log = folder / "log"
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_dir / "n")}
        self.started = time.perf_counter()
        exe = Path(sys.executable).parent / "integrand"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(exe), "run", "--config", str(config_in(folder))], stdout=out, stderr=out, env=env
            )
        while True:
            msg = self.sock.recv(4096).decode()
            if "READY=1" in msg:
                self.ready_after = time.perf_counter() - self.started
                break
        m = re.search(r"webhooks on [^:]+:(\d+)", self.log.read_text())
        assert m, self.log.read_text()
        self.port = int(m.group(1))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.sock.close()
        shutil.rmtree(self.notify_dir, ignore_errors=True)


def baseline_start() -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import aiohttp, aiosqlite, orjson, pydantic, uvloop, prometheus_client"], check=True
    )
    return time.perf_counter() - started


async def burst(port: int, n: int, concurrency: int) -> tuple[int, float]:
    url = f"http://127.0.0.1:{port}/hooks/demo"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    ok = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        while not queue.empty():
            i = queue.get_nowait()
            body = orjson.dumps({"type": "customer.updated", "data": {"id": f"c_{i % 500}", "n": i}})
            async with session.post(url, data=body, headers=standard_webhook_headers(body, f"b{i}", SECRET)) as r:
                await r.read()
                ok += r.status == 200

    started = time.perf_counter()
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return ok, time.perf_counter() - started


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def exposure() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return "n/a (systemd-analyze missing)"
    out = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(ROOT / "systemd" / "integrand.service")],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    m = re.search(r"Overall exposure level for integrand\.service: ([0-9.]+ \w+)", out)
    return m.group(1) if m else "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()

    starts, bases, idle = [], [], []
    for _ in range(args.runs):
        bases.append(baseline_start())
        with tempfile.TemporaryDirectory() as d:
            r = Run(Path(d))
            starts.append(r.ready_after)
            time.sleep(2.0)
            idle.append(rss_kib(r.proc.pid))
            r.stop()

    with tempfile.TemporaryDirectory() as d:
        r = Run(Path(d))
        before = rss_kib(r.proc.pid)
        ok, took = asyncio.run(burst(r.port, args.events, args.concurrency))
        out = Path(d) / "var" / "events.jsonl"
        deadline = time.monotonic() + 300
        while lines(out) < args.events and time.monotonic() < deadline:
            time.sleep(0.2)
        delivered = lines(out)
        after = rss_kib(r.proc.pid)
        wal = Path(d) / "var" / "integrand.db-wal"
        wal_after_burst = wal.stat().st_size if wal.exists() else 0
        time.sleep(20)  # idle for 10 s (app.WAL_IDLE_AFTER): the daemon should give the WAL back
        wal_idle = wal.stat().st_size if wal.exists() else 0
        after_idle = rss_kib(r.proc.pid)
        r.stop()

    res: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other agents)",
        "python": platform.python_version(),
        "runs": args.runs,
        "ready_s": [round(x, 3) for x in starts],
        "baseline_s": [round(x, 3) for x in bases],
        "idle_rss_kib": idle,
        "burst": {
            "events": args.events,
            "concurrency": args.concurrency,
            "accepted": ok,
            "seconds": round(took, 2),
            "delivered": delivered,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "rss_after_idle_kib": after_idle,
            "wal_after_burst_bytes": wal_after_burst,
            "wal_after_20s_idle_bytes": wal_idle,
        },
        "exposure": exposure(),
    }
    RESULTS.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    write_doc(res)
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())


def write_doc(res: dict[str, Any]) -> None:
    med = statistics.median
    b = res["burst"]
    mib = 1024
    section = f"""{BEGIN}
Measured {res["when"]} on {res["machine"]}, Python {res["python"]}, with
`.venv/bin/python bench/service_bench.py --runs {res["runs"]} --events {b["events"]}` (shipped `config.toml`,
free ports; the machine is shared with other agents, so times are noisy: medians of {res["runs"]} runs).

| figure | value |
|---|---|
| `systemd-analyze security --offline=true systemd/integrand.service` | exposure {res["exposure"]} (main before issue 11: 8.3 EXPOSED) |
| start to `READY=1` (process spawn → datagram on NOTIFY_SOCKET) | {med(res["ready_s"]):.2f} s (runs: {", ".join(f"{x:.2f}" for x in res["ready_s"])}) |
| bare baseline: the same Python importing aiohttp, aiosqlite, orjson, pydantic, uvloop, prometheus_client | {med(res["baseline_s"]):.2f} s, so integrand's start is {med(res["ready_s"]) / med(res["baseline_s"]):.1f} times the bare imports |
| idle RSS, 2 s after READY | {med(res["idle_rss_kib"]) / mib:.1f} MiB |
| RSS after a burst of {b["events"]:,} webhooks ({b["concurrency"]} connections, {b["accepted"]:,} accepted in {b["seconds"]} s, {b["delivered"]:,} delivered to the jsonl sink) | {b["rss_after_kib"] / mib:.1f} MiB (before: {b["rss_before_kib"] / mib:.1f} MiB; after 20 s idle: {b["rss_after_idle_kib"] / mib:.1f} MiB) |
| WAL file after the burst → after 20 s idle | {b["wal_after_burst_bytes"] / 2**20:.1f} MiB → {b["wal_after_20s_idle_bytes"] / 2**20:.1f} MiB |
{END}"""
    text = DOC.read_text()
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text += "\n## The service: start, memory, hardening (`bench/service_bench.py`)\n\n" + section + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
