"""Two systems synced both ways through integrand: a change written by integrand never bounces back.

Each fake system stores records and, like QuickBooks (where every write bumps the
SyncToken), sends a signed webhook for every write — integrand's own included. Without
the loop guard, A → B → A → … would never stop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from integrand.config import load_config
from integrand.testing import fake_api_server

from .connectors import registry_with
from .helpers import BASE, DEMO_SECRET, hook_url, running, signed_headers, wait_for, write_config


class FakeSystem:
    """Records keyed by an email field; every write, by a user or by integrand, is announced by webhook."""

    def __init__(self, key_field: str):
        self.key_field = key_field
        self.records: dict[str, dict[str, Any]] = {}
        self.writes = 0
        self.hook = ""
        self.url = ""
        self._tasks: set[asyncio.Task[None]] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/records", self._write)
        return app

    async def _write(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.writes += 1
        self.save(body["data"])
        return web.json_response({"ok": True})

    def save(self, record: dict[str, Any]) -> None:
        """A write (a user's edit or integrand's): stored, then announced."""
        self.records[record[self.key_field].lower()] = dict(record)
        task = asyncio.get_running_loop().create_task(self._announce(dict(record)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce(self, record: dict[str, Any]) -> None:
        body = orjson.dumps({"type": "record.updated", "record": record})
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.hook, data=body, headers=signed_headers(body, f"msg_{uuid.uuid4().hex}")) as resp,
        ):
            assert resp.status == 200, await resp.text()

    async def settled(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks))


@pytest.fixture
async def systems() -> AsyncIterator[tuple[FakeSystem, FakeSystem]]:
    a, b = FakeSystem("Email"), FakeSystem("email")
    async with fake_api_server(a.app()) as url_a, fake_api_server(b.app()) as url_b:
        a.url, b.url = url_a, url_b
        yield a, b
        await a.settled()
        await b.settled()


def config(a: FakeSystem, b: FakeSystem) -> str:
    source = f'connector = "webhook"\nsignature = "standard-webhooks"\nsecret = "{DEMO_SECRET}"\n'
    return f"""
[sources.sys_a]
{source}
[sources.sys_b]
{source}
[sinks.to_a]
connector = "bearer"
url = "{a.url}/records"
token = "ta"

[sinks.to_b]
connector = "bearer"
url = "{b.url}/records"
token = "tb"

[[routes]]
from = "sys_a"
to = ["to_b"]
loop_guard = {{ key = "email", echo_source = "sys_b", echo_path = "data.record" }}
[routes.map]
email = {{ path = "data.record.Email", convert = "lower", required = true }}
fullname = "data.record.Name"

[[routes]]
from = "sys_b"
to = ["to_a"]
loop_guard = {{ key = "Email", echo_source = "sys_a", echo_path = "data.record" }}
[routes.map]
Email = {{ path = "data.record.email", required = true }}
Name = "data.record.fullname"
"""


async def test_changes_sync_both_ways_and_echoes_stop(tmp_path: Path, systems: tuple[FakeSystem, FakeSystem]) -> None:
    a, b = systems
    reg = registry_with(bearer="tests.connectors:BearerSink")
    settings = load_config(write_config(tmp_path, config(a, b), BASE), registry=reg)
    async with running(settings) as d:
        a.hook, b.hook = hook_url(d, "sys_a"), hook_url(d, "sys_b")

        async def settle(events: int, to_a: int, to_b: int) -> None:
            async def done() -> bool:
                await a.settled()
                await b.settled()
                counts = await d.store.counts()
                return (
                    await d.store.event_count() == events
                    and counts.get(("to_a", "done"), 0) == to_a
                    and counts.get(("to_b", "done"), 0) == to_b
                    and not any(st in ("ready", "leased") for _, st in counts)
                )

            await wait_for(done)

        # 1. A user edits a record in A. integrand writes it to B; B announces that write; the
        #    announcement is recognised as the echo of integrand's own write and not sent back to A.
        a.save({"Email": "Ann@X.com", "Name": "Ann"})
        await settle(events=2, to_a=1, to_b=1)
        assert (a.writes, b.writes) == (0, 1)
        assert b.records["ann@x.com"] == {"email": "ann@x.com", "fullname": "Ann"}

        # 2. The user saves the record in A again without changing it: nothing new to write to B.
        a.save({"Email": "Ann@X.com", "Name": "Ann"})
        await settle(events=3, to_a=1, to_b=2)
        assert (a.writes, b.writes) == (0, 1)

        # 3. Someone edits the record in B. integrand writes it to A; A's announcement is the echo.
        b.save({"email": "ann@x.com", "fullname": "Ann Lee"})
        await settle(events=5, to_a=2, to_b=3)
        assert (a.writes, b.writes) == (1, 1)
        assert a.records["ann@x.com"] == {"Email": "ann@x.com", "Name": "Ann Lee"}

        # 4. A real change in A still goes through after all that.
        a.save({"Email": "ann@x.com", "Name": "Ann Lee-Smith"})
        await settle(events=7, to_a=3, to_b=4)
        assert (a.writes, b.writes) == (1, 2)
        assert b.records["ann@x.com"]["fullname"] == "Ann Lee-Smith"

        def skipped(sink: str) -> float | None:
            return d.metrics.registry.get_sample_value(
                "integrand_deliveries_total", {"sink": sink, "outcome": "skipped"}
            )

        assert skipped("to_a") == 2  # the echoes of steps 1 and 4
        assert skipped("to_b") == 2  # the unchanged save of step 2, the echo of step 3
