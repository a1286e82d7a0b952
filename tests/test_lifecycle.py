"""Lifecycle of a real ``integrand run``: graceful SIGTERM, a second signal to force exit, ``check`` on bad config."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from integrand.cli import main as cli_main

from .daemon_proc import DaemonProcess, send_many
from .helpers import DEMO_SECRET, signed_headers, wait_for, write_config
from .receiver import Receiver

BASE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "{grace}"

[admin]
enabled = false

[dispatcher]
workers = 2
"""


def config_for(tmp_path: Path, url: str, grace: str = "10s") -> Path:
    body = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.crm]
connector = "http"
url = "{url}"
timeout = "30s"

[[routes]]
from = "demo"
to = ["crm"]
"""
    return write_config(tmp_path, body, BASE.format(grace=grace))


def states(tmp_path: Path) -> dict[str, str]:
    db = sqlite3.connect(tmp_path / "var" / "integrand.db")
    try:
        rows = db.execute("SELECT e.event_id, d.state FROM deliveries d JOIN events e ON e.id = d.event")
        return {r[0]: r[1] for r in rows}
    finally:
        db.close()


@pytest.fixture
async def gated() -> AsyncIterator[Receiver]:
    r = Receiver(gate=asyncio.Event())
    await r.start()
    yield r
    assert r.gate is not None
    r.gate.set()
    await r.stop()


async def post_one(url: str, msg_id: str) -> int | str:
    """The status of one signed POST, or ``"refused"`` when nothing listens any more."""
    body = orjson.dumps({"n": msg_id})
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(url, data=body, headers=signed_headers(body, msg_id)) as resp,
        ):
            if resp.status == 503:
                assert resp.headers["Retry-After"]
            return resp.status
    except aiohttp.ClientConnectionError:
        return "refused"


async def test_sigterm_refuses_new_webhooks_finishes_in_flight_and_exits_0(tmp_path: Path, gated: Receiver) -> None:
    assert gated.gate is not None
    daemon = DaemonProcess(config_for(tmp_path, gated.url), tmp_path / "integrand.log")
    ids = [f"msg_{i}" for i in range(6)]
    try:
        await daemon.start()
        acked, failed = await send_many(daemon.url(), ids, concurrency=2)
        assert acked == set(ids) and not failed
        await wait_for(lambda: gated.pending == 2, timeout=10)  # both workers hold a delivery at the sink

        daemon.signal(signal.SIGTERM)
        await wait_for(lambda: "shutting down: refusing new webhooks" in daemon.output(), timeout=10)
        assert await post_one(daemon.url(), "too-late") in (503, "refused")
        # It waits for the deliveries in flight instead of exiting under them.
        with pytest.raises(TimeoutError):
            await daemon.wait(timeout=0.5)
        gated.gate.set()
        assert await daemon.wait() == 0
    finally:
        await daemon.kill()

    assert [r.status for r in gated.log] == [200, 200]
    final = states(tmp_path)
    assert "too-late" not in final
    delivered = {r.event["id"] for r in gated.log}
    assert {i for i, st in final.items() if st == "done"} == delivered
    assert {i for i, st in final.items() if st == "ready"} == set(ids) - delivered  # released, not lost
    assert "leased" not in final.values()
    assert "stopped" in daemon.output()


async def test_second_signal_exits_at_once_without_losing_acknowledged(tmp_path: Path, gated: Receiver) -> None:
    assert gated.gate is not None
    daemon = DaemonProcess(config_for(tmp_path, gated.url, grace="60s"), tmp_path / "integrand.log")
    ids = [f"msg_{i}" for i in range(6)]
    try:
        await daemon.start()
        acked, _ = await send_many(daemon.url(), ids, concurrency=2)
        assert acked == set(ids)
        await wait_for(lambda: gated.pending == 2, timeout=10)

        daemon.signal(signal.SIGTERM)
        await wait_for(lambda: "shutting down" in daemon.output(), timeout=10)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=5) == 130
        assert time.monotonic() - started < 5  # not the 60 s grace
        assert "received again; exiting now" in daemon.output()

        # Acknowledged data survives: a restart (receiver now answering) delivers every 2xx'd event.
        gated.gate.set()
        await daemon.start()
        assert "released 2 deliveries leased by a previous run" in daemon.output()
        await wait_for(lambda: {r.event["id"] for r in gated.log if r.status == 200} == set(ids), timeout=15)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.kill()
    assert set(states(tmp_path).values()) == {"done"}


async def test_grace_period_bounds_shutdown_and_hands_leases_back(tmp_path: Path, gated: Receiver) -> None:
    daemon = DaemonProcess(config_for(tmp_path, gated.url, grace="1s"), tmp_path / "integrand.log")
    ids = [f"msg_{i}" for i in range(4)]
    try:
        await daemon.start()
        acked, _ = await send_many(daemon.url(), ids, concurrency=2)
        assert acked == set(ids)
        await wait_for(lambda: gated.pending == 2, timeout=10)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=10) == 0  # the sink never answers; the grace period ends the wait
    finally:
        await daemon.kill()
    assert "did not finish within the grace period; they will be redelivered" in daemon.output()
    assert set(states(tmp_path).values()) == {"ready"}  # nothing left leased, nothing marked done


BROKEN = """
[daemon]
listn = "127.0.0.1:8080"
shutdown_grace = "5 minutes"

[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = { env = "INTEGRAND_TEST_UNSET_SECRET" }

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "demo"
to = ["outt"]
"""


def test_check_lists_every_problem_with_its_key_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTEGRAND_TEST_UNSET_SECRET", raising=False)
    path = tmp_path / "config.toml"
    path.write_text(BROKEN)
    assert cli_main(["check", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0] == f"{path}: 4 problem(s):"
    assert sorted(line.strip() for line in lines[1:]) == sorted(
        [
            "daemon.listn: unknown key (did you mean 'listen'?)",
            "daemon.shutdown_grace: expected seconds or a duration like '30s', '5m', '7d', got '5 minutes'",
            "sources.demo.secret: environment variable INTEGRAND_TEST_UNSET_SECRET is not set",
            "routes[0].to[0]: no sink named 'outt' (did you mean 'out'?)",
        ]
    )
    assert not (tmp_path / "var").exists()  # check touches nothing


def test_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config_for(tmp_path, "http://127.0.0.1:9/in")
    assert cli_main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: OK — 1 source(s), 1 sink(s), 1 route(s)")
