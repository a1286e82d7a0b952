"""What one webhook costs, counted rather than timed: the work a request leaves behind for the process.

A timing assertion would be flaky on a shared machine; these count things that do not depend on the
machine. Objects left in reference cycles are freed only by the garbage collector: every webhook that
leaves some makes the collector run more often and promotes what it held (its event, its body, the
commit's future) to older generations. Before this test, each webhook left ten such objects (the
enqueue op held a bound method of itself), and the collector's share of the daemon's CPU doubled.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import orjson

from .helpers import hook_url, read_jsonl, running, settings_for, signed_headers, wait_for

QUIET = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "warning"

[admin]
enabled = false
"""


@contextmanager
def cycles_kept() -> Iterator[list[object]]:
    """Collect, then keep (instead of free) every object the collector finds in a cycle until the block ends."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


async def test_webhooks_end_to_end_leave_no_reference_cycles(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, base=QUIET)
    out = tmp_path / "var" / "out.jsonl"
    n = 200
    async with running(settings) as d, aiohttp.ClientSession() as http:
        url = hook_url(d)

        async def send(i: int) -> None:
            body = orjson.dumps({"type": "t", "data": {"i": i}})
            async with http.post(url, data=body, headers=signed_headers(body, f"m{i}")) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()

        await asyncio.gather(*(send(i) for i in range(20)))  # connections, caches and lazy imports first
        await wait_for(lambda: out.exists() and len(read_jsonl(out)) == 20)
        with cycles_kept() as garbage:
            for start in range(100, 100 + n, 8):  # a few at a time: group commits and batched deliveries
                await asyncio.gather(*(send(i) for i in range(start, start + 8)))
            await wait_for(lambda: len(read_jsonl(out)) == 20 + n)
            gc.collect()
            ours = Counter(type(o).__qualname__ for o in garbage if type(o).__module__.startswith("integrand"))
            total = len(garbage)
    assert not ours, f"integrand objects left in reference cycles by {n} webhooks: {dict(ours)}"
    assert total < n // 4, f"{total} objects left in reference cycles by {n} webhooks"
