"""One node on SQLite, one, two and three nodes on one PostgreSQL: throughput, p99 and CPU per event, same run.

    python bench/cluster_bench.py [--runs 3] [--seconds 10] [--setups sqlite1,pg1,pg2,pg3] [--json FILE]

Each run measures every setup back to back (interleaved, so a change in the machine's load hits
all of them alike). A setup is N ``integrand run`` nodes with shipped defaults (bench/http_bench.py's
config: a webhook source routed to a jsonl sink, each node its own sink file) and, for ``pgN``, one
PostgreSQL 15 server of the benchmark's own (initdb'd under a temp dir on a free port, default
settings: fsync and synchronous_commit on; a fresh database per measurement). wrk sends signed
webhooks with unique ids at 64 connections in all, split evenly over the nodes (one wrk per node,
all at once), so the offered load is the same for every setup.

Figures per measurement:
- ingest: webhooks acknowledged (2xx) per second over the load, summed over the nodes; p99 is the
  highest of the nodes' wrk p99s;
- end to end: events written by the sinks (all nodes) per second, from the first request to the
  last line written;
- CPU seconds per delivered event, from /proc: the integrand processes, the PostgreSQL server (the
  postmaster and every child, exited ones included through its cutime/cstime) and wrk.

Why a private server: its CPU is all ours to count (the machine's shared PostgreSQL serves other
work too), and nobody else's load lands in it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import http_bench  # noqa: E402

PG_BIN = Path(os.environ.get("INTEGRAND_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_KEYS = 'backend = "postgres"\ndsn = {env = "INTEGRAND_BENCH_STORE_DSN"}\n'
CONNECTIONS = 64
TICK = os.sysconf("SC_CLK_TCK")


# --- a PostgreSQL server of the benchmark's own ------------------------------------------------------


class PrivatePostgres:
    """initdb + pg_ctl under a temp dir (as the postgres user when root: initdb refuses root)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="integrand-bench-pg-"))
        self.port = http_bench.free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = self.root / "data"

    def __enter__(self) -> PrivatePostgres:
        run = [*self.as_user]
        subprocess.run(
            [*run, str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=180,
        )
        subprocess.run([*run, "mkdir", "-p", str(self.root / "sock")], check=True, timeout=10)
        opts = f"-c port={self.port} -c listen_addresses=127.0.0.1 -k {self.root / 'sock'} -c max_connections=100"
        subprocess.run(
            [
                *run,
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                opts,
                "-w",
                "-l",
                str(self.root / "log"),
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(
            [*self.as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def cpu(self) -> float:
        """CPU seconds of the whole server so far: the postmaster, its live children, and its reaped ones."""
        pm = int((self.data / "postmaster.pid").read_text().split()[0])
        fields = _stat(pm)
        total = sum(int(f) for f in fields[11:15]) / TICK  # utime, stime, cutime, cstime
        for pid in _children(pm):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += sum(int(f) for f in _stat(pid)[11:13]) / TICK
        return total

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        asyncio.run(_sql(self.dsn(), f'CREATE DATABASE "{name}"'))
        try:
            yield self.dsn(name)
        finally:
            asyncio.run(_sql(self.dsn(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


async def _sql(dsn: str, sql: str) -> Any:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


# --- load: one wrk per node, all at once ---------------------------------------------------------------


def wrk_many(urls: list[str], seconds: float, tag: str) -> list[dict[str, Any]]:
    """``CONNECTIONS`` in all, split over ``urls``; each wrk's RESULT line and its own CPU seconds."""
    each = max(1, CONNECTIONS // len(urls))
    procs = []
    for i, url in enumerate(urls):
        cmd = [
            http_bench.ensure_wrk(),
            f"-t{1 if len(urls) > 1 else http_bench.WRK_THREADS}",
            f"-c{each}",
            f"-d{int(seconds)}s",
            "--timeout",
            "10s",
            "-s",
            str(HERE / "signed.lua"),
            url,
            "--",
            f"{tag}n{i}",
            http_bench.hmac_key_hex(),
            str(http_bench.BODY_BYTES),
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results: list[dict[str, Any]] = []
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 60)
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        res: dict[str, Any] = orjson.loads(line[len("RESULT ") :])
        res["ok"] = res["requests"] - res["errors_status"]
        res["rps"] = res["ok"] / (res["duration_us"] / 1e6)
        results.append(res)
    return results


def _wrk_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --- one measurement -------------------------------------------------------------------------------------


def _stored_pg(dsn: str) -> int:
    return int(asyncio.run(_sql(dsn, "SELECT count(*) FROM events")))


def measure(setup: str, pg: PrivatePostgres | None, seconds: float, tag: str) -> dict[str, Any]:
    nodes = 1 if setup == "sqlite1" else int(setup.removeprefix("pg"))
    with contextlib.ExitStack() as stack:
        keys = ""
        dsn = None
        if setup != "sqlite1":
            assert pg is not None
            dsn = stack.enter_context(pg.database())
            os.environ["INTEGRAND_BENCH_STORE_DSN"] = dsn
            keys = PG_KEYS
        servers = [stack.enter_context(http_bench.server("integrand", keys)) for _ in range(nodes)]
        # Warm-up: every node has opened its store and its pool before the clock starts.
        wrk_many([s.url for s in servers], 1, f"{tag}w")
        counters = [http_bench.LineCounter(s.jsonl) for s in servers]
        warm_lines = sum(c.poll() for c in counters)
        warm_stored = _stored_pg(dsn) if dsn else http_bench.count_events(servers[0].db)
        while warm_lines < warm_stored:  # the warm-up's events delivered, so they are not counted below
            time.sleep(0.05)
            warm_lines = sum(c.poll() for c in counters)
        cpu0 = [http_bench.proc_cpu(s.proc.pid) for s in servers]
        pg0 = pg.cpu() if pg is not None and dsn else 0.0
        wrk0 = _wrk_cpu()
        t0 = time.time()
        loads = wrk_many([s.url for s in servers], seconds, tag)
        t_load_end = time.time()
        wrk_cpu = _wrk_cpu() - wrk0
        deadline = time.monotonic() + 180

        def stored() -> int:
            return _stored_pg(dsn) if dsn else http_bench.count_events(servers[0].db)

        total = stored()
        while sum(c.poll() for c in counters) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{setup}: sinks wrote {sum(c.lines for c in counters)} of {total} within 180 s")
            time.sleep(0.05)
            total = stored()
        t_last = max(s.jsonl.stat().st_mtime for s in servers if s.jsonl.exists())
        integrand_cpu = sum(http_bench.proc_cpu(s.proc.pid) - c for s, c in zip(servers, cpu0, strict=True))
        pg_cpu = (pg.cpu() - pg0) if pg is not None and dsn else 0.0
        rss = [http_bench.proc_status(s.proc.pid)["VmHWM"] for s in servers]
    delivered = sum(c.lines for c in counters) - warm_lines
    ok = sum(r["ok"] for r in loads)
    errors = sum(r["errors_status"] + r["errors_connect"] + r["errors_read"] + r["errors_timeout"] for r in loads)
    return {
        "setup": setup,
        "nodes": nodes,
        "ingest_rps": sum(r["rps"] for r in loads),
        "p99_ms": max(r["p99_us"] for r in loads) / 1000,
        "p50_ms": statistics.median(r["p50_us"] for r in loads) / 1000,
        "acked": ok,
        "errors": errors,
        "delivered": delivered,
        "e2e_eps": delivered / (t_last - t0),
        "drain_after_load_s": max(0.0, t_last - t_load_end),
        "cpu_integrand_ms_per_event": 1000 * integrand_cpu / max(1, delivered),
        "cpu_postgres_ms_per_event": 1000 * pg_cpu / max(1, delivered),
        "cpu_wrk_ms_per_event": 1000 * wrk_cpu / max(1, delivered),
        "integrand_cpu_s": integrand_cpu,
        "postgres_cpu_s": pg_cpu,
        "peak_rss_kib": rss,
        "loadavg": os.getloadavg(),
    }


def _line(m: dict[str, Any]) -> str:
    return (
        f"{m['setup']:<8} ingest {m['ingest_rps']:7.0f}/s p99 {m['p99_ms']:6.0f} ms | e2e {m['e2e_eps']:7.0f}/s "
        f"({m['delivered']} events, drain {m['drain_after_load_s']:.1f} s) | CPU ms/event: integrand "
        f"{m['cpu_integrand_ms_per_event']:.2f}, postgres {m['cpu_postgres_ms_per_event']:.2f}, wrk "
        f"{m['cpu_wrk_ms_per_event']:.2f} | errors {m['errors']} | load {m['loadavg'][0]:.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--setups", default="sqlite1,pg1,pg2,pg3")
    parser.add_argument("--json", type=Path, default=HERE / "cluster_results.json")
    args = parser.parse_args()
    setups = args.setups.split(",")
    out: dict[str, Any] = {"setups": setups, "seconds": args.seconds, "runs": [], "loadavg_start": os.getloadavg()}
    lock = threading.Lock()
    with PrivatePostgres() as pg:
        out["postgres"] = asyncio.run(_sql(pg.dsn(), "SELECT version()"))
        for r in range(args.runs):
            run: dict[str, Any] = {}
            for setup in setups:
                m = measure(setup, pg, args.seconds, f"c{r}{setup}x{int(time.time())}")
                with lock:
                    print(f"run {r + 1}/{args.runs} {_line(m)}", flush=True)
                run[setup] = m
            out["runs"].append(run)
    med: dict[str, dict[str, float]] = {}
    keys = ("ingest_rps", "p99_ms", "e2e_eps", "cpu_integrand_ms_per_event", "cpu_postgres_ms_per_event")
    for setup in setups:
        med[setup] = {k: statistics.median(run[setup][k] for run in out["runs"]) for k in keys}
    if "sqlite1" in setups:
        for setup in setups:
            med[setup]["e2e_ratio_vs_sqlite1"] = statistics.median(
                run[setup]["e2e_eps"] / run["sqlite1"]["e2e_eps"] for run in out["runs"]
            )
    out["medians"] = med
    print("medians:")
    for setup, m in med.items():
        ratio = f", e2e ÷ sqlite1 {m['e2e_ratio_vs_sqlite1']:.2f}" if "e2e_ratio_vs_sqlite1" in m else ""
        print(
            f"  {setup:<8} ingest {m['ingest_rps']:.0f}/s, p99 {m['p99_ms']:.0f} ms, e2e {m['e2e_eps']:.0f}/s{ratio}; "
            f"CPU ms/event integrand {m['cpu_integrand_ms_per_event']:.2f}, postgres {m['cpu_postgres_ms_per_event']:.2f}"
        )
    args.json.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
