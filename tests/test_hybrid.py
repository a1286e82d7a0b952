"""Webhooks that get lost, plus reconciliation: every change still arrives exactly once."""

from __future__ import annotations

import asyncio
import re
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

from .fake_rest import FakeRest, drive
from .helpers import DEMO_SECRET, hook_url, read_jsonl, running, settings_for, wait_for
from .test_http_poll import check_exactly_once, schedule


async def integrand(*args: str) -> tuple[int, str, str]:
    """Run the real CLI in a subprocess (it sets up logging and its own event loop)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "integrand.cli", *args, stdout=PIPE, stderr=PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def hybrid_config(base: str, reconcile: str | None) -> str:
    schedule_line = f'reconcile = "{reconcile}"' if reconcile else ""
    return f"""
[sources.crm]
connector = "http-poll"
url = "{base}/records?since={{since}}"
page_param = "after"
entity = "contact"
deleted = "$.archived"

[sources.crm.webhook]
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_id_field = "id"
version_field = "updated_at"

[sources.crm.poll]
enabled = false
{schedule_line}

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "crm"
to = ["out"]
"""


async def test_dropped_webhooks_are_caught_by_scheduled_reconciliation(tmp_path: Path) -> None:
    api = FakeRest(seed=11, page_size=7, webhook_drop=0.1)
    base = await api.start()
    out = tmp_path / "var" / "out.jsonl"
    try:
        settings = settings_for(tmp_path, hybrid_config(base, reconcile="300ms"))
        async with running(settings) as d:
            api.webhook_url = hook_url(d, "crm")
            await drive(api, schedule(11, 40, 120, 0.005), delete={"c5"})
            await wait_for(lambda: {ln["entity_id"]: ln["version"] for ln in read_jsonl(out)} == api.final_versions())
        lines = read_jsonl(out)
        check_exactly_once(lines, api)
        assert api.webhooks_dropped >= 5
        assert api.webhooks_sent >= 100
        by_reconcile = [ln for ln in lines if not ln["id"].startswith("msg_")]
        assert by_reconcile, "the dropped webhooks' changes came in through reconciliation"
        # Everything that arrived by webhook was not repeated by reconciliation (the entity table saw it).
        assert len(lines) == len({(ln["entity_id"], ln["version"]) for ln in lines})
    finally:
        await api.close()


async def test_reconcile_command_reports_and_fills_the_gaps(tmp_path: Path) -> None:
    api = FakeRest(seed=12, page_size=4, webhook_drop=0.5)
    base = await api.start()
    out = tmp_path / "var" / "out.jsonl"
    cfg = str(tmp_path / "config.toml")
    try:
        settings = settings_for(tmp_path, hybrid_config(base, reconcile=None))
        async with running(settings) as d:
            api.webhook_url = hook_url(d, "crm")
            for i in range(20):
                await api.change(f"c{i}")
            await wait_for(lambda: len(read_jsonl(out)) == api.webhooks_sent)
        api.webhook_url = None
        dropped = api.webhooks_dropped
        assert 0 < dropped < 20
        rc, stdout, stderr = await integrand("reconcile", "-c", cfg, "crm")
        assert rc == 0, stderr
        assert stdout.strip() == f"reconcile: source=crm checked=20 missed={dropped} stale=0 deleted=0"
        assert f"reconcile: source=crm checked=20 missed={dropped}" in stderr  # the log line too
        rc, stdout, _ = await integrand("reconcile", "-c", cfg, "crm")
        assert rc == 0
        assert re.search(r"checked=20 missed=0 stale=0", stdout)
        async with running(settings):
            await wait_for(lambda: len(read_jsonl(out)) == 20)
        check_exactly_once(read_jsonl(out), api)
    finally:
        await api.close()


async def test_polls_wait_max_interval_while_webhooks_carry_the_changes_and_not_once_they_stop(
    tmp_path: Path,
) -> None:
    api = FakeRest(seed=13, page_size=10, webhook_drop=0.1)
    base = await api.start()
    out = tmp_path / "var" / "out.jsonl"
    cfg = hybrid_config(base, reconcile=None).replace(
        "enabled = false", 'min_interval = "20ms"\nmax_interval = "2s"\ntarget_latency = "200ms"'
    )
    try:
        settings = settings_for(tmp_path, cfg)
        async with running(settings) as d:
            poller = d.pollers["crm"]
            api.webhook_url = hook_url(d, "crm")
            await drive(api, schedule(13, 30, 80, 0.01))
            await wait_for(lambda: {ln["entity_id"]: ln["version"] for ln in read_jsonl(out)} == api.final_versions())
            assert api.webhooks_dropped >= 3
            # The webhooks carry nine changes in ten: trusted, so the scheduled wait is max_interval.
            await wait_for(
                lambda: poller.status()["trusting_webhooks"] and poller.status()["last_reason"] == "webhooks"
            )
            assert poller.status()["last_wait"] == 2.0
            # The endpoint breaks: polls find every change, and the rate plan is back within a few polls.
            api.webhook_url = None
            for i in range(10):
                for j in range(10):
                    await api.change(f"late{i}-{j}")
                await wait_for(
                    lambda: {ln["entity_id"]: ln["version"] for ln in read_jsonl(out)} == api.final_versions(),
                    timeout=30,
                )
                if not poller.status()["trusting_webhooks"]:
                    break
            assert not poller.status()["trusting_webhooks"]
            await wait_for(lambda: {ln["entity_id"]: ln["version"] for ln in read_jsonl(out)} == api.final_versions())
            assert poller.status()["last_reason"] == "rate"
        check_exactly_once(read_jsonl(out), api)
    finally:
        await api.close()
