"""Real PostgreSQL for the tests: the machine's server (a random schema per test) and a throwaway logical-replication cluster."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

DSN_ENV = "INTEGRAND_TEST_PG_DSN"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
START_HINT = (
    "start it with `pg_ctlcluster --skip-systemctl-redirect 15 main start` (Debian's postgresql-15), "
    f"or point ${DSN_ENV} at a server where the user may create schemas"
)
PG_BIN = Path(os.environ.get("INTEGRAND_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def base_dsn() -> str:
    return os.environ.get(DSN_ENV, DEFAULT_DSN)


def with_options(dsn: str, **options: str) -> str:
    """The DSN with libpq ``options`` (e.g. search_path) added, so connections land in a test's schema."""
    parts = urlsplit(dsn)
    opts = " ".join(f"-c {k}={v}" for k, v in options.items())
    query = (parts.query + "&" if parts.query else "") + "options=" + opts.replace(" ", "%20").replace("=", "%3D")
    return urlunsplit(parts._replace(query=query))


async def require_server(dsn: str) -> None:
    """Fail (never skip) with how to start PostgreSQL when the server is not there."""
    try:
        con = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        pytest.fail(f"PostgreSQL is not reachable at {dsn}: {e}; {START_HINT}", pytrace=False)
    await con.close()


@dataclass
class Schema:
    """A random schema on the shared server, dropped after the test; ``dsn`` puts it first on the search_path."""

    name: str
    dsn: str
    base: str

    def dsn_with(self, **options: str) -> str:
        return with_options(self.base, search_path=self.name, **options)

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn)

    async def execute(self, sql: str, *args: Any) -> str:
        con = await self.connect()
        try:
            return await con.execute(sql, *args)
        finally:
            await con.close()

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        con = await self.connect()
        try:
            return await con.fetch(sql, *args)
        finally:
            await con.close()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        con = await self.connect()
        try:
            return await con.fetchval(sql, *args)
        finally:
            await con.close()


@contextlib.asynccontextmanager
async def random_schema(dsn: str | None = None) -> AsyncIterator[Schema]:
    dsn = dsn or base_dsn()
    await require_server(dsn)
    name = "itest_" + secrets.token_hex(5)
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(f"CREATE SCHEMA {name}")
    finally:
        await con.close()
    try:
        yield Schema(name, with_options(dsn, search_path=name), dsn)
    finally:
        con = await asyncpg.connect(dsn)
        try:
            await con.execute(f"DROP SCHEMA {name} CASCADE")
        finally:
            await con.close()


# --- a throwaway cluster with wal_level = logical ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    dsn: str
    port: int
    datadir: Path


@contextlib.contextmanager
def logical_cluster() -> Iterator[Cluster]:
    """initdb + pg_ctl start a private server (wal_level=logical) under a temp dir; stopped and removed after.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user (runuser)."""
    initdb = PG_BIN / "initdb"
    if not initdb.exists():
        pytest.fail(f"{initdb} not found: install Debian's postgresql-15 (or set INTEGRAND_TEST_PG_BIN)", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="integrand-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    datadir, sockdir = root / "data", root / "sock"
    port = _free_port()
    try:
        subprocess.run(
            [*as_user, str(initdb), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run([*as_user, "mkdir", "-p", str(sockdir)], check=True, timeout=10)
        opts = (
            f"-c wal_level=logical -c port={port} -c listen_addresses=127.0.0.1 -k {sockdir} "
            "-c max_replication_slots=10 -c max_wal_senders=10 -c fsync=off -c max_connections=40 "
            "-c shared_buffers=32MB"
        )
        subprocess.run(
            [
                *as_user,
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(datadir),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "-l",
                str(root / "log"),
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=90,
        )
        yield Cluster(f"postgresql://postgres@127.0.0.1:{port}/postgres", port, datadir)
    finally:
        subprocess.run(
            [*as_user, str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


# --- integrand as a real subprocess (for kill -9) --------------------------------------------------


class Daemon:
    """``integrand run`` as a child process, its log in a file; ``kill`` is SIGKILL."""

    def __init__(self, config: Path):
        self.config = config
        self.log = config.parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._from = 0

    def start(self) -> None:
        self._from = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "integrand.cli", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def output(self) -> str:
        return self.log.read_bytes()[self._from :].decode(errors="replace") if self.log.exists() else ""

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"integrand exited with {self.proc.returncode}:\n{self.output()}")
        return "ready: webhooks on" in self.output()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "integrand.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def acli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``cli`` without blocking the event loop (a command that calls a fake served by this test's loop)."""
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "integrand.cli",
        *args,
        "--config",
        str(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return subprocess.CompletedProcess(list(args), proc.returncode or 0, out.decode(), err.decode())
