"""The unit's MemoryDenyWriteExecute=yes, reproduced with the kernel's own switch (prctl PR_SET_MDWE, which
is what systemd applies): integrand, uvloop, orjson, pydantic-core and the plugins' cryptography run
without ever mapping memory writable and executable, so the hardening does not break the service."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import orjson

from .daemon_proc import DaemonProcess, jsonl_ids
from .helpers import BASE, DEMO, signed_headers, wait_for, write_config

MDWE = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    raise SystemExit(f"prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()}")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("MDWE is not in force: a W+X mapping was allowed")
except PermissionError:
    print("MDWE in force: W+X mappings refused", flush=True)
import integrand_hubspot, integrand_quickbooks
from cryptography.fernet import Fernet
Fernet(Fernet.generate_key()).encrypt(b"token")  # the QuickBooks plugin's token store
from integrand import cli
sys.exit(cli.main(sys.argv[1:]))
"""


async def test_the_daemon_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    config = write_config(tmp_path, DEMO, BASE)
    d = DaemonProcess(config, tmp_path / "log", python=("-c", MDWE))
    try:
        await d.start()
        assert "MDWE in force" in d.output()
        async with aiohttp.ClientSession() as s:
            for i in range(20):
                body = orjson.dumps({"type": "t.x", "n": i})
                async with s.post(d.url(), data=body, headers=signed_headers(body, f"m{i}")) as resp:
                    assert resp.status == 200
        await wait_for(lambda: len(jsonl_ids(tmp_path / "var" / "out.jsonl")) == 20, timeout=30)
        d.signal(signal.SIGTERM)
        assert await asyncio.wait_for(d.wait(), 30) == 0
    finally:
        await d.kill()
