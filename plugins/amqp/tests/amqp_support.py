"""The machine's RabbitMQ (127.0.0.1:5672, guest/guest) in a vhost of the test session's own, removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import pytest

from integrand.testing import wait_for

HOST, PORT = "127.0.0.1", 5672
HOW_TO_START = (
    "RabbitMQ is not reachable on 127.0.0.1:5672 (guest/guest); start it with: rabbitmq-server -detached "
    "(Debian package rabbitmq-server), then wait for `rabbitmqctl await_startup`"
)


def reachable() -> None:
    try:
        with socket.create_connection((HOST, PORT), timeout=2):
            pass
    except OSError as e:
        pytest.fail(f"{HOW_TO_START} ({e})")


def ctl(*args: str) -> str:
    """``rabbitmqctl`` (how vhosts are made here: the management API is not enabled on this machine)."""
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    try:
        res = subprocess.run([exe, "-q", *args], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {e}; {HOW_TO_START}")
    if res.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}; {HOW_TO_START}")
    return res.stdout


@pytest.fixture(scope="session", name="vhost")
def vhost_session() -> Iterator[str]:
    """A random vhost for a test module's AMQP tests (each test names its own exchanges and queues), removed after."""
    name = make_vhost()
    try:
        yield name
    finally:
        drop_vhost(name)


def make_vhost() -> str:
    reachable()
    name = f"integrand_test_{secrets.token_hex(4)}"
    ctl("add_vhost", name)
    ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name


def drop_vhost(name: str) -> None:
    ctl("delete_vhost", name)


def cut_connections(vhost: str) -> None:
    """Close every client connection to ``vhost`` from the broker's side (a dropped connection, as a network cut)."""
    ctl("close_all_connections", "-p", vhost, "integrand test: connection cut")


def url(vhost: str) -> str:
    return f"amqp://guest:guest@{HOST}:{PORT}/{vhost}"


def name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(3)}"


@asynccontextmanager
async def channel(vhost: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    conn = await aio_pika.connect(url(vhost), timeout=5)
    try:
        yield await conn.channel(publisher_confirms=True)
    finally:
        await conn.close()


async def consuming(vhost: str, queue: str) -> bool:
    """Whether ``queue`` exists and has a consumer (so its bindings are in place); a passive declare whose
    failure closes only a throwaway channel."""
    conn = await aio_pika.connect(url(vhost), timeout=5)
    try:
        ch = await conn.channel()
        try:
            q = await ch.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        return bool(q.declaration_result.consumer_count)
    finally:
        await conn.close()


class PrivateRabbit:
    """A RabbitMQ node of the test's own (its node name, AMQP and distribution ports, data and log dirs, cookie
    under ``root``) to kill -9 and start again: the machine's node is shared with other users and stays up."""

    SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the script itself: the /usr/sbin wrapper changes user

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"integrand_test_{secrets.token_hex(3)}@localhost"
        self.proc: asyncio.subprocess.Process | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self, timeout: float = 120.0) -> None:
        if not Path(self.SERVER).exists():
            pytest.fail(f"{self.SERVER} is missing: {HOW_TO_START}")
        r = self.root
        env = {
            **os.environ,
            "HOME": str(r),  # its own .erlang.cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(r / "mnesia"),
            "RABBITMQ_LOG_BASE": str(r / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(r / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(r / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(r / "pid"),
            "RABBITMQ_CONF_ENV_FILE": str(r / "rabbitmq-env.conf"),
        }
        with (r / "server.out").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                self.SERVER, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True
            )

        async def up() -> bool:
            if self.proc is not None and self.proc.returncode is not None:
                pytest.fail(f"the private RabbitMQ node exited ({self.proc.returncode}); see {r / 'server.out'}")
            try:
                conn = await aio_pika.connect(self.url, timeout=2)
            except (OSError, aio_pika.exceptions.AMQPError, TimeoutError, ConnectionError):
                return False
            await conn.close()
            return True

        await wait_for(up, timeout=timeout, interval=0.5)

    async def consuming(self, queue: str) -> bool:
        """Whether ``queue`` exists on this node and has a consumer (so its bindings are in place)."""
        conn = await aio_pika.connect(self.url, timeout=5)
        try:
            ch = await conn.channel()
            try:
                q = await ch.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return False
            return bool(q.declaration_result.consumer_count)
        finally:
            await conn.close()

    async def kill(self) -> None:
        """SIGKILL to the node's whole process group (the script and the Erlang VM): a crash, not a stop."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
