"""The shipped Prometheus alert rules (promtool, and only real metric names) and the built-in [alerts] notifier."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from integrand.config import load_config

from .helpers import admin_url, hook_url, post_signed, running, wait_for, write_config
from .receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "alerts.yml"


def promtool() -> str:
    found = shutil.which("promtool") or ROOT / ".venv" / "tools" / "usr" / "bin" / "promtool"
    if not Path(found).exists():
        raise AssertionError("promtool is missing: `make promtool` takes it out of Debian's prometheus package")
    return str(found)


def test_promtool_accepts_the_rules() -> None:
    res = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 6 rules found" in res.stdout


def test_the_rules_fire_on_the_conditions_they_name(tmp_path: Path) -> None:
    """promtool's rule unit tests: each rule fires on a series shaped like the daemon's (and not before)."""
    # Expressions, durations and labels as shipped; the annotations (prose) left out of the comparison.
    rules = tmp_path / "rules.yml"
    rules.write_text(re.sub(r"\n        annotations:\n(?:          .*\n)+", "\n", RULES.read_text() + "\n"))
    assert "annotations" not in rules.read_text() and rules.read_text().count("expr:") == 6
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(
        f"""
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'integrand_deliveries_total{{sink="crm",outcome="dead"}}'
        values: '0 0 1 2 2'
      - series: 'integrand_breaker_open_seconds{{sink="crm"}}'
        values: '0 60 120 180 240 300 360'
      - series: 'integrand_sink_auth_paused{{sink="erp"}}'
        values: '0 1 1'
      - series: 'integrand_source_poll_lag_seconds{{source="crm"}}'
        values: '10 200 260 320 380 440 500 560'
      - series: 'integrand_source_target_latency_seconds{{source="crm"}}'
        values: '60 60 60 60 60 60 60 60'
      - series: 'integrand_reconcile_entities_total{{source="crm",result="missed"}}'
        values: '0 0 3 3'
      - series: 'integrand_sink_oldest_pending_seconds{{sink="crm"}}'
        values: '0 1000 1060 1120 1180 1240 1300 1360'
    alert_rule_test:
      - eval_time: 4m
        alertname: IntegrandDeadLettersGrowing
        exp_alerts:
          - exp_labels: {{severity: warning, sink: crm, outcome: dead}}
      - eval_time: 3m
        alertname: IntegrandBreakerOpenLong
        exp_alerts: []
      - eval_time: 6m
        alertname: IntegrandBreakerOpenLong
        exp_alerts:
          - exp_labels: {{severity: critical, sink: crm}}
      - eval_time: 2m
        alertname: IntegrandSinkAuthPaused
        exp_alerts:
          - exp_labels: {{severity: critical, sink: erp}}
      - eval_time: 3m
        alertname: IntegrandReconcileCatchingMisses
        exp_alerts:
          - exp_labels: {{severity: info, source: crm, result: missed}}
      - eval_time: 1m
        alertname: IntegrandReconcileCatchingMisses
        exp_alerts: []
      - eval_time: 3m
        alertname: IntegrandOldestPendingHigh
        exp_alerts: []
      - eval_time: 7m
        alertname: IntegrandOldestPendingHigh
        exp_alerts:
          - exp_labels: {{severity: warning, sink: crm}}
      - eval_time: 7m
        alertname: IntegrandPollLagOverTarget
        exp_alerts:
          - exp_labels: {{severity: warning, source: crm}}
"""
    )
    res = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


async def test_every_metric_the_rules_use_is_exported(tmp_path: Path) -> None:
    exprs = re.findall(r"^\s+expr: (.+)$", RULES.read_text(), re.M)
    assert len(exprs) == 6
    used = {m for e in exprs for m in re.findall(r"\b((?:integrand|process)_[a-z_]+)\b", e)}
    async with (
        running(load_config(write_config(tmp_path))) as d,
        aiohttp.ClientSession() as s,
        s.get(admin_url(d, "/metrics")) as r,
    ):
        text = await r.text()
    exported = set()
    for family in text_string_to_metric_families(text):
        # A labelled counter with no sample yet (nothing dead-lettered, no reconcile ran) still has its family.
        exported |= {smp.name for smp in family.samples} | {family.name}
        if family.type == "counter":
            exported.add(family.name + "_total")
    assert used - exported == set()


class ChatHook:
    """A local Slack-style incoming webhook: records every JSON body; can be told to fail."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.fail = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        if self.fail:
            self.fail -= 1
            return web.Response(status=500)
        self.posts.append(orjson.loads(await request.read()))
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/services/T0/B0/secret", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/services/T0/B0/secret"

    def texts(self) -> list[str]:
        return [p["text"] for p in self.posts]


async def test_notifier_posts_each_alert_once_per_change_of_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = ChatHook()
    await hook.start()
    monkeypatch.setenv("INTEGRAND_TEST_CHAT_HOOK", hook.url)
    receiver = Receiver(status=503, per_event={"poison": [(400, {})]})
    await receiver.start()
    cfg = write_config(
        tmp_path,
        f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

[sinks.crm]
connector = "http"
url = "{receiver.url}"
breaker = {{failure_threshold = 1, open_for = "50ms", max_open_for = "100ms"}}
retry = {{base = "10ms", cap = "50ms"}}

[[routes]]
from = "demo"
to = ["crm"]

[alerts]
webhook_url = {{env = "INTEGRAND_TEST_CHAT_HOOK"}}
check_every = "20ms"
breaker_open_for = "150ms"
dlq_window = "400ms"
""",
    )
    try:
        async with running(load_config(cfg)) as d, aiohttp.ClientSession() as s:
            hook.fail = 1  # the first post fails: it is tried again, not lost
            assert (await post_signed(s, hook_url(d), {"type": "t"}, "a1"))[0] == 200
            await wait_for(lambda: any("IntegrandBreakerOpenLong" in t for t in hook.texts()), timeout=10)
            firing = [t for t in hook.texts() if "BreakerOpenLong" in t]
            assert firing[0].startswith("[FIRING] IntegrandBreakerOpenLong: sink crm: circuit breaker")
            # Still open several probes and checks later: not announced again.
            probes = len(receiver.log)
            await wait_for(lambda: len(receiver.log) >= probes + 3, timeout=10)
            assert [t for t in hook.texts() if "BreakerOpenLong" in t] == firing
            receiver.status = 200  # the sink is back: the breaker closes and the alert resolves, once
            await wait_for(lambda: any(t.startswith("[RESOLVED] IntegrandBreakerOpenLong") for t in hook.texts()))
            # A poison event dead-letters: the DLQ alert fires, then resolves when the window has passed.
            assert (await post_signed(s, hook_url(d), {"type": "t"}, "poison"))[0] == 200
            await wait_for(lambda: any(t.startswith("[FIRING] IntegrandDeadLettersGrowing") for t in hook.texts()))
            await wait_for(lambda: any(t.startswith("[RESOLVED] IntegrandDeadLettersGrowing") for t in hook.texts()))
        states = [t.split()[0] + " " + t.split()[1] for t in hook.texts()]
        assert states == [
            "[FIRING] IntegrandBreakerOpenLong:",
            "[RESOLVED] IntegrandBreakerOpenLong:",
            "[FIRING] IntegrandDeadLettersGrowing:",
            "[RESOLVED] IntegrandDeadLettersGrowing:",
        ]
        assert "sink crm: 1 delivery(ies) dead-lettered" in hook.texts()[2]
    finally:
        await receiver.stop()
        assert hook.runner is not None
        await hook.runner.cleanup()


async def test_notifier_says_a_sink_is_paused_and_its_backlog_is_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = ChatHook()
    await hook.start()
    monkeypatch.setenv("INTEGRAND_TEST_CHAT_HOOK", hook.url)
    receiver = Receiver(status=401)  # the sink refuses its credentials: paused, deliveries wait
    await receiver.start()
    cfg = write_config(
        tmp_path,
        f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

[sinks.crm]
connector = "http"
url = "{receiver.url}"
breaker = {{open_for = "50ms", max_open_for = "100ms"}}

[[routes]]
from = "demo"
to = ["crm"]

[alerts]
webhook_url = {{env = "INTEGRAND_TEST_CHAT_HOOK"}}
check_every = "20ms"
oldest_pending = "300ms"
breaker_open_for = "1h"
""",
    )
    try:
        async with running(load_config(cfg)) as d, aiohttp.ClientSession() as s:
            assert (await post_signed(s, hook_url(d), {"type": "t"}, "p1"))[0] == 200
            await wait_for(lambda: any("IntegrandSinkAuthPaused" in t for t in hook.texts()), timeout=10)
            await wait_for(lambda: any("IntegrandOldestPendingHigh" in t for t in hook.texts()), timeout=10)
            receiver.status = 200  # re-authorized: the probe goes through, both resolve
            await wait_for(lambda: sum(t.startswith("[RESOLVED]") for t in hook.texts()) == 2, timeout=10)
        texts = hook.texts()
        assert sorted(t.split(":")[0] for t in texts) == [
            "[FIRING] IntegrandOldestPendingHigh",
            "[FIRING] IntegrandSinkAuthPaused",
            "[RESOLVED] IntegrandOldestPendingHigh",
            "[RESOLVED] IntegrandSinkAuthPaused",
        ]
        paused = next(t for t in texts if t.startswith("[FIRING] IntegrandSinkAuthPaused"))
        assert "sink crm: paused, its credentials were refused: AuthError: HTTP 401" in paused
    finally:
        await receiver.stop()
        assert hook.runner is not None
        await hook.runner.cleanup()


async def test_notifier_says_a_source_polls_late(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .fake_rest import FakeRest
    from .test_http_poll import poll_config

    hook = ChatHook()
    await hook.start()
    monkeypatch.setenv("INTEGRAND_TEST_CHAT_HOOK", hook.url)
    api = FakeRest(seed=9, fail_every=1)  # every request answers 500: no poll succeeds
    base = await api.start()
    alerts = '\n[alerts]\nwebhook_url = {env = "INTEGRAND_TEST_CHAT_HOOK"}\ncheck_every = "20ms"\n'
    cfg = write_config(tmp_path, poll_config(base) + alerts)
    try:
        async with running(load_config(cfg)):
            await wait_for(lambda: any("IntegrandPollLagOverTarget" in t for t in hook.texts()), timeout=10)
            api.fail_every = 0  # the API is back: the next poll succeeds and the alert resolves
            await wait_for(lambda: any(t.startswith("[RESOLVED] IntegrandPollLagOverTarget") for t in hook.texts()))
        firing = [t for t in hook.texts() if t.startswith("[FIRING]")]
        assert len(firing) == 1
        assert firing[0].startswith("[FIRING] IntegrandPollLagOverTarget: source crm: last successful poll")
        assert "target latency" in firing[0] and "last error:" in firing[0]
    finally:
        await api.close()
        assert hook.runner is not None
        await hook.runner.cleanup()
