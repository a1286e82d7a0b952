"""Files and limits: state private to the daemon's user under any umask; the fd limit raised at start."""

from __future__ import annotations

import os
import resource
import signal
import stat
from pathlib import Path

import aiohttp
import orjson

from .daemon_proc import DaemonProcess
from .helpers import DEMO, hook_url, read_jsonl, running, settings_for, signed_headers, wait_for, write_config


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def assert_private(var: Path) -> None:
    assert mode(var) == 0o700, oct(mode(var))
    for name in ("integrand.db", "integrand.db-wal", "integrand.db-shm", "out.jsonl"):
        assert mode(var / name) == 0o600, f"{name}: {oct(mode(var / name))}"


async def test_state_is_private_under_umask_022_in_process(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        async with running(settings_for(tmp_path)) as d, aiohttp.ClientSession() as s:
            body = orjson.dumps({"type": "t"})
            async with s.post(hook_url(d), data=body, headers=signed_headers(body, "p1")) as r:
                assert r.status == 200
            await wait_for(lambda: len(read_jsonl(tmp_path / "var" / "out.jsonl")) == 1, timeout=10)
            assert_private(tmp_path / "var")
    finally:
        os.umask(old)


async def test_files_left_open_by_an_older_run_are_tightened(tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir(mode=0o755)
    var.chmod(0o755)
    (var / "out.jsonl").write_bytes(b"")
    (var / "out.jsonl").chmod(0o644)
    async with running(settings_for(tmp_path)):
        assert_private(var)


def open_files_line(pid: int) -> str:
    limits = Path(f"/proc/{pid}/limits").read_text()
    return next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))


async def test_integrand_run_raises_its_fd_limit_and_keeps_state_private(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    daemon = DaemonProcess(write_config(tmp_path, DEMO), tmp_path / "integrand.log")
    old = os.umask(0o022)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))  # the child inherits a low soft limit
    try:
        await daemon.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.umask(old)
    try:
        line = open_files_line(daemon.pid)
        got_soft, got_hard = line.split()[3:5]
        assert got_soft == got_hard == str(hard), line
        async with aiohttp.ClientSession() as s:
            body = orjson.dumps({"type": "t"})
            async with s.post(daemon.url(), data=body, headers=signed_headers(body, "p2")) as r:
                assert r.status == 200
        await wait_for(lambda: len(read_jsonl(tmp_path / "var" / "out.jsonl")) == 1, timeout=10)
        assert_private(tmp_path / "var")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.kill()
