"""PostgreSQL benchmarks (issue 14): the postgres sink's throughput, and CDC changes/s and commit → stored latency.

    python bench/pg_bench.py [sink|cdc|all] [--runs 3] [--seconds 10]

sink  rows/s for batches of 1, 100, 1,000 and 10,000: integrand's sink (shipped default, the COPY path,
      the executemany path), beside a plain COPY of the same rows with the same driver (the ceiling: no
      mapping, no conflict handling) and beside executemany of single-row upserts (a hand-written loader).
cdc   a pgbench-style writer (single-row upsert transactions from 8 connections; synchronous_commit off for outbox
      mode on the shared server, on for logical mode on the private fsync=off server: see writer()) against
      `integrand run` with a postgres-cdc source, outbox and logical mode: changes/s sustained with the
      writer flat out, and commit → integrand-stored latency at 1,000 changes/s (client-side commit time
      to the store's commit batch time, read from the store afterwards).

Uses the machine's PostgreSQL (INTEGRAND_TEST_PG_DSN, default 127.0.0.1:5432) in a random schema, and
for logical mode a private wal_level=logical server. Writes bench/pg_results.json and the section
between the PG markers in docs/benchmarks.md.
"""

# ruff: noqa: ASYNC110, ASYNC220, ASYNC221 - a benchmark driver: its blocking process calls are outside the timed parts

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "plugins" / "postgres" / "tests"))

from pg_support import logical_cluster, random_schema  # noqa: E402

from integrand.connector import ConnectorContext, Event  # noqa: E402

RESULTS = HERE / "pg_results.json"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- pg-bench:begin -->", "<!-- pg-bench:end -->"

TABLE = """
CREATE TABLE {name} (
    id bigint PRIMARY KEY, customer text, amount numeric(12,2), due date, status text, lines int,
    etl_loaded_at timestamptz NOT NULL DEFAULT now(), etl_source text, etl_version text, etl_event_id text,
    deleted_at timestamptz
)
"""
COLUMNS = {
    "id": {"path": "entity_id", "convert": "int"},
    "customer": "data.CustomerRef.name",
    "amount": {"path": "data.TotalAmt", "convert": "number"},
    "due": "data.DueDate",
    "status": "data.Status",
    "lines": {"path": "data.LineCount", "convert": "int"},
}
BATCHES = (1, 100, 1000, 10_000)


def rows_for(batch: int) -> int:
    return 300 if batch == 1 else 20_000


class _State:
    async def get(self, key: str) -> Any:
        return None

    async def set(self, key: str, value: Any) -> None:
        return None


def events(n: int) -> list[Event]:
    rnd = random.Random(1)
    return [
        Event(
            id=f"ev{i}",
            source="qbo",
            type="invoice.updated",
            entity="Invoice",
            entity_id=str(i),
            version=f"2026-01-01T00:00:{i % 60:02d}Z",
            data={
                "Id": str(i),
                "TotalAmt": rnd.randint(0, 100_000) / 100,
                "CustomerRef": {"name": f"customer {i % 500}"},
                "DueDate": "2026-02-01",
                "Status": "open",
                "LineCount": rnd.randint(1, 9),
            },
        )
        for i in range(n)
    ]


def plain_tuples(evs: list[Event]) -> list[tuple[Any, ...]]:
    """The rows as the plain COPY and the hand-written loader get them: already mapped and typed."""
    from decimal import Decimal

    due = dt.date(2026, 2, 1)
    return [
        (
            int(e.entity_id or 0),
            e.data["CustomerRef"]["name"],
            Decimal(str(e.data["TotalAmt"])),
            due,
            e.data["Status"],
            e.data["LineCount"],
            e.source,
            e.version,
            e.id,
        )
        for e in evs
    ]


PLAIN_COLS = ["id", "customer", "amount", "due", "status", "lines", "etl_source", "etl_version", "etl_event_id"]
UPSERT = (
    "INSERT INTO {t} AS t (id, customer, amount, due, status, lines, etl_source, etl_version, etl_event_id) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO UPDATE SET customer = excluded.customer, "
    "amount = excluded.amount, due = excluded.due, status = excluded.status, lines = excluded.lines, "
    "etl_source = excluded.etl_source, etl_version = excluded.etl_version, etl_event_id = excluded.etl_event_id "
    "WHERE t.etl_version IS NULL OR excluded.etl_version > t.etl_version"
)


async def bench_sink(runs: int, batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    from integrand_postgres import PostgresSink
    from integrand_postgres.sink import DirectCopy, PostgresSinkConfig

    out: dict[str, Any] = {}
    async with random_schema() as schema:
        con = await schema.connect()
        await con.execute(TABLE.format(name="t"))

        async def fresh() -> None:
            await con.execute("TRUNCATE t")

        def sink(copy_min_rows: int | None) -> PostgresSink:
            table: dict[str, Any] = {"dsn": schema.dsn, "table": "t", "key": "id", "columns": COLUMNS}
            if copy_min_rows is not None:
                table["copy_min_rows"] = copy_min_rows
            cfg = PostgresSinkConfig.model_validate(table)
            ctx = ConnectorContext(name="bench", role="sink", base_dir=ROOT, state=_State())
            return PostgresSink(cfg, ctx)

        variants = {
            "integrand (default)": None,
            "integrand COPY path": 1,
            "integrand executemany path": 10**9,
            "integrand staged merge only (no straight COPY)": None,
        }
        sinks = {k: sink(v) for k, v in variants.items()}
        for s in sinks.values():
            await s.start()
        sinks["integrand staged merge only (no straight COPY)"].plan.direct = False  # the session-5 path
        try:
            for batch in batches:
                n = rows_for(batch)
                evs = events(n)
                tuples = plain_tuples(evs)
                chunks = [evs[i : i + batch] for i in range(0, n, batch)]
                tchunks = [tuples[i : i + batch] for i in range(0, n, batch)]
                res: dict[str, list[float]] = {}
                daemon_cpu: list[float] = []
                async with daemon_sink(schema.dsn, batch) as through_daemon:
                    for run in range(runs):
                        await fresh()
                        t0 = time.perf_counter()
                        for c in tchunks:
                            async with con.transaction():
                                await con.copy_records_to_table("t", records=c, columns=PLAIN_COLS)
                        res.setdefault("plain COPY (ceiling)", []).append(n / (time.perf_counter() - t0))
                        await fresh()
                        t0 = time.perf_counter()
                        for c in tchunks:
                            async with con.transaction():
                                await con.executemany(UPSERT.format(t="t"), c)
                        res.setdefault("executemany of single-row upserts", []).append(n / (time.perf_counter() - t0))
                        # The shipped default path with the rows already mapped (Plan.prepare outside the clock): the
                        # write path alone (staging + merge, or executemany), to tell its cost from the mapping's.
                        s = sinks["integrand (default)"]
                        prepared = [s.plan.prepare(c, [None] * len(c)) for c in chunks]
                        await fresh()
                        s.direct = DirectCopy()
                        t0 = time.perf_counter()
                        for rows in prepared:
                            await s.write(rows)
                        res.setdefault("integrand write path alone (rows pre-mapped)", []).append(
                            n / (time.perf_counter() - t0)
                        )
                        for name, s in sinks.items():
                            await fresh()
                            s.direct = DirectCopy()  # each pass from the same start (no backoff from the last one)
                            t0 = time.perf_counter()
                            for c in chunks:
                                r = await s.deliver_batch(c)
                                assert all(x is None for x in r), r[:3]
                            res.setdefault(name, []).append(n / (time.perf_counter() - t0))
                        # The same rows again with newer versions over the full table: every row an update (the
                        # straight COPY is refused by the key, then skipped for a while: the merge does the work).
                        s = sinks["integrand (default)"]
                        s.direct = DirectCopy()
                        newer = [[dataclasses.replace(e, version=(e.version or "") + ".5") for e in c] for c in chunks]
                        t0 = time.perf_counter()
                        for c in newer:
                            r = await s.deliver_batch(c)
                            assert all(x is None for x in r), r[:3]
                        res.setdefault("integrand (default), every row an update", []).append(
                            n / (time.perf_counter() - t0)
                        )
                        assert await con.fetchval("SELECT count(*) FROM t WHERE etl_version LIKE '%.5'") == n
                        await fresh()
                        rate, cpu = await through_daemon(evs, run)
                        res.setdefault("integrand daemon (store → dispatcher → sink)", []).append(rate)
                        daemon_cpu.append(cpu)
                        assert await con.fetchval("SELECT count(*) FROM t") == n
                med = {k: statistics.median(v) for k, v in res.items()}
                ceiling = res["plain COPY (ceiling)"]
                out[str(batch)] = {
                    "rows": n,
                    "daemon_cpu_us_per_row": statistics.median(daemon_cpu),
                    "rows_per_s": med,
                    "runs": res,
                    "ratio_to_copy": {k: v / med["plain COPY (ceiling)"] for k, v in med.items()},
                    # Each run's own ratio (the variants of one run are measured back to back), then their median.
                    "median_run_ratio": {
                        k: statistics.median(x / c for x, c in zip(v, ceiling, strict=True)) for k, v in res.items()
                    },
                }
                print(
                    f"sink batch {batch}: "
                    + ", ".join(
                        f"{k} {v:,.0f}/s ({out[str(batch)]['median_run_ratio'][k]:.2f})" for k, v in med.items()
                    ),
                    flush=True,
                )
        finally:
            for s in sinks.values():
                await s.close()
            await con.close()
    return out


@contextlib.asynccontextmanager
async def daemon_sink(dsn: str, batch: int) -> Any:
    """An in-process daemon (SQLite store, dispatcher, the postgres sink with ``batch_size = batch``, shipped
    defaults otherwise): ``await drain(events, run)`` stores the events in one commit, then times the dispatcher
    leasing, delivering and completing them all; rows/s."""
    from integrand.app import Daemon
    from integrand.intake import intake
    from integrand.testing import daemon_config, running_daemon

    with tempfile.TemporaryDirectory(prefix="pgbench-sink-") as d:
        body = (
            f"""
[sources.src]
connector = "webhook"
signature = "none"
allow_unsigned = true

[sinks.wh]
connector = "postgres"
dsn = "{dsn}"
table = "t"
key = "id"
batch_size = {batch}
[sinks.wh.columns]
"""
            + "".join(
                f"{k} = {orjson.dumps(v).decode() if isinstance(v, str) else _toml_inline(v)}\n"
                for k, v in COLUMNS.items()
            )
            + """
[[routes]]
from = "src"
to = ["wh"]
"""
        )
        cfg = daemon_config(Path(d), body)
        async with running_daemon(cfg) as daemon:
            assert isinstance(daemon, Daemon)
            wh = daemon.connectors["sink:wh"]
            inner = wh.deliver_batch  # type: ignore[attr-defined]
            state: dict[str, Any] = {"left": 0, "done": asyncio.Event()}

            async def counting(events: Any) -> Any:
                res = await inner(events)
                state["left"] -= sum(1 for r in res if r is None)
                if state["left"] <= 0:
                    state["done"].set()
                return res

            wh.deliver_batch = counting  # type: ignore[attr-defined]

            async def drain(evs: list[Event], run: int) -> tuple[float, float]:
                # New ids and newer versions each run (the store skips a delivery its entity has already seen newer).
                day = f"2026-01-{run + 2:02d}"
                batch_evs = [
                    dataclasses.replace(
                        e, id=f"r{run}-{e.id}", source="src", version=(e.version or "").replace("2026-01-01", day)
                    )
                    for e in evs
                ]
                state["left"], state["done"] = len(batch_evs), asyncio.Event()
                await intake(daemon.store, daemon.listener.router, "src", batch_evs)
                t0, c0 = time.perf_counter(), time.process_time()
                await asyncio.wait_for(state["done"].wait(), 600)
                # rows/s, and the process CPU per row (the daemon's loop and threads; this harness only waits).
                return len(batch_evs) / (time.perf_counter() - t0), (time.process_time() - c0) * 1e6 / len(batch_evs)

            yield drain


def _toml_inline(v: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {orjson.dumps(x).decode()}" for k, x in v.items()) + " }"


# --- CDC -----------------------------------------------------------------------------------------


APP = "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text)"


def daemon_config(dir: Path, dsn: str, mode: str, slot: str) -> Path:
    cfg = dir / "config.toml"
    cfg.write_text(
        f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "warning"
[admin]
enabled = false
[sources.app]
connector = "postgres-cdc"
mode = "{mode}"
dsn = "{dsn}"
tables = ["accounts"]
slot = "{slot}"
publication = "{slot}"
"""
    )
    return cfg


async def writer(
    dsn: str, ids: range, rate: float | None, seconds: float, commits: dict[int, float], sync_commit: str = "off"
) -> None:
    """One pgbench-style client: single-row transactions, at ``rate`` per second (None: flat out)."""
    # Outbox mode, on the shared server: synchronous_commit off for the writer's own sessions (not the server's
    # setting): each fsync'd commit took ~10 ms on this machine, which capped the writer below 1,000/s.
    # Logical mode, on the private server (fsync = off, so commits are cheap anyway): on. Logical decoding
    # sends only WAL that is flushed, and with synchronous_commit off a commit is flushed by the WAL writer
    # (wal_writer_delay, 200 ms): up to 200 ms added by the server before any reader could see the change.
    con = await asyncpg.connect(dsn, server_settings={"synchronous_commit": sync_commit})
    try:
        start = time.perf_counter()
        stmt = await con.prepare(
            "INSERT INTO accounts VALUES ($1, $2, 'x') ON CONFLICT (id) DO UPDATE SET balance = excluded.balance"
        )
        for k, i in enumerate(ids):
            if rate is not None:
                due = start + k / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif time.perf_counter() - start > seconds:
                break
            await stmt.fetch(i, i)
            commits[i] = time.time()
            if rate is not None and time.perf_counter() - start > seconds:
                break
    finally:
        await con.close()


def _proc_cpu(pid: int) -> float:
    """A process's CPU seconds so far (user + system, all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stored(db: Path) -> dict[int, float]:
    """entity id → the store's commit-batch time (events.received_at), first sighting."""
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out: dict[int, float] = {}
        for body, at in con.execute("SELECT body, received_at FROM events ORDER BY id"):
            ev = orjson.loads(body)
            out.setdefault(int(ev["entity_id"]), at)
        return out
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


async def cdc_run(dsn: str, mode: str, rate: float | None, seconds: float) -> dict[str, Any]:
    async with random_schema(dsn) as schema:
        await schema.execute(APP)
        with tempfile.TemporaryDirectory(prefix="pgbench-cdc-") as d:
            dir = Path(d)
            slot = schema.name
            cfg = daemon_config(dir, schema.dsn, mode, slot)
            py = sys.executable
            inst = subprocess.run(
                [py, "-m", "integrand.cli", "postgres", "install", "app", "--config", str(cfg)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert inst.returncode == 0, inst.stderr
            log = (dir / "daemon.log").open("wb")
            prof = os.environ.get("PG_BENCH_PROFILE")  # a cProfile of the daemon, for finding where its time goes
            pre = ["-m", "cProfile", "-o", f"{prof}.{mode}"] if prof else []
            proc = subprocess.Popen(
                [py, *pre, "-m", "integrand.cli", "run", "--config", str(cfg)], stdout=log, stderr=log
            )
            db = dir / "var" / "integrand.db"
            try:
                deadline = time.time() + 30
                while not db.exists() and time.time() < deadline:
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # the source's first read is done
                commits: dict[int, float] = {}
                cpu0 = _proc_cpu(proc.pid)
                sync = "on" if mode == "logical" else "off"
                clients = 8
                per = None if rate is None else rate / clients
                t0 = time.time()
                await asyncio.gather(
                    *(writer(schema.dsn, range(c, 10**8, clients), per, seconds, commits, sync) for c in range(clients))
                )
                wrote = time.time() - t0
                n = len(commits)
                deadline = time.time() + 60
                got: dict[int, float] = {}
                while time.time() < deadline:
                    got = stored(db)
                    if len(got) >= n:
                        break
                    await asyncio.sleep(0.2)
                assert len(got) >= n, f"only {len(got)} of {n} changes stored"
                cpu = _proc_cpu(proc.pid) - cpu0
                lat = sorted((got[i] - commits[i]) * 1000 for i in commits)
                last = max(got[i] for i in commits)
                return {
                    "changes": n,
                    "writer_per_s": n / wrote,
                    "stored_per_s": n / (last - t0),
                    "p50_ms": lat[len(lat) // 2],
                    "p99_ms": lat[int(len(lat) * 0.99)],
                    "max_ms": lat[-1],
                    "daemon_cpu_us_per_change": cpu * 1e6 / n,
                }
            finally:
                proc.terminate()
                with contextlib.suppress(Exception):
                    proc.wait(30)
                log.close()
                subprocess.run(
                    [py, "-m", "integrand.cli", "postgres", "uninstall", "app", "--config", str(cfg)],
                    capture_output=True,
                    timeout=60,
                )


async def bench_cdc(runs: int, seconds: float, modes: list[str], loads: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with logical_cluster() as cluster:
        for mode, dsn in (("outbox", None), ("logical", cluster.dsn)):
            if mode not in modes:
                continue
            from pg_support import base_dsn

            target = dsn or base_dsn()
            for label, rate in (("1,000 changes/s", 1000.0), ("writer flat out", None)):
                if ("paced" if rate else "flat") not in loads:
                    continue
                res = [await cdc_run(target, mode, rate, seconds) for _ in range(runs)]
                med = {k: statistics.median(r[k] for r in res) for k in res[0]}
                out[f"{mode} / {label}"] = {"median": med, "runs": res}
                print(f"cdc {mode} {label}: " + ", ".join(f"{k} {v:,.1f}" for k, v in med.items()), flush=True)
    return out


# --- report ----------------------------------------------------------------------------------------


def machine() -> str:
    cpus = os.cpu_count()
    ver = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    return (
        f"{platform.machine()}, {cpus} cores, Python {platform.python_version()}, asyncpg {asyncpg.__version__}, {ver}"
    )


def render(results: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        "",
        f"Measured {results.get('when', '?')} on {results.get('machine', '?')}, with "
        f"`python bench/pg_bench.py all --runs {results.get('runs', '?')}`; medians of the runs. The machine "
        f"was shared with other agents' builds and tests while this ran (1-minute load average "
        f"{_load(results.get('load'))} on 2 cores): absolute figures "
        "move by tens of percent between runs; the ratios are each run's own (its variants measured back to "
        "back), then their median.",
        "",
    ]
    sink = results.get("sink")
    if sink:
        names = list(next(iter(sink.values()))["rows_per_s"])
        lines += [
            "#### Sink: rows/s by batch size (ratio to plain COPY in brackets)",
            "",
            "| path | " + " | ".join(f"batch {int(b):,}" for b in sink) + " |",
            "|---|" + "---:|" * len(sink),
        ]
        for k in names:
            cells = []
            for r in sink.values():
                ratio = r.get("median_run_ratio", r["ratio_to_copy"])
                cells.append(f"{r['rows_per_s'][k]:,.0f} ({ratio[k]:.2f})" if k in r["rows_per_s"] else "")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        if all("daemon_cpu_us_per_row" in r for r in sink.values()):
            lines.append(
                "| daemon: process CPU µs per row | "
                + " | ".join(f"{r['daemon_cpu_us_per_row']:.1f}" for r in sink.values())
                + " |"
            )
        lines.append("")
    cdc = results.get("cdc")
    if cdc:
        lines += [
            "#### CDC: commit → stored",
            "",
            "| mode / writer | changes | writer changes/s | stored changes/s | p50 ms | p99 ms | max ms "
            "| daemon CPU µs per change |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k, r in cdc.items():
            m = r["median"]
            cpu = m.get("daemon_cpu_us_per_change")
            lines.append(
                f"| {k} | {m['changes']:,.0f} | {m['writer_per_s']:,.0f} | {m['stored_per_s']:,.0f} | "
                f"{m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['max_ms']:.1f} | "
                f"{'' if cpu is None else f'{cpu:.0f}'} |"
            )
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def _load(load: Any) -> str:
    if isinstance(load, str):
        return load  # written by hand when sections were measured in separate runs
    return " → ".join(str(x) for x in load) if load else "not recorded"


def write_doc(results: dict[str, Any]) -> None:
    text = DOC.read_text()
    block = render(results)
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="all", choices=("sink", "cdc", "all"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--modes", default="outbox,logical", help="CDC modes to measure (comma-separated)")
    ap.add_argument("--loads", default="paced,flat", help="CDC writers: paced (1,000/s), flat (flat out)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="sink batch sizes (comma-separated)")
    a = ap.parse_args()
    results: dict[str, Any] = orjson.loads(RESULTS.read_bytes()) if RESULTS.exists() else {}
    load_before = os.getloadavg()
    if a.what in ("sink", "all"):
        results["sink"] = asyncio.run(bench_sink(a.runs, tuple(int(b) for b in a.batches.split(","))))
    if a.what in ("cdc", "all"):
        results["cdc"] = {
            **results.get("cdc", {}),
            **asyncio.run(bench_cdc(a.runs, a.seconds, a.modes.split(","), a.loads.split(","))),
        }
    results["load"] = [round(x, 1) for x in (*load_before[:1], *os.getloadavg()[:1])]  # 1-min load, start and end
    results["when"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results["machine"] = machine()
    results["runs"] = a.runs
    RESULTS.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    write_doc(results)


if __name__ == "__main__":
    main()
