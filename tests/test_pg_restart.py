"""PostgreSQL restarted under load: two ``integrand run`` nodes answer 503 with Retry-After while it is
gone, lose nothing they acknowledged, and carry on by themselves once it is back (no node restarted).

The server is a private one (tests/pgcluster.py), never the machine's shared PostgreSQL.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest

from .daemon_proc import DaemonProcess, jsonl_ids
from .helpers import DEMO, signed_headers, wait_for, write_config
from .pgcluster import private_cluster

NODE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "5s"

[admin]
enabled = false

[dispatcher]
workers = 4
lease = "3s"

[store]
backend = "postgres"
dsn = {env = "INTEGRAND_TEST_STORE_DSN"}
"""


@dataclass
class Load:
    """Senders that retry each webhook until it is acknowledged, as providers do; what each answer was."""

    urls: list[str]
    acked: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: Counter[str | None] = field(default_factory=Counter)  # of the 503s
    errors: list[str] = field(default_factory=list)
    acked_at: list[int] = field(default_factory=list)  # len(acked) at each ack, for "after the restart"
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    n: int = 0

    async def worker(self, session: aiohttp.ClientSession, w: int) -> None:
        while not self.stop.is_set():
            self.n += 1
            msg_id = f"msg_{w:02d}_{self.n:06d}"
            body = orjson.dumps({"type": "test.event", "n": msg_id})
            url = self.urls[self.n % len(self.urls)]
            while True:  # the same id again until it is taken (even after stop: none is left ambiguous)
                try:
                    async with session.post(url, data=body, headers=signed_headers(body, msg_id)) as resp:
                        await resp.read()
                        self.statuses[resp.status] += 1
                        if resp.status == 200:
                            self.acked.add(msg_id)
                            break
                        if resp.status == 503:
                            self.retry_after[resp.headers.get("Retry-After")] += 1
                except (TimeoutError, aiohttp.ClientError) as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                # A provider waits before it retries; 50 ms keeps 16 senders from spinning on two cores.
                await asyncio.sleep(0.05)
                url = self.urls[(self.n + 1) % len(self.urls)]


async def test_postgres_restarted_under_load_loses_nothing_and_nodes_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with private_cluster() as pg:
        monkeypatch.setenv("INTEGRAND_TEST_STORE_DSN", pg.dsn)
        nodes = []
        for name in ("n1", "n2"):
            (tmp_path / name).mkdir()
            nodes.append(DaemonProcess(write_config(tmp_path / name, DEMO, NODE), tmp_path / f"{name}.log"))
        sinks = [tmp_path / n / "var" / "out.jsonl" for n in ("n1", "n2")]
        try:
            await asyncio.gather(*(n.start() for n in nodes))
            load = Load([n.url() for n in nodes])
            timeout = aiohttp.ClientTimeout(total=20)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                senders = [asyncio.create_task(load.worker(session, w)) for w in range(16)]
                await wait_for(lambda: len(load.acked) >= 300, timeout=60, interval=0.05)

                await asyncio.to_thread(pg.stop, "fast")  # sessions terminated, as in a restart or failover
                acked_before = len(load.acked)
                loop = asyncio.get_running_loop()
                down = loop.time()
                await wait_for(
                    lambda: load.statuses[503] >= 50 and loop.time() - down >= 3, timeout=30, interval=0.05
                )  # three seconds without a database
                assert len(load.acked) == acked_before, "a webhook was acknowledged while PostgreSQL was down"
                await asyncio.to_thread(pg.start)
                up = loop.time()
                await wait_for(lambda: len(load.acked) > acked_before, timeout=15, interval=0.01)
                recovered = loop.time() - up
                assert recovered < 10, f"the nodes took {recovered:.1f} s to take webhooks again"

                await wait_for(lambda: len(load.acked) >= acked_before + 300, timeout=60, interval=0.05)
                load.stop.set()
                await asyncio.gather(*senders)
            assert [n.proc.returncode for n in nodes if n.proc] == [None, None], "a node exited"
            assert set(load.statuses) <= {200, 503}, load.statuses
            assert load.retry_after == Counter({"5": load.statuses[503]})  # every 503 says when to retry
            assert not load.errors, load.errors[:5]

            def delivered() -> Counter[str]:
                return Counter(jsonl_ids(sinks[0]) + jsonl_ids(sinks[1]))

            # Outcomes lost with the connections come back when their 3 s leases are reclaimed.
            await wait_for(lambda: set(delivered()) >= load.acked, timeout=90, interval=0.2)
            extra = set(delivered()) - load.acked
            assert not extra, f"delivered but never acknowledged: {sorted(extra)[:5]}"
            for n in nodes:
                n.signal(signal.SIGTERM)
            assert [await n.wait() for n in nodes] == [0, 0]
            logs = nodes[0].output() + nodes[1].output()
            assert "webhook refused with 503, store unavailable" in logs
        finally:
            for n in nodes:
                await n.kill()
