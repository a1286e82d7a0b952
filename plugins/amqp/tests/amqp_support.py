"""The machine's RabbitMQ (127.0.0.1:5672, guest/guest) in a vhost of the test session's own, removed afterwards."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import pytest

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


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of the broker that the test can cut: ``cut()`` aborts every connection
    through it at once, dropping whatever bytes are in flight (publishes not yet at the broker, confirms and
    deliveries not yet at the client), and ``refuse()`` / ``accept()`` make the broker unreachable for a while.
    The machine's RabbitMQ is shared, so this is how its connections are lost without stopping it."""

    def __init__(self, host: str = HOST, port: int = PORT):
        self.target = (host, port)
        self.port = 0
        self.cuts = 0
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        for w in list(self._links):
            w.transport.abort()
        self._links.clear()
        self.cuts += 1

    def refuse(self) -> None:
        self.refusing = True
        self.cut()

    def accept(self) -> None:
        self.refusing = False

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._links.difference_update((writer, up_writer))
