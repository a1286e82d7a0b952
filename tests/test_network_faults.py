"""Faults on the network: a sink that hangs, resets, answers garbage or 500 (for an hour of simulated
time), a provider that answers 429 forever, a name that does not resolve. Defined behaviour: the
breaker opens, deliveries wait without being given up, the daemon keeps running and says so, and
everything arrives in per-entity order once the fault is gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from integrand.app import Daemon, run

from .fake_rest import FakeRest
from .helpers import DEMO_SECRET, post_signed, settings_for, wait_for

BASE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "2s"

[admin]
enabled = false
"""


def config(url: str) -> str:
    return f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_field = "object"
entity_id_field = "data.id"

[sinks.crm]
connector = "http"
url = "{url}"
timeout = "1s"

[sinks.crm.breaker]
failure_threshold = 3
open_for = "1s"
max_open_for = "60s"

[[routes]]
from = "demo"
to = ["crm"]
"""


class FaultySink:
    """A raw TCP endpoint standing in for a sink: answers 200, or 500, hangs, resets, or speaks garbage."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delivered: list[dict[str, Any]] = []
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/in"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests += 1
                mode = self.mode
                if mode == "hang":
                    await asyncio.Event().wait()
                if mode == "reset":
                    writer.transport.abort()
                    return
                if mode == "garbage":
                    writer.write(b"\x00\xff\xfeNOT HTTP AT ALL\r\n\r\n")
                    await writer.drain()
                    writer.close()
                    return
                status = b"200 OK" if mode == "ok" else b"500 Internal Server Error"
                if mode == "ok":
                    self.delivered.append(orjson.loads(body))
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
            pass
        finally:
            writer.close()


@pytest.fixture
async def sink() -> AsyncIterator[FaultySink]:
    s = FaultySink()
    yield s
    await s.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def daemon(tmp_path: Path, body: str, clock: Any = time.time) -> AsyncIterator[Daemon]:
    ready: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(settings_for(tmp_path, body, BASE), on_ready=ready.set_result, clock=clock))
    d = await asyncio.wait_for(ready, 30)
    try:
        yield d
    finally:
        d.stop()
        await asyncio.wait_for(task, 30)


async def send(d: Daemon, n: int, entities: int) -> None:
    url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/demo"
    async with aiohttp.ClientSession() as s:
        for i in range(n):  # in order: per entity, version i follows i - entities
            payload = {"object": "customer", "data": {"id": f"c{i % entities}", "v": i}}
            status, _ = await post_signed(s, url, payload, f"m{i}")
            assert status == 200


def in_entity_order(delivered: list[dict[str, Any]]) -> bool:
    last: dict[str, int] = {}
    for ev in delivered:
        e, v = ev["data"]["data"]["id"], ev["data"]["data"]["v"]
        if last.get(e, -1) >= v:
            return False
        last[e] = v
    return True


@pytest.mark.parametrize("mode", ["hang", "reset", "garbage", "500"])
async def test_a_failing_sink_opens_the_breaker_loses_nothing_and_recovers(
    tmp_path: Path, sink: FaultySink, mode: str
) -> None:
    url = await sink.start()
    sink.mode = mode
    async with daemon(tmp_path, config(url)) as d:
        await send(d, 20, entities=4)
        await wait_for(lambda: d.dispatcher.sinks["crm"].breaker.status != "closed", timeout=20)
        assert await d.store.dead_letters() == []
        sink.mode = "ok"
        await wait_for(lambda: len({e["id"] for e in sink.delivered}) == 20, timeout=60)
        assert in_entity_order(sink.delivered)
        await wait_for(lambda: d.dispatcher.sinks["crm"].breaker.status == "closed", timeout=10)


@pytest.mark.parametrize("mode", ["500", "hang", "reset", "garbage"])
async def test_an_hour_of_a_failing_sink_in_simulated_time_gives_nothing_up_and_costs_few_requests(
    tmp_path: Path, sink: FaultySink, mode: str
) -> None:
    url = await sink.start()
    sink.mode = mode
    clock = FakeClock()
    async with daemon(tmp_path, config(url), clock) as d:
        await send(d, 50, entities=50)
        await wait_for(lambda: d.dispatcher.sinks["crm"].breaker.status != "closed", timeout=20)
        started = sink.requests
        for _ in range(360):  # an hour in steps of 10 s; each step lets the dispatcher act on the new time
            clock.now += 10
            d.store.deliveries_ready.set()
            await asyncio.sleep(0.01)  # the simulation's pace (real time per simulated step), not a race fix
        during = sink.requests - started
        # The breaker lets a probe through about once per max_open_for (60 s): some 60 requests an hour,
        # where 50 deliveries retrying on their own would have made hundreds.
        print(f"requests to the sink in a simulated hour of {mode}:", during)
        assert during <= 150, during
        assert await d.store.dead_letters() == []
        sink.mode = "ok"
        for _ in range(200):
            clock.now += 10
            d.store.deliveries_ready.set()
            if len({e["id"] for e in sink.delivered}) == 50:
                break
            await asyncio.sleep(0.02)
        assert len({e["id"] for e in sink.delivered}) == 50
        assert in_entity_order(sink.delivered)


async def test_a_provider_answering_429_forever_is_polled_less_and_nothing_breaks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    api = FakeRest(limit_n=0, retry_after=2)  # every request: 429 with Retry-After: 2
    base = await api.start()
    body = f"""
[sources.crm]
connector = "http-poll"
url = "{base}/records?since={{since}}"
items = "$.results[*]"
id = "$.id"
updated = "$.updated_at"

[sources.crm.poll]
min_interval = "50ms"
max_interval = "1s"
target_latency = "100ms"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "crm"
to = ["out"]
"""
    try:
        async with daemon(tmp_path, body) as d:
            await wait_for(lambda: len(api.requests) >= 2, timeout=20)
            first = api.requests[0].at
            await wait_for(lambda: len(api.requests) >= 3, timeout=20)
            gaps = [b.at - a.at for a, b in zip(api.requests, api.requests[1:], strict=False)]
            assert min(gaps) >= 1.9, gaps  # Retry-After honoured, never the 50 ms min_interval
            assert all(r.status == 429 for r in api.requests)
            assert "crm" in d.pollers and d.pollers["crm"].status() is not None
            assert time.time() - first < 30
    finally:
        await api.close()


async def test_a_sink_whose_name_does_not_resolve_waits_behind_its_breaker(tmp_path: Path) -> None:
    async with daemon(tmp_path, config("http://sink.invalid/in")) as d:
        await send(d, 5, entities=5)
        await wait_for(lambda: d.dispatcher.sinks["crm"].breaker.status != "closed", timeout=20)
        assert await d.store.dead_letters() == []
        rows = await d.store.counts()
        assert sum(n for (sink, state), n in rows.items() if sink == "crm" and state in ("ready", "leased")) == 5
