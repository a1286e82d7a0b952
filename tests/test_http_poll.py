"""http-poll end to end against a local fake REST API: lag, pages, 429s, failures, budgets, webhooks."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from integrand import cli
from integrand.store import Store

from .fake_rest import FakeRest, drive
from .helpers import DEMO_SECRET, admin_url, hook_url, read_jsonl, running, settings_for, wait_for


def poll_config(base: str, *, poll: str = "", extra: str = "") -> str:
    return f"""
[sources.crm]
connector = "http-poll"
url = "{base}/records?since={{since}}"
page_param = "after"
items = "$.results[*]"
id = "$.id"
updated = "$.updated_at"
next_page = "$.next"
deleted = "$.archived"
entity = "contact"
lookback = "1s"
{extra}

[sources.crm.poll]
min_interval = "20ms"
max_interval = "300ms"
target_latency = "100ms"
{poll}

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "crm"
to = ["out"]
"""


def delivered(tmp_path: Path) -> list[dict[str, Any]]:
    return read_jsonl(tmp_path / "var" / "out.jsonl")


def check_exactly_once(lines: list[dict[str, Any]], api: FakeRest) -> None:
    """No change twice, versions per record only move forward, and every record's final version arrived."""
    seen = Counter((ln["entity_id"], ln["version"]) for ln in lines)
    assert [k for k, n in seen.items() if n > 1] == []
    last: dict[str, str] = {}
    for ln in lines:
        prev = last.get(ln["entity_id"])
        assert prev is None or prev < ln["version"], f"{ln['entity_id']}: {ln['version']} after {prev}"
        last[ln["entity_id"]] = ln["version"]
    assert last == api.final_versions()


def schedule(seed: int, n_records: int, n_changes: int, gap: float) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    return [(rng.uniform(0, gap), f"c{rng.randrange(n_records)}") for _ in range(n_changes)]


async def test_nothing_missed_nothing_twice_despite_lag_pages_429_and_failures(tmp_path: Path) -> None:
    # At most 3 requests a second, not announced before the 429 (the poller would pace itself by the
    # X-RateLimit headers and never meet one): the backlog's first pass pages faster than that.
    api = FakeRest(seed=1, page_size=4, lag_max=0.3, fail_every=7, limit_n=3, limit_window=1.0, advertise_limit=False)
    base = await api.start()
    try:
        settings = settings_for(tmp_path, poll_config(base))
        async with running(settings) as d:
            for i in range(12):  # a backlog before the first poll: several pages
                await api.change(f"c{i}")
            await drive(api, schedule(1, 20, 60, 0.03), delete={"c3"})
            await wait_for(
                lambda: {ln["entity_id"]: ln["version"] for ln in delivered(tmp_path)} == api.final_versions(),
                timeout=90,
            )
            status = d.pollers["crm"].status()
        lines = delivered(tmp_path)
        check_exactly_once(lines, api)
        assert [ln["type"] for ln in lines if ln["entity_id"] == "c3"][-1] == "contact.deleted"
        # The fake really did lag, page, throttle and fail, and every 429 wait was honoured.
        codes = Counter(r.status for r in api.requests)
        assert codes[429] >= 1
        assert codes[500] >= 1
        for i, r in enumerate(api.requests):
            if r.status == 429 and i + 1 < len(api.requests):
                assert r.retry_after is not None
                assert api.requests[i + 1].at >= r.at + r.retry_after
        assert status["polls"] >= 3
    finally:
        await api.close()


async def test_without_lookback_a_lagging_index_loses_changes(tmp_path: Path) -> None:
    """The control for the test above: the look-back window is what catches late commits."""
    api = FakeRest(seed=2, page_size=50, lag_max=0.4)
    base = await api.start()
    try:
        settings = settings_for(tmp_path, poll_config(base, extra="lookback = 0").replace('lookback = "1s"\n', ""))
        async with running(settings):
            await drive(api, schedule(2, 30, 80, 0.02))
            api.settle()
            n = len(api.requests)
            await wait_for(lambda: len(api.requests) >= n + 3, timeout=10)  # polls after the index caught up
        got = {ln["entity_id"]: ln["version"] for ln in delivered(tmp_path)}
        assert got != api.final_versions()
    finally:
        await api.close()


async def test_budget_is_never_exceeded(tmp_path: Path) -> None:
    api = FakeRest(seed=3, page_size=2)
    base = await api.start()
    try:
        settings = settings_for(tmp_path, poll_config(base, poll="max_requests_per_hour = 6"))
        async with running(settings) as d:
            for i in range(40):  # 20 pages waiting
                await api.change(f"c{i}")
            poller = d.pollers["crm"]
            # The fake counts a request when it arrives, the poller once its page is committed: wait for both.
            await wait_for(lambda: len(api.requests) >= 6 and poller.status()["requests_last_hour"] >= 6)
            # Requests are counted when made; the sixth page's events are stored and delivered after.
            await wait_for(lambda: len(delivered(tmp_path)) >= 12)
            async with aiohttp.ClientSession() as s, s.get(admin_url(d, "/status")) as r:
                body = await r.json()
            assert poller.status()["requests_last_hour"] == 6
            assert poller.next_at - poller.clock() > 3000
        assert len(api.requests) == 6
        assert body["pollers"]["crm"]["last_reason"] in ("budget", "more")
        assert len(delivered(tmp_path)) == 12
    finally:
        await api.close()


async def test_provider_budget_headers_slow_polling_down(tmp_path: Path) -> None:
    api = FakeRest(seed=4, page_size=1, limit_n=10, limit_window=60.0)
    base = await api.start()
    extra = (
        'budget_remaining_header = "X-RateLimit-Remaining"\nbudget_limit_header = "X-RateLimit-Limit"\n'
        'budget_reset_header = "X-RateLimit-Reset"'
    )
    try:
        settings = settings_for(tmp_path, poll_config(base, extra=extra, poll="budget_reserve = 0.3"))
        async with running(settings) as d:
            for i in range(20):
                await api.change(f"c{i}")
            poller = d.pollers["crm"]
            await wait_for(lambda: poller.polls == 1)
            assert poller.last is not None
            assert poller.last.reason == "provider-budget"
            # 9 of 10 left, 3 kept for the sinks' writes: the 6 spare are spread over the 60 s window.
            assert 9 <= poller.next_at - poller.clock() <= 10.5
        assert len(api.requests) == 1
    finally:
        await api.close()


async def test_cursor_cli_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeRest(seed=5)
    base = await api.start()
    try:
        settings = settings_for(tmp_path, poll_config(base))
        cfg = str(tmp_path / "config.toml")
        async with running(settings):
            await api.change("a")
            await wait_for(lambda: len(delivered(tmp_path)) == 1)
        assert await asyncio.to_thread(cli.main, ["status", "-c", cfg]) == 0
        out = capsys.readouterr().out
        assert "cursors:" in out
        assert "crm" in out
        assert '"since":"' in out
        assert (
            await asyncio.to_thread(
                cli.main, ["cursor", "set", "-c", cfg, "crm", '{"since": "2020-01-01T00:00:00Z", "page": null}']
            )
            == 0
        )
        store = Store(settings.db_path, role="client")
        await store.open()
        try:
            assert await store.cursor_get("crm") == {"since": "2020-01-01T00:00:00Z", "page": None}
        finally:
            await store.close()
        assert await asyncio.to_thread(cli.main, ["cursor", "reset", "-c", cfg, "crm"]) == 0
        assert "next poll starts from the beginning" in capsys.readouterr().out
        assert await asyncio.to_thread(cli.main, ["cursor", "reset", "-c", cfg, "nope"]) == 1
        # After a reset the next run backfills from `start`: the record is read again, and dropped as seen.
        async with running(settings):
            n = len(api.requests)
            await wait_for(lambda: len(api.requests) > n)
        assert len(delivered(tmp_path)) == 1
    finally:
        await api.close()


async def test_webhook_nudges_an_early_poll(tmp_path: Path) -> None:
    """A thin webhook ("contact c1 changed") makes a slowly polling source poll within the debounce."""
    api = FakeRest(seed=6)
    base = await api.start()
    extra = (
        f'[sources.crm.webhook]\nsignature = "standard-webhooks"\nsecret = "{DEMO_SECRET}"\nentity_id_field = "id"\n'
    )
    poll = 'nudge_debounce = "50ms"'
    body = poll_config(base, poll=poll).replace('max_interval = "300ms"', 'max_interval = "1h"')
    body = body.replace('min_interval = "20ms"', 'min_interval = "30m"').replace(
        "[sources.crm.poll]", extra + "\n[sources.crm.poll]"
    )
    try:
        settings = settings_for(tmp_path, body)
        async with running(settings) as d, aiohttp.ClientSession() as s:
            await wait_for(lambda: d.pollers["crm"].polls == 1)
            await api.change("c1")
            thin = orjson.dumps({"id": "c1", "event": "updated"})
            from .helpers import signed_headers

            async with s.post(hook_url(d, "crm"), data=thin, headers=signed_headers(thin, "n1")) as r:
                assert r.status == 200
            await wait_for(lambda: d.pollers["crm"].polls == 2)
            await wait_for(lambda: any(ln.get("version") for ln in delivered(tmp_path)))
        lines = delivered(tmp_path)
        full = [ln for ln in lines if ln["version"] is not None]
        assert [ln["data"]["name"] for ln in full] == [api.records["c1"]["name"]]
    finally:
        await api.close()


async def test_a_change_lagging_behind_a_multi_page_pass_is_read_by_the_next_pass() -> None:
    """Found by bench/poll_daemon.py under load: a pass of several pages moved the cursor to its newest
    change, past one that was still lagging when the page covering its time was read; it was never read."""
    from integrand.builtin.httppoll import HttpPollConfig, HttpPollSource
    from integrand.connector import ConnectorContext

    from .fake_rest import iso

    api = FakeRest(seed=9, page_size=2)
    base = await api.start()
    src = HttpPollSource(
        HttpPollConfig(
            url=f"{base}/records?since={{since}}",
            page_param="after",
            entity="contact",
            lookback=1.0,
            start="2020-01-01T00:00:00Z",
        ),
        ConnectorContext(name="crm", role="source", base_dir=Path("."), state=None),  # type: ignore[arg-type]
    )
    await src.start()
    try:
        await api.change("a")
        lagging = await api.change("x")  # stamped now, but the listing shows it only later
        api.settle()
        api._indexed.pop("x")
        api._pending = [(float("inf"), dict(lagging))]
        await api.change("b")
        # Page 1 holds a and b (x is not listed yet); a change made later makes a second page.
        later = dict(api.records["b"], id="c", updated_at=iso(time.time() + 30))
        api.records["c"], api._indexed["c"] = later, later
        r1 = await src.poll(None)
        assert [e.entity_id for e in r1.events] == ["a", "b"] and r1.more
        api.settle()  # x shows up now, behind the pass's keyset position
        r2 = await src.poll(r1.cursor)
        assert [e.entity_id for e in r2.events] == ["c"] and not r2.more
        seen, r3 = set(), await src.poll(r2.cursor)
        seen |= {e.entity_id for e in r3.events}
        while r3.more:
            r3 = await src.poll(r3.cursor)
            seen |= {e.entity_id for e in r3.events}
        assert "x" in seen, "the lagging change was skipped for good"
    finally:
        await src.close()
        await api.close()


async def test_a_clean_stop_saves_the_learnt_polling_state(tmp_path: Path) -> None:
    """A restart must not start cold: the learnt state is saved every minute and at hour boundaries, and on a
    clean stop, so a restart right after one knows every poll of the run (here: the budget's request log)."""
    from integrand.pollpolicy import from_json

    api = FakeRest(seed=4, page_size=50)
    base = await api.start()
    try:
        settings = settings_for(tmp_path, poll_config(base))
        async with running(settings) as d:
            await api.change("c0")
            await wait_for(lambda: d.pollers["crm"].polls >= 5, timeout=20)
            polls_seen = d.pollers["crm"]
        polls = polls_seen.polls
        store = Store(tmp_path / "var" / "integrand.db")
        await store.open()
        try:
            saved = from_json(await store.state_get("poll", "crm"))
        finally:
            await store.close()
        assert len(saved.requests) == polls  # every poll of the run, not only the first minute's
        assert polls <= len(api.requests) <= polls + 1  # (one may have been in flight at the stop)
    finally:
        await api.close()
