"""``integrand run`` as a real subprocess for crash and lifecycle tests: start, find its ports, signal, kill."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .helpers import signed_headers, wait_for

READY = re.compile(r"ready: webhooks on [^:]+:(\d+), admin on (?:[^:]+:(\d+)|off)")


class DaemonProcess:
    """One ``integrand run`` child; its log goes to a file so nothing blocks on a full pipe."""

    def __init__(
        self,
        config: Path,
        log: Path,
        *,
        env: dict[str, str] | None = None,
        python: Sequence[str] = ("-m", "integrand.cli"),
        pass_fds: Sequence[int] = (),
    ):
        self.config = config
        self.log = log
        self.env = env or {}
        # What runs `integrand run`: the module by default; a wrapper script (``-c …``) for fault injection.
        self.python = tuple(python)
        self.pass_fds = tuple(pass_fds)
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.admin_port: int | None = None
        self._log_from = 0

    async def start(self, timeout: float = 20.0) -> None:
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *self.python,
                "run",
                "--config",
                str(self.config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                pass_fds=self.pass_fds,
            )
        await wait_for(self._ready, timeout=timeout, interval=0.05)

    def _ready(self) -> bool:
        assert self.proc is not None
        m = READY.search(self.output())
        if m is None:
            if self.proc.returncode is not None:
                raise AssertionError(f"integrand exited with {self.proc.returncode}:\n{self.output()}")
            return False
        self.port = int(m.group(1))
        self.admin_port = int(m.group(2)) if m.group(2) else None
        return True

    def output(self) -> str:
        """This run's log (a restart appends to the same file)."""
        if not self.log.exists():
            return ""
        return self.log.read_bytes()[self._log_from :].decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, source: str = "demo") -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{source}"

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        """SIGKILL and reap: nothing of this process runs afterwards."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def send_many(
    url: str,
    ids: Sequence[str],
    *,
    concurrency: int = 64,
    payload: Any = None,
    stop_after_acks: int | None = None,
    on_enough: Any = None,
) -> tuple[set[str], set[str]]:
    """POST signed webhooks concurrently; returns (ids that got 2xx, ids that got anything else or an error).

    When ``stop_after_acks`` 2xx have been seen, ``on_enough()`` is called once (e.g. to kill the daemon) while
    the other requests are still in flight.
    """
    acked: set[str] = set()
    failed: set[str] = set()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in ids:
        queue.put_nowait(i)
    fired = False

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal fired
        while not queue.empty():
            msg_id = queue.get_nowait()
            body = orjson.dumps(payload if payload is not None else {"type": "test.event", "n": msg_id})
            try:
                async with session.post(url, data=body, headers=signed_headers(body, msg_id)) as resp:
                    await resp.read()
                    ok = 200 <= resp.status < 300
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            (acked if ok else failed).add(msg_id)
            if ok and stop_after_acks is not None and len(acked) >= stop_after_acks and not fired:
                fired = True
                res = on_enough()
                if asyncio.iscoroutine(res):
                    await res

    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return acked, failed


def jsonl_ids(path: Path) -> list[str]:
    """Event ids at a jsonl sink in file order; a torn (partial) line fails the test."""
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_bytes().split(b"\n")):
        if not line:
            continue
        try:
            out.append(str(orjson.loads(line)["id"]))
        except orjson.JSONDecodeError:
            raise AssertionError(f"{path}: line {n + 1} is not a JSON object (torn write?): {line[:200]!r}") from None
    return out


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds
