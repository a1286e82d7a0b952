"""kill -9 of a real daemon between a poll and its commit, and in the middle of a multi-page pass."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from asyncio.subprocess import DEVNULL, Process
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from .fake_rest import FakeRest
from .helpers import BASE, read_jsonl, wait_for, write_config
from .test_http_poll import check_exactly_once, poll_config

QUIET = BASE.replace('log_level = "debug"', 'log_level = "info"')
STORE = """
[store]
busy_timeout = "60s"
"""


async def start_daemon(cfg: Path, log: Path) -> Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "integrand.cli", "run", "-c", str(cfg), stdout=DEVNULL, stderr=log.open("ab")
    )


def committed(db: Path) -> tuple[Any, int]:
    """The poll cursor and the number of stored events, read from the file as it is on disk."""
    with sqlite3.connect(db) as c:
        row = c.execute("SELECT value FROM cursors WHERE source = 'crm' AND kind = 'poll'").fetchone()
        n = c.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    return (orjson.loads(row[0]) if row else None), int(n)


def not_done(db: Path) -> set[str]:
    """Event ids with a delivery not yet acknowledged (what a kill -9 may redeliver)."""
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "SELECT e.event_id FROM deliveries d JOIN events e ON e.id = d.event WHERE d.state != 'done'"
        ).fetchall()
    return {r[0] for r in rows}


def all_event_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as c:
        return {r[0] for r in c.execute("SELECT event_id FROM events")}


def all_delivered(db: Path, out: Path, n: int) -> bool:
    """The store holds ``n`` events and the sink's file all of them, judged on one read of each.

    The store is read first and once: the file only grows, so if it holds every event of that
    read, it held them when it was read. Reading the store twice (once for the ids, once for
    their count) let a page committed between the reads count as delivered before the sink
    wrote it: under load the check passed with the last page's entities not yet in the file.
    """
    ids = all_event_ids(db)
    return len(ids) == n and {ln["id"] for ln in read_jsonl(out)} >= ids


def dedup(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines an idempotent sink would keep: the first of each event id."""
    seen: set[str] = set()
    out = []
    for ln in lines:
        if ln["id"] not in seen:
            seen.add(ln["id"])
            out.append(ln)
    return out


async def kill9(proc: Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == -signal.SIGKILL


async def test_kill_between_poll_and_commit(tmp_path: Path) -> None:
    api = FakeRest(seed=21, page_size=50)
    base = await api.start()
    out = tmp_path / "var" / "out.jsonl"
    db = tmp_path / "var" / "integrand.db"
    cfg = write_config(tmp_path, STORE + poll_config(base), base=QUIET)
    proc = await start_daemon(cfg, tmp_path / "daemon.log")
    try:
        for i in range(5):
            await api.change(f"c{i}")
        await wait_for(lambda: len(read_jsonl(out)) == 5, timeout=30)
        # Wait for the acks too: a delivery written but not yet marked done would be redelivered.
        await wait_for(lambda: not_done(db) == set(), timeout=30)
        await wait_for(lambda: committed(db)[0] is not None and committed(db)[0]["page"] is None)
        cursor_before, events_before = committed(db)
        # Hold the write lock: the daemon can still read its cursor and poll, but its commit waits.
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        n = len(api.requests)
        for i in range(5, 9):
            await api.change(f"c{i}")
        # A poll after the changes has been answered: its events are in the daemon, not on disk.
        await wait_for(lambda: any(r.items for r in api.requests[n:]))
        await kill9(proc)
        lock.execute("ROLLBACK")
        lock.close()
        cursor_after, events_after = committed(db)
        assert (cursor_after, events_after) == (cursor_before, events_before)

        proc = await start_daemon(cfg, tmp_path / "daemon.log")
        await wait_for(
            lambda: {ln["entity_id"]: ln["version"] for ln in read_jsonl(out)} == api.final_versions(), timeout=30
        )
        check_exactly_once(read_jsonl(out), api)
        cursor, events = committed(db)
        assert cursor["since"] == max(api.final_versions().values())
        assert events == 9
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        await api.close()


async def test_kill_during_a_multi_page_pass(tmp_path: Path) -> None:
    api = FakeRest(seed=22, page_size=3)
    base = await api.start()
    out = tmp_path / "var" / "out.jsonl"
    db = tmp_path / "var" / "integrand.db"
    cfg = write_config(tmp_path, STORE + poll_config(base), base=QUIET)
    for i in range(20):  # seven pages waiting before the first poll
        await api.change(f"c{i}")
    pages_served = 0
    holder: dict[str, Process] = {}
    original = api.list_records

    async def list_then_die(request: web.Request) -> web.Response:
        nonlocal pages_served
        if request.query.get("after"):
            pages_served += 1
            if pages_served == 4:  # the daemon dies asking for the fifth page
                os.kill(holder["p"].pid, signal.SIGKILL)
                raise web.HTTPServiceUnavailable()
        return await original(request)

    api.list_records = list_then_die  # type: ignore[method-assign]
    try:
        holder["p"] = await start_daemon(cfg, tmp_path / "daemon.log")
        await asyncio.wait_for(holder["p"].wait(), 30)
        assert holder["p"].returncode == -signal.SIGKILL
        cursor, events = committed(db)
        # Pages 1-4 were committed with their cursors; the pass is half done and says where it stopped.
        assert cursor["page"] is not None
        assert events == 12
        assert len(read_jsonl(out)) <= 12
        # At-least-once: a delivery the dead process had written but not yet acked goes out again.
        in_flight = not_done(db)

        api.list_records = original  # type: ignore[method-assign]
        holder["p"] = await start_daemon(cfg, tmp_path / "daemon.log")
        await wait_for(lambda: all_delivered(db, out, 20), timeout=30)
        await wait_for(lambda: committed(db)[0]["page"] is None)
        lines = read_jsonl(out)
        repeated = {i for i, n in Counter(ln["id"] for ln in lines).items() if n > 1}
        assert repeated <= in_flight, f"repeated {repeated - in_flight} that were acked before the kill"
        check_exactly_once(dedup(lines), api)
        assert committed(db)[1] == 20
    finally:
        p = holder.get("p")
        if p is not None and p.returncode is None:
            p.send_signal(signal.SIGTERM)
            await asyncio.wait_for(p.wait(), 30)
        await api.close()
