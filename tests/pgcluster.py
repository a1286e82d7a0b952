"""A private PostgreSQL server for tests that stop and restart it (never the machine's shared one).

The same recipe as plugins/postgres/tests/pg_support.py's ``logical_cluster`` (initdb and pg_ctl from
Debian's postgresql-15 under a temp dir, as the ``postgres`` user when run as root), with ``stop``
and ``start`` so a test can take the server away under load and bring it back on the same port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("INTEGRAND_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateCluster:
    """One initdb'd data directory and its server on a free port of 127.0.0.1 (trust auth)."""

    def __init__(self, root: Path):
        self.root = root
        self.datadir = root / "data"
        self.sockdir = root / "sock"
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(root, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 90) -> None:
        done = subprocess.run([*self._as, *args], capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = (self.root / "log").read_text(errors="replace")[-2000:] if (self.root / "log").exists() else ""
            raise AssertionError(f"{args[0]} failed: {done.stderr.decode(errors='replace')}\n{log}")

    def init(self) -> None:
        initdb = PG_BIN / "initdb"
        if not initdb.exists():
            pytest.fail(f"{initdb} not found: install Debian's postgresql-15 (or set INTEGRAND_TEST_PG_BIN)")
        self._run(str(initdb), "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._run("mkdir", "-p", str(self.sockdir), timeout=10)

    def start(self) -> None:
        opts = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 -k {self.sockdir} "
            "-c max_connections=60 -c shared_buffers=32MB"
        )
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-o", opts, "-w", "-t", "60", "-l", str(self.root / "log"),
            "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``fast``: sessions are terminated (what a managed failover or restart does); ``immediate``: a crash."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop", timeout=60)


@contextlib.contextmanager
def private_cluster() -> Iterator[PrivateCluster]:
    """A fresh server, running; stopped and removed afterwards whatever the test left it in."""
    c = PrivateCluster(Path(tempfile.mkdtemp(prefix="integrand-pg-")))
    try:
        c.init()
        c.start()
        yield c
    finally:
        subprocess.run(
            [*c._as, str(PG_BIN / "pg_ctl"), "-D", str(c.datadir), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(c.root, ignore_errors=True)
