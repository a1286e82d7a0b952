"""The one-file build: `make dist` makes dist/integrand, a shiv zipapp that runs the end-to-end path
(a signed webhook in, the jsonl sink out, a graceful stop) with nothing but the system's python3."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from .daemon_proc import jsonl_ids
from .helpers import DEMO_SECRET, wait_for

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist" / "integrand"


def bare_pythons() -> list[str]:
    """Interpreters outside the project's venv, without integrand or its dependencies: the system's
    python3 (3.11, required) and any other CPython 3.12 or 3.13 this machine has (pyenv's)."""
    found = ["/usr/bin/python3"]
    for candidate in sorted(Path.home().glob(".pyenv/versions/3.1[23].*/bin/python3")):
        found.append(str(candidate))
    return found


def assert_bare(python: str) -> None:
    probe = subprocess.run([python, "-c", "import aiohttp"], capture_output=True, check=False)
    assert probe.returncode != 0, f"{python} has aiohttp installed: it cannot prove the zipapp carries its own"


@pytest.fixture(scope="session")
def dist() -> Path:
    """Build once per session (make skips it when dist/integrand is newer than the sources)."""
    res = subprocess.run(["make", "-C", str(ROOT), "dist"], capture_output=True, text=True, check=False, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert DIST.exists() and os.access(DIST, os.X_OK)
    return DIST


def env_for(tmp_path: Path) -> dict[str, str]:
    # Nothing from the venv: no VIRTUAL_ENV, no PYTHONPATH; where shiv unpacks goes under tmp_path.
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHIV_ROOT": str(tmp_path / "shiv"), "LANG": "C.UTF-8"}


CONFIG = f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
[admin]
enabled = false
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_id_field = "data.id"
[sinks.events]
connector = "jsonl"
path = "var/events.jsonl"
[[routes]]
from = "demo"
to = ["events"]
"""


# The first test of the session also builds the zipapp (about two minutes on a busy machine).
@pytest.mark.timeout(900)
@pytest.mark.parametrize("python", bare_pythons())
async def test_dist_runs_the_end_to_end_path_with_only_python3(dist: Path, tmp_path: Path, python: str) -> None:
    assert_bare(python)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    env = env_for(tmp_path)
    log = tmp_path / "log"
    listing = await asyncio.create_subprocess_exec(
        python, str(dist), "plugins", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    listed, errors = await listing.communicate()
    assert listing.returncode == 0, errors
    for name in (b"webhook", b"jsonl", b"http", b"http-poll", b"quickbooks", b"hubspot"):
        assert name in listed

    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            python, str(dist), "run", "--config", str(config), env=env, stdout=out, stderr=out
        )
    try:
        await wait_for(lambda: "ready: webhooks on" in log.read_text() or proc.returncode is not None, timeout=60)
        text = log.read_text()
        assert "ready: webhooks on" in text, text
        port = int(text.split("ready: webhooks on 127.0.0.1:")[1].split(",")[0])
        send = await asyncio.create_subprocess_exec(
            python,
            str(dist),
            "send",
            "--config",
            str(config),
            "--url",
            f"http://127.0.0.1:{port}/hooks/demo",
            "--id",
            "msg_dist_1",
            "demo",
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        stdout, _ = await send.communicate(b'{"type": "customer.created", "data": {"id": "c_1"}}')
        assert send.returncode == 0 and stdout.startswith(b"200 OK"), stdout
        await wait_for(lambda: jsonl_ids(tmp_path / "var" / "events.jsonl") == ["msg_dist_1"], timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
