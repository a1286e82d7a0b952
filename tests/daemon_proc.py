"""``integrand run`` as a real subprocess for crash and lifecycle tests (``DaemonProcess``, one class with
connector authors' ``integrand.testing``), and what such tests send and read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from integrand.testing import DaemonProcess, read_jsonl

from .helpers import signed_headers

__all__ = ["DaemonProcess", "deadline", "jsonl_ids", "send_many"]


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


def jsonl_ids(path: Path, *, torn_tail_ok: bool = False) -> list[str]:
    """Event ids at a jsonl sink in file order (``read_jsonl``: a torn line fails the test)."""
    return [str(line["id"]) for line in read_jsonl(path, torn_tail_ok=torn_tail_ok)]


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds
