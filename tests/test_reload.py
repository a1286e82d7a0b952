"""Config reload without loss: SIGHUP under load with a good and a bad config; sinks removed and re-added."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from integrand.reload import reload

from .daemon_proc import DaemonProcess, jsonl_ids, send_many
from .helpers import DEMO_SECRET, hook_url, post_signed, running, settings_for, wait_for, write_config
from .receiver import Receiver

BASE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"

[admin]
enabled = false

[dispatcher]
workers = 4
"""

SOURCE = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
"""

ONE_SINK = (
    SOURCE
    + """
[sinks.a]
connector = "jsonl"
path = "var/a.jsonl"

[[routes]]
from = "demo"
to = ["a"]
"""
)

TWO_SINKS = (
    SOURCE
    + """
[sinks.a]
connector = "jsonl"
path = "var/a.jsonl"

[sinks.b]
connector = "jsonl"
path = "var/b.jsonl"

[[routes]]
from = "demo"
to = ["a", "b"]
"""
)

# Valid TOML, invalid config: a misspelt key and a route to a sink that does not exist.
BAD = (
    SOURCE
    + """
[sinks.a]
connector = "jsonl"
pth = "var/a.jsonl"

[[routes]]
from = "demo"
to = ["a", "nowhere"]
"""
)


async def test_reload_under_load_good_then_bad_config_loses_and_refuses_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, ONE_SINK, BASE)
    daemon = DaemonProcess(config, tmp_path / "log")
    a, b = tmp_path / "var" / "a.jsonl", tmp_path / "var" / "b.jsonl"
    ids = [f"msg_{i:05d}" for i in range(1500)]
    try:
        await daemon.start()
        sending = asyncio.create_task(send_many(daemon.url(), ids, concurrency=32))
        await wait_for(lambda: len(jsonl_ids(a)) >= 200, timeout=30, interval=0.02)

        config.write_text(BASE + TWO_SINKS)
        daemon.signal(signal.SIGHUP)
        await wait_for(lambda: "reloaded" in daemon.output(), timeout=20, interval=0.02)
        await wait_for(lambda: len(jsonl_ids(b)) >= 50, timeout=30, interval=0.02)

        config.write_text(BASE + BAD)
        daemon.signal(signal.SIGHUP)
        await wait_for(lambda: "reload rejected: routes[0].to[1]" in daemon.output(), timeout=20, interval=0.02)

        acked, failed = await sending
        assert failed == set(), f"{len(failed)} webhooks refused or lost during the reloads"
        assert acked == set(ids)
        # Every webhook reached sink a, before and after both reloads; b has everything routed after it came.
        await wait_for(lambda: set(jsonl_ids(a)) >= set(ids), timeout=60, interval=0.1)
        at_b = jsonl_ids(b)
        assert at_b, "the sink added by the reload received nothing"
        assert at_b[-1] == max(at_b)  # jsonl ids in order of arrival end with the last ones sent

        out = daemon.output()
        assert "reload rejected: sinks.a.pth: unknown key (did you mean 'path'?)" in out
        assert "reload rejected: routes[0].to[1]: no sink named 'nowhere'" in out
        # The bad file was not applied: the good config still runs, with both sinks.
        more = [f"late_{i}" for i in range(20)]
        _, failed_more = await send_many(daemon.url(), more)
        assert not failed_more
        await wait_for(lambda: set(jsonl_ids(b)) >= set(more) and set(jsonl_ids(a)) >= set(more), timeout=30)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.kill()


HTTP_SINK = (
    SOURCE
    + """
[sinks.a]
connector = "jsonl"
path = "var/a.jsonl"

[sinks.crm]
connector = "http"
url = "{url}"

[[routes]]
from = "demo"
to = ["a", "crm"]
"""
)


async def test_removed_sink_keeps_its_pending_deliveries_and_they_go_out_when_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    receiver = Receiver(status=503)  # the crm is down: its deliveries wait for a retry
    await receiver.start()
    try:
        with_crm = BASE + HTTP_SINK.format(url=receiver.url)
        settings = settings_for(tmp_path, HTTP_SINK.format(url=receiver.url), BASE)
        config = tmp_path / "config.toml"
        async with running(settings) as d, aiohttp.ClientSession() as session:
            for i in range(5):
                status, _ = await post_signed(session, hook_url(d), {"type": "t.x", "n": i}, msg_id=f"m{i}")
                assert status == 200
            await wait_for(lambda: len(jsonl_ids(tmp_path / "var" / "a.jsonl")) == 5, timeout=20)
            await wait_for(lambda: len(receiver.log) >= 5, timeout=20)

            config.write_text(BASE + ONE_SINK)
            assert await reload(d)
            assert "crm" not in d.dispatcher.sinks
            assert "sink crm removed; its 5 pending deliveries stay in the store" in caplog.text
            db = sqlite3.connect(tmp_path / "var" / "integrand.db")
            try:
                states = dict(db.execute("SELECT state, COUNT(*) FROM deliveries WHERE sink = 'crm' GROUP BY state"))
            finally:
                db.close()
            assert states == {"ready": 5}

            receiver.status = 200
            config.write_text(with_crm)
            assert await reload(d)
            await wait_for(
                lambda: {r.event["id"] for r in receiver.log if r.status == 200} >= {f"m{i}" for i in range(5)},
                timeout=30,
            )
    finally:
        await receiver.stop()


async def test_reload_whose_new_sink_cannot_start_keeps_the_old_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    (tmp_path / "afile").write_text("not a directory")
    settings = settings_for(tmp_path, ONE_SINK, BASE)
    async with running(settings) as d:
        (tmp_path / "config.toml").write_text(BASE + TWO_SINKS.replace("var/b.jsonl", "afile/b.jsonl"))
        assert not await reload(d)
        assert (
            "reload rejected: sinks.b: connector 'jsonl' cannot start: File exists: " + str(tmp_path / "afile")
            in caplog.text
        )
        assert set(d.dispatcher.sinks) == {"a"}
        assert d.settings is settings


async def test_reload_applies_log_level_and_names_what_needs_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = settings_for(tmp_path, ONE_SINK, BASE)
    root = logging.getLogger()
    level = root.level
    try:
        async with running(settings) as d:
            changed = BASE.replace('log_level = "info"', 'log_level = "warning"').replace(
                'listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\ntrusted_proxies = ["127.0.0.1"]'
            )
            (tmp_path / "config.toml").write_text(changed.replace("workers = 4", "workers = 2") + ONE_SINK)
            assert await reload(d)
            assert root.level == logging.WARNING
            text = caplog.text
            assert "reload: daemon.trusted_proxies changed; it takes effect at the next restart" in text
            assert "reload: dispatcher.workers changed; it takes effect at the next restart" in text
            assert "daemon.log_level changed" not in text
    finally:
        root.setLevel(level)


ADMIN_AND_ALERTS = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"

[admin]
listen = "127.0.0.1:0"
socket = ""
token = {file = "token"}
"""

FAILING_SINK = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.crm]
connector = "http"
url = "URL"
breaker = {{failure_threshold = 1, open_for = "50ms", max_open_for = "100ms"}}
retry = {{base = "10ms", cap = "50ms"}}

[[routes]]
from = "demo"
to = ["crm"]
"""

ALERTS = """
[alerts]
webhook_url = {env = "INTEGRAND_TEST_CHAT_HOOK"}
check_every = "20ms"
breaker_open_for = "100ms"
"""


async def test_reload_applies_the_admin_token_and_alerts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from .test_alerts import ChatHook

    caplog.set_level(logging.INFO)
    hook = ChatHook()
    await hook.start()
    monkeypatch.setenv("INTEGRAND_TEST_CHAT_HOOK", hook.url)
    receiver = Receiver(status=503)
    await receiver.start()
    (tmp_path / "token").write_text("old-token-4f2a9c")
    sinks = FAILING_SINK.replace("URL", receiver.url)
    try:
        async with running(settings_for(tmp_path, sinks, ADMIN_AND_ALERTS)) as d, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{d.ports['admin']}/api/status"

            async def status_with(token: str) -> int:
                async with s.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
                    return r.status

            assert (await status_with("old-token-4f2a9c"), await status_with("new-token-8d1e7b")) == (200, 401)
            assert (await post_signed(s, hook_url(d), {"type": "t"}, "a1"))[0] == 200
            await wait_for(lambda: len(receiver.log) >= 2, timeout=10)  # the breaker is open, no notifier yet

            # One reload: a new token (same reference, new content) and an [alerts] table.
            (tmp_path / "token").write_text("new-token-8d1e7b")
            (tmp_path / "config.toml").write_text(ADMIN_AND_ALERTS + sinks + ALERTS)
            assert await reload(d)
            assert (await status_with("old-token-4f2a9c"), await status_with("new-token-8d1e7b")) == (401, 200)
            await wait_for(lambda: any(t.startswith("[FIRING] IntegrandBreakerOpenLong") for t in hook.texts()))
            assert "reload: admin.token changed" in caplog.text
            assert "reload: [alerts] notifier started" in caplog.text
            assert "takes effect at the next restart" not in caplog.text

            # And without [alerts] again: the notifier stops (nothing more is posted), the token stays.
            (tmp_path / "config.toml").write_text(ADMIN_AND_ALERTS + sinks)
            assert await reload(d)
            await wait_for(lambda: d.tasks["alerts"].done(), timeout=10)
            assert await status_with("new-token-8d1e7b") == 200
    finally:
        await receiver.stop()
        assert hook.runner is not None
        await hook.runner.cleanup()
