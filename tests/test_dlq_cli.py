"""``integrand dlq list | show | replay | purge`` against the store of a running daemon."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from integrand.app import Daemon
from integrand.cli import main as cli_main

from .helpers import DEMO_SECRET, hook_url, post_signed, running, settings_for, wait_for
from .receiver import Receiver


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    crm, erp = Receiver(), Receiver()
    await crm.start()
    await erp.start()
    yield crm, erp
    await crm.stop()
    await erp.stop()


def config(crm: Receiver, erp: Receiver) -> str:
    return f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.crm]
connector = "http"
url = "{crm.url}"

[sinks.erp]
connector = "http"
url = "{erp.url}"

[[routes]]
from = "demo"
to = ["crm", "erp"]
"""


class Cli:
    """Runs ``integrand …`` in a thread (it has its own event loop) and returns (exit code, stdout, stderr)."""

    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]):
        self.config = config
        self.capsys = capsys

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = await asyncio.to_thread(cli_main, [*args, "--config", str(self.config)])
        captured = self.capsys.readouterr()
        return rc, captured.out, captured.err


async def dead_count(d: Daemon) -> int:
    return len(await d.store.dead_letters())


async def state_of(d: Daemon, delivery: int) -> str:
    detail = await d.store.delivery(delivery)
    assert detail is not None
    return detail.state


async def test_dlq_list_show_replay_purge(
    tmp_path: Path, receivers: tuple[Receiver, Receiver], capsys: pytest.CaptureFixture[str]
) -> None:
    crm, erp = receivers
    crm.per_event = {"e1": [(400, {})], "e2": [(400, {"X-Request-Id": "crm-req-2"})]}
    erp.per_event = {"e1": [(422, {})]}
    settings = settings_for(tmp_path, config(crm, erp))
    assert settings.path is not None
    cli = Cli(settings.path, capsys)
    async with running(settings) as d, aiohttp.ClientSession() as s:
        for msg_id in ("e1", "e2", "e3"):
            assert (await post_signed(s, hook_url(d), {"type": "customer.updated", "id": msg_id}, msg_id))[0] == 200
        await wait_for(lambda: _dead_is(d, 3), timeout=10)
        by_key = {(x.sink, x.event_id): x.id for x in await d.store.dead_letters()}
        assert set(by_key) == {("crm", "e1"), ("crm", "e2"), ("erp", "e1")}

        # list: a header, then one line per entry with event id, source, sink, attempts, when, last error.
        rc, out, _ = await cli("dlq", "list")
        assert rc == 0
        header, *lines = out.splitlines()
        assert header.split() == ["ID", "EVENT", "SOURCE", "SINK", "TRIES", "WHEN", "LAST", "ERROR"]
        assert len(lines) == 3
        line = next(x for x in lines if x.split()[0] == str(by_key[("crm", "e2")]))
        m = re.match(
            r"\s*(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ)\s+(.*)$",
            line,
        )
        assert m is not None, line
        assert m.group(2, 3, 4, 5) == ("e2", "demo", "crm", "1")
        assert m.group(7) == f'PermanentError: HTTP 400 from {crm.url}: {{"status": 400}} (request id crm-req-2)'
        rc, out, _ = await cli("dlq", "list", "--sink", "erp")
        assert rc == 0 and len(out.splitlines()) == 2 and "HTTP 422" in out

        # show: the delivery, its error, its history and the event.
        crm_e1 = by_key[("crm", "e1")]
        rc, out, _ = await cli("dlq", "show", str(crm_e1))
        assert rc == 0
        assert out.splitlines()[0] == f"delivery {crm_e1} to sink crm: dead, 1 attempt(s)"
        assert f"PermanentError: HTTP 400 from {crm.url}" in out
        assert re.search(r"^\s+\S+ \S+\s+dead\s+PermanentError", out, re.M)
        assert '"id": "e1"' in out and '"type": "customer.updated"' in out
        rc, _, err = await cli("dlq", "show", "999999")
        assert (rc, err.strip()) == (1, "error: no delivery 999999")

        # replay one: attempts reset, the sink now works, it is delivered; the audit keeps the whole story.
        rc, out, _ = await cli("dlq", "replay", str(crm_e1))
        assert (rc, out.strip()) == (0, "replayed 1 dead-lettered delivery")
        await wait_for(lambda: _state_is(d, crm_e1, "done"), timeout=10)
        detail = await d.store.delivery(crm_e1)
        assert detail is not None
        assert (detail.state, detail.attempts, detail.last_error) == ("done", 1, None)
        assert [a.action for a in detail.audit] == ["dead", "replayed", "delivered"]
        assert (
            detail.audit[1].detail is not None
            and "after 1 attempts; last error: PermanentError" in detail.audit[1].detail
        )
        assert [r.status for r in crm.log if r.event["id"] == "e1"] == [400, 200]
        rc, out, _ = await cli("dlq", "show", str(crm_e1))
        assert "replayed" in out and "delivered" in out

        # replay --all --sink erp: only erp's dead letters.
        rc, out, _ = await cli("dlq", "replay", "--all", "--sink", "erp")
        assert (rc, out.strip()) == (0, "replayed 1 dead-lettered delivery")
        await wait_for(lambda: _state_is(d, by_key[("erp", "e1")], "done"), timeout=10)
        assert await state_of(d, by_key[("crm", "e2")]) == "dead"

        # purge: gone from the DLQ for good, with an audit line; replaying it is then an error.
        crm_e2 = by_key[("crm", "e2")]
        rc, out, _ = await cli("dlq", "purge", str(crm_e2))
        assert (rc, out.strip()) == (0, "purged 1 dead-lettered delivery")
        rc, out, _ = await cli("dlq", "list")
        assert (rc, out.strip()) == (0, "dead-letter queue is empty")
        detail = await d.store.delivery(crm_e2)
        assert detail is not None and detail.audit[-1].action == "purged"
        rc, out, _ = await cli("dlq", "replay", str(crm_e2))
        assert (rc, out.strip()) == (1, "replayed 0 dead-lettered deliveries")
        rc, _, err = await cli("dlq", "replay")
        assert (rc, err.strip()) == (2, "error: give delivery IDs or --all")
    assert [r.status for r in crm.log if r.event["id"] == "e2"] == [400]  # purged, never sent again


async def _dead_is(d: Daemon, n: int) -> bool:
    return await dead_count(d) == n


async def _state_is(d: Daemon, delivery: int, state: str) -> bool:
    return await state_of(d, delivery) == state
