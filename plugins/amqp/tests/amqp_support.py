"""The machine's RabbitMQ (127.0.0.1:5672, guest/guest) in a vhost of the test session's own, removed afterwards."""

from __future__ import annotations

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
