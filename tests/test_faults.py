"""Faults at the store and the disk, injected into a real ``integrand run``: EIO on fsync and on write,
a full disk (ENOSPC), a slow fsync (an LD_PRELOAD shim compiled here with gcc), and a second process
holding SQLite's write lock. Defined behaviour: webhooks are refused with 503 and Retry-After while the
store cannot commit, nothing refused is half-stored, nothing acknowledged is lost, and it recovers by
itself once the fault is gone."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from .daemon_proc import DaemonProcess, jsonl_ids
from .helpers import DEMO, signed_headers, wait_for, write_config

SHIM_SOURCE = Path(__file__).parent / "faults" / "faultshim.c"

BASE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "5s"

[admin]
enabled = false

[store]
busy_timeout = "0.5s"
"""


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc is not None, "the fault-injection tests need gcc (apt-get install -y gcc)"
    out = tmp_path_factory.mktemp("shim") / "faultshim.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM_SOURCE), "-ldl"], check=True)
    return out


@pytest.fixture
def faulty(tmp_path: Path, shim: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[DaemonProcess, Path]:
    """A daemon whose database files go through the shim; write the returned control file to inject."""
    ctl = tmp_path / "fault"
    monkeypatch.setenv("LD_PRELOAD", str(shim))
    monkeypatch.setenv("FAULT_CTL", str(ctl))
    monkeypatch.setenv("FAULT_MATCH", "integrand.db")
    return DaemonProcess(write_config(tmp_path, DEMO, BASE), tmp_path / "integrand.log"), ctl


async def post_many(url: str, ids: list[str]) -> dict[str, tuple[int, str | None]]:
    """id → (status, Retry-After), all concurrently."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:

        async def one(i: str) -> tuple[str, tuple[int, str | None]]:
            body = orjson.dumps({"type": "t", "n": i})
            async with s.post(url, data=body, headers=signed_headers(body, i)) as r:
                await r.read()
                return i, (r.status, r.headers.get("Retry-After"))

        return dict(await asyncio.gather(*(one(i) for i in ids)))


def stored_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return {r[0] for r in c.execute("SELECT event_id FROM events")}


async def recovered(url: str, tag: str) -> bool:
    got = await post_many(url, [f"{tag}-{time.monotonic_ns()}"])
    return all(s == 200 for s, _ in got.values())


@pytest.mark.parametrize("fault", ["fsync-eio", "write-eio", "write-enospc"])
async def test_store_io_errors_are_503_then_recover_and_lose_nothing(
    tmp_path: Path, faulty: tuple[DaemonProcess, Path], fault: str
) -> None:
    daemon, ctl = faulty
    out, db = tmp_path / "var" / "out.jsonl", tmp_path / "var" / "integrand.db"
    try:
        await daemon.start()
        before = await post_many(daemon.url(), [f"a{i}" for i in range(30)])
        assert {s for s, _ in before.values()} == {200}

        ctl.write_text(fault)
        during = await post_many(daemon.url(), [f"b{i}" for i in range(30)])
        assert {s for s, _ in during.values()} == {503}, during
        assert {ra for _, ra in during.values()} == {"5"}  # Retry-After on every refusal
        assert daemon.proc is not None and daemon.proc.returncode is None  # still running

        ctl.write_text("")
        await wait_for(lambda: recovered(daemon.url(), "probe"), timeout=20, interval=0.2)
        after = await post_many(daemon.url(), [f"c{i}" for i in range(30)])
        assert {s for s, _ in after.values()} == {200}
        acked = {i for part in (before, after) for i, (s, _) in part.items() if s == 200}
        await wait_for(lambda: set(jsonl_ids(out)) >= acked, timeout=20)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        ctl.write_text("")
        await daemon.kill()
    stored = stored_ids(db)
    assert acked <= stored
    assert not {f"b{i}" for i in range(30)} & stored  # refused with 503: not half-stored either
    # The operator is told, once per interval rather than once per refused request.
    log = daemon.output()
    assert "webhook refused with 503, store unavailable" in log
    assert log.count("webhook refused with 503") <= 6, log


async def test_slow_fsync_slows_webhooks_but_fails_none(tmp_path: Path, faulty: tuple[DaemonProcess, Path]) -> None:
    daemon, ctl = faulty
    try:
        await daemon.start()
        ctl.write_text("slow-fsync 150")
        started = time.monotonic()
        got = await post_many(daemon.url(), [f"s{i}" for i in range(40)])
        took = time.monotonic() - started
        assert {s for s, _ in got.values()} == {200}
        assert took >= 0.15  # the shim really held the commit's fsync
        ctl.write_text("")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        ctl.write_text("")
        await daemon.kill()


HOLD_LOCK = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
c.execute("ROLLBACK")
"""


async def test_sqlite_busy_from_a_second_process_is_503_then_recovers(tmp_path: Path) -> None:
    daemon = DaemonProcess(write_config(tmp_path, DEMO, BASE), tmp_path / "integrand.log")
    db = tmp_path / "var" / "integrand.db"
    holder = None
    try:
        await daemon.start()
        assert {s for s, _ in (await post_many(daemon.url(), ["x0"])).values()} == {200}
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLD_LOCK, str(db), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 10) == b"locked\n"
        during = await post_many(daemon.url(), [f"y{i}" for i in range(10)])
        assert {s for s, _ in during.values()} == {503}, during  # after busy_timeout (0.5 s), not forever
        assert holder.stdin is not None
        holder.stdin.close()
        await holder.wait()
        await wait_for(lambda: recovered(daemon.url(), "busy"), timeout=20, interval=0.2)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        if holder is not None and holder.returncode is None:
            holder.kill()
            await holder.wait()
        await daemon.kill()
    assert not {f"y{i}" for i in range(10)} & stored_ids(db)
