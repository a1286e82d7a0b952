"""HTTP benchmarks: wrk against the bare aiohttp baseline and against `integrand run`, and end to end.

Every server runs as its own subprocess on 127.0.0.1 with a fresh temp dir; wrk sends
Standard Webhooks-signed POSTs with unique ids (bench/signed.lua), so signature checks and
dedup lookups are part of what is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY_BYTES = 1024
WRK_THREADS = 2
WARMUP_SECONDS = 2

TARGETS = {
    "bare": "bare aiohttp+uvloop (parse JSON, 200)",
    "integrand": "integrand, route to a jsonl sink (dispatcher delivering meanwhile)",
    "integrand-noroute": "integrand, source without routes (ingest only)",
}

CONFIG = """
[daemon]
listen = "127.0.0.1:{port}"
state_dir = "var"
log_level = "warning"
shutdown_grace = "5s"

[admin]
enabled = false

[store]
synchronous = "full"

[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{secret}"
"""

ROUTE = """
[sinks.events]
connector = "jsonl"
path = "var/events.jsonl"

[[routes]]
from = "demo"
to = ["events"]
"""


def ensure_wrk() -> str:
    """wrk from Debian; installed here when missing and we are root, otherwise the exact command is printed."""
    found = shutil.which("wrk")
    if found:
        return found
    cmd = "apt-get update && apt-get install -y wrk"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"wrk is missing; running: {cmd}", flush=True)
        subprocess.run(["apt-get", "update"], check=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, timeout=600)
        found = shutil.which("wrk")
    if not found:
        sys.exit(f"the HTTP benchmarks need wrk; install it with: sudo sh -c '{cmd}'")
    return found


def hmac_key_hex() -> str:
    from integrand.signing import standard_key

    return standard_key(SECRET).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/demo"

    @property
    def db(self) -> Path:
        return self.workdir / "var" / "integrand.db"

    @property
    def jsonl(self) -> Path:
        return self.workdir / "var" / "events.jsonl"


@contextlib.contextmanager
def server(kind: str, store_keys: str = "") -> Iterator[Server]:
    """Start one server subprocess in a fresh temp dir; always stopped (TERM, then KILL) on exit.

    ``store_keys`` are added to the config's [store] section (bench/pg_store.py: the PostgreSQL backend)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"integrand-bench-{kind}-") as tmp:
        workdir = Path(tmp)
        log = (workdir / "server.log").open("wb")
        if kind == "bare":
            cmd = [sys.executable, str(HERE / "bare.py"), "--port", str(port)]
        else:
            cfg = workdir / "config.toml"
            text = CONFIG.format(port=port, secret=SECRET)
            text = text.replace("[store]\n", "[store]\n" + store_keys, 1)
            if kind == "integrand":
                text += ROUTE
            cfg.write_text(text)
            cmd = [sys.executable, "-c", "import sys; from integrand.cli import main; sys.exit(main())"]
            cmd += ["run", "--config", str(cfg)]
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(port, proc)
            yield Server(kind, proc, port, workdir)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            log.close()
            errors = [
                ln
                for ln in (workdir / "server.log").read_text(errors="replace").splitlines()
                if "ERROR" in ln or "Traceback" in ln
            ]
            if errors:
                print(f"  ! {kind} logged errors: {errors[:3]}", flush=True)


def run_wrk(url: str, connections: int, seconds: float, tag: str) -> dict[str, Any]:
    """One wrk run; returns its RESULT line plus the CPU wrk itself used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [
        ensure_wrk(),
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{int(seconds)}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "signed.lua"),
        url,
        "--",
        tag,
        hmac_key_hex(),
        str(BODY_BYTES),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    res: dict[str, Any] = json.loads(line[len("RESULT ") :])
    res["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res["ok"] = res["requests"] - res["errors_status"]
    res["rps"] = res["ok"] / (res["duration_us"] / 1e6)
    return res


def count_events(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])


def ingest_once(kind: str, connections: int, seconds: float, tag: str) -> dict[str, Any]:
    """Warm up, then one measured wrk run; RSS and server CPU are taken around it."""
    with server(kind) as srv:
        run_wrk(srv.url, connections, WARMUP_SECONDS, f"{tag}w")
        cpu0 = proc_cpu(srv.proc.pid)
        res = run_wrk(srv.url, connections, seconds, tag)
        res["server_cpu_s"] = proc_cpu(srv.proc.pid) - cpu0
        res.update(proc_status(srv.proc.pid))
        if kind != "bare":
            res["stored"] = count_events(srv.db)
    if kind != "bare" and res["errors_status"]:
        print(f"  ! {kind}: {res['errors_status']} non-2xx answers", flush=True)
    return res


class LineCounter:
    """Counts lines of a growing file by reading only what was appended since last time."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.lines = 0

    def poll(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        self.lines += chunk.count(b"\n")
        return self.lines


def e2e_once(connections: int, seconds: float, tag: str, drain_timeout: float = 120.0) -> dict[str, Any]:
    """From the first request to the last line the jsonl sink wrote: sustained events per second."""
    with server("integrand") as srv:
        cpu0 = proc_cpu(srv.proc.pid)
        t0 = time.time()
        res = run_wrk(srv.url, connections, seconds, tag)
        t_load_end = time.time()
        counter = LineCounter(srv.jsonl)
        deadline = time.monotonic() + drain_timeout
        stored = count_events(srv.db)
        while counter.poll() < stored:
            if time.monotonic() > deadline:
                raise RuntimeError(f"jsonl sink wrote {counter.lines} of {stored} events within {drain_timeout} s")
            time.sleep(0.05)
            stored = count_events(srv.db)
        t_last = srv.jsonl.stat().st_mtime
        server_cpu = proc_cpu(srv.proc.pid) - cpu0
        res.update(proc_status(srv.proc.pid))
    res["stored"] = stored
    res["lines"] = counter.lines
    res["e2e_seconds"] = t_last - t0
    res["e2e_eps"] = counter.lines / (t_last - t0)
    res["drain_after_load_s"] = max(0.0, t_last - t_load_end)
    # The daemon's CPU per event, webhook in to line out: what a busy machine's preemption does not inflate.
    res["e2e_cpu_us_per_event"] = server_cpu / max(1, counter.lines) * 1e6
    return res
