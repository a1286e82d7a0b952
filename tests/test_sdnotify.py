"""systemd's notify protocol from a real ``integrand run``, read from a real NOTIFY_SOCKET datagram socket.

READY only once the webhook port answers, WATCHDOG at half of WATCHDOG_USEC from the event loop (a loop
stuck in a blocking call stops it), STATUS with the queue depth, RELOADING then READY on SIGHUP, STOPPING
on SIGTERM; and a fatal internal error exits non-zero so that Restart=on-failure fires.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from integrand.sdnotify import listen_fds, watchdog_interval

from .daemon_proc import DaemonProcess
from .helpers import BASE, DEMO, signed_headers, write_config


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; each datagram is kept with its arrival time,
    read by the test's event loop as it arrives."""

    def __init__(self) -> None:
        # sun_path is limited to 108 bytes, so not under pytest's long tmp_path.
        self.dir = Path(tempfile.mkdtemp(prefix="sdn-"))
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._drain)

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    async def wait(self, key: str, value: str | None = None, *, after: float = 0.0, timeout: float = 20.0) -> float:
        """Arrival time of the first message since ``after`` that has ``key`` (``=value``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, fields in self.messages:
                if at >= after and key in fields and (value is None or fields[key] == value):
                    return at
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {[m for _, m in self.messages]}")

    def times(self, key: str, start: float, end: float = float("inf")) -> list[float]:
        return [at for at, fields in self.messages if key in fields and start <= at <= end]

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
async def notify() -> AsyncIterator[NotifySocket]:
    n = NotifySocket()
    n.start()
    yield n
    n.close()


async def post(port: int, msg_id: str) -> int:
    body = orjson.dumps({"type": "t.x", "n": msg_id})
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/hooks/demo", data=body, headers=signed_headers(body, msg_id)) as resp,
    ):
        return resp.status


WATCHDOG_USEC = 1_000_000  # pings every 0.5 s


async def test_ready_after_bind_watchdog_status_reload_stopping(tmp_path: Path, notify: NotifySocket) -> None:
    config = write_config(tmp_path, DEMO, BASE)
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    d = DaemonProcess(config, tmp_path / "log", env=env)
    await d.start()
    try:
        ready_at = await notify.wait("READY", "1")
        # READY came after the port was bound and the store opened: a webhook is taken right away.
        assert await post(d.port, "m1") == 200
        assert any("queue:" in f.get("STATUS", "") for _, f in notify.messages if "READY" in f)

        # WATCHDOG at half the interval, all the time the daemon is idle.
        await asyncio.sleep(3.2)
        pings = notify.times("WATCHDOG", ready_at)
        assert 4 <= len(pings) <= 9, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps  # systemd would kill us past WATCHDOG_USEC

        hup = time.monotonic()
        d.signal(signal.SIGHUP)
        reloading = await notify.wait("RELOADING", "1", after=hup)
        [fields] = [f for at, f in notify.messages if at == reloading]
        assert int(fields["MONOTONIC_USEC"]) > 0
        ready_again = await notify.wait("READY", "1", after=reloading)
        assert ready_again >= reloading
        assert "reloaded" in d.output()

        term = time.monotonic()
        d.signal(signal.SIGTERM)
        await notify.wait("STOPPING", "1", after=term)
        assert await d.wait() == 0
    finally:
        await d.kill()


# A loop stuck in a blocking call (a connector calling time.sleep, say) on SIGUSR1, for 3 s.
STUCK_LOOP = """
import asyncio, signal, sys, time
from integrand import app, cli
_run = app.run
async def run(settings, *args, **kwargs):
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: time.sleep(3))
    await _run(settings, *args, **kwargs)
app.run = run
sys.exit(cli.main(sys.argv[1:]))
"""


async def test_a_stuck_event_loop_stops_the_watchdog(tmp_path: Path, notify: NotifySocket) -> None:
    config = write_config(tmp_path, DEMO, BASE)
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    d = DaemonProcess(config, tmp_path / "log", env=env, python=("-c", STUCK_LOOP))
    await d.start()
    try:
        ready_at = await notify.wait("READY", "1")
        await asyncio.sleep(1.6)
        assert len(notify.times("WATCHDOG", ready_at)) >= 2
        d.signal(signal.SIGUSR1)
        stuck = time.monotonic()
        await asyncio.sleep(2.5)
        # The process is alive but its loop is blocked: no ping for longer than WATCHDOG_USEC.
        late = notify.times("WATCHDOG", stuck + 0.3)
        assert late == [], late
        # Once the loop runs again, so does the watchdog.
        await notify.wait("WATCHDOG", "1", after=time.monotonic(), timeout=5)
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
    finally:
        await d.kill()


# The dispatcher task raising (a bug): today's main logged it and exited 0, so systemd never restarted it.
DISPATCHER_RAISES = """
import asyncio, sys
from integrand import cli, dispatcher
async def run(self):
    await asyncio.sleep(0.5)
    raise RuntimeError("boom in the dispatcher")
dispatcher.Dispatcher.run = run
sys.exit(cli.main(sys.argv[1:]))
"""


async def test_a_fatal_internal_error_exits_non_zero(tmp_path: Path, notify: NotifySocket) -> None:
    config = write_config(tmp_path, DEMO, BASE)
    d = DaemonProcess(
        config, tmp_path / "log", env={"NOTIFY_SOCKET": str(notify.path)}, python=("-c", DISPATCHER_RAISES)
    )
    await d.start()
    try:
        code = await d.wait()
        assert code == 1, d.output()
        assert "exiting with status 1: dispatcher failed (RuntimeError: boom in the dispatcher)" in d.output()
        await notify.wait("STOPPING", "1")
    finally:
        await d.kill()


# The store's writer task dying (a bug in a commit): every later webhook would wait forever.
WRITER_RAISES = """
import sys
from integrand import cli, store
_commit = store.Store._commit
calls = 0
async def commit(self, batch):
    global calls
    calls += 1
    if calls == 5:
        raise RuntimeError("boom in the store writer")
    await _commit(self, batch)
store.Store._commit = commit
sys.exit(cli.main(sys.argv[1:]))
"""


async def test_the_store_writer_dying_exits_non_zero(tmp_path: Path) -> None:
    config = write_config(tmp_path, DEMO, BASE)
    d = DaemonProcess(config, tmp_path / "log", python=("-c", WRITER_RAISES))
    await d.start()
    try:
        for i in range(10):
            try:
                await asyncio.wait_for(post(d.port, f"m{i}"), 5)
            except (TimeoutError, aiohttp.ClientError):
                break
        code = await d.wait()
        assert code == 1, d.output()
        assert "exiting with status 1: store-writer failed (RuntimeError: boom in the store writer)" in d.output()
    finally:
        await d.kill()


async def test_exit_is_prompt_after_stopped(tmp_path: Path) -> None:
    config = write_config(tmp_path, DEMO, BASE)
    d = DaemonProcess(config, tmp_path / "log")
    await d.start()
    try:
        assert await post(d.port, "m1") == 200
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
        exited = time.time()
        stopped_line = next(line for line in d.output().splitlines() if line.endswith("integrand: stopped"))
        # "2026-12-07 00:47:25,776 INFO ..." — the log's own clock, the same as time.time().
        stamp = time.mktime(time.strptime(stopped_line[:19], "%Y-%m-%d %H:%M:%S")) + int(stopped_line[20:23]) / 1000
        assert exited - stamp < 0.4, f"exited {exited - stamp:.2f} s after logging 'stopped'"
    finally:
        await d.kill()


def test_watchdog_interval_only_for_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "nope"}) is None


def test_listen_fds_only_for_this_process() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "webhooks"}
    assert listen_fds(env) == []
    assert env == {}  # never handed on to children
