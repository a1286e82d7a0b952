"""JSON logs of a real daemon process: one object per line, the event's fields, no secret, no library chatter."""

from __future__ import annotations

import base64
import os
import re
import signal
from pathlib import Path

import aiohttp
import orjson

from .daemon_proc import DaemonProcess
from .helpers import signed_headers, wait_for
from .receiver import Receiver

HOOK_SECRET = "whsec_" + base64.b64encode(b"hook-secret-for-the-log-test-0001").decode()
SINK_SECRET = "whsec_" + base64.b64encode(b"sink-secret-for-the-log-test-0002").decode()
ADMIN_TOKEN = "adm_Qm4LxP7vR2sT9wZk"


async def test_json_logs_carry_fields_and_no_secret(tmp_path: Path) -> None:
    receiver = Receiver(per_event={"poison": [(400, {"X-Request-Id": "req-77"})], "locked": [(401, {})]})
    await receiver.start()
    (tmp_path / "hook.secret").write_text(HOOK_SECRET)
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN)
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "debug"
log_format = "json"

[admin]
listen = "127.0.0.1:0"
token = {{file = "admin.token"}}

[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = {{file = "hook.secret"}}

[sinks.crm]
connector = "http"
url = "{receiver.url}"
secret = {{env = "INTEGRAND_TEST_SINK_SECRET"}}
breaker = {{max_open_for = "200ms", open_for = "100ms"}}

[[routes]]
from = "demo"
to = ["crm"]
"""
    )
    os.environ["INTEGRAND_TEST_SINK_SECRET"] = SINK_SECRET
    proc = DaemonProcess(cfg, tmp_path / "daemon.log")
    try:
        await proc.start()
        async with aiohttp.ClientSession() as s:
            ids = [f"ok-{i}" for i in range(40)] + ["poison", "locked"]
            for msg_id in ids:
                body = orjson.dumps({"type": "t", "id": msg_id})
                async with s.post(proc.url(), data=body, headers=signed_headers(body, msg_id, HOOK_SECRET)) as r:
                    assert r.status == 200
            # A refused webhook carrying credentials in its headers and body.
            leak = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
            async with s.post(proc.url(), data=orjson.dumps({"k": SINK_SECRET}), headers=leak) as r:
                assert r.status == 401
            for _ in range(30):  # a flood of refusals is a few lines, not thirty
                async with s.post(proc.url(), data=b"{}", headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 401
            await wait_for(lambda: {e["id"] for e in receiver.delivered()} >= set(ids) - {"poison"}, timeout=20)
            await wait_for(lambda: "dead-lettered" in proc.output(), timeout=10)
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        await proc.kill()
        await receiver.stop()
        os.environ.pop("INTEGRAND_TEST_SINK_SECRET", None)

    text = proc.output()
    for secret in (HOOK_SECRET, SINK_SECRET, ADMIN_TOKEN, HOOK_SECRET[6:], SINK_SECRET[6:]):
        assert secret not in text
    lines = [orjson.loads(ln) for ln in text.splitlines() if ln.strip()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(ln) for ln in lines)
    assert all(ln["ts"].endswith("Z") for ln in lines)
    # Libraries stay at warning although log_level is debug: aiosqlite would log every query.
    assert not [ln for ln in lines if ln["logger"].startswith(("aiosqlite", "asyncio")) and ln["level"] == "DEBUG"]
    dead = next(ln for ln in lines if "dead-lettered" in ln["msg"])
    assert (dead["sink"], dead["event_id"], dead["source"], dead["request_id"]) == ("crm", "poison", "demo", "req-77")
    assert isinstance(dead["delivery_id"], int)
    alert = next(ln for ln in lines if ln["msg"].startswith("ALERT sink crm"))
    assert alert["sink"] == "crm" and alert["level"] == "CRITICAL"
    refused = [ln for ln in lines if "refused webhook" in ln["msg"]]
    assert 1 <= len(refused) <= 5 and refused[0]["source"] == "demo"  # the listener's burst, not 31
    # At info and above: lines for state changes (ready, refusal, dead letter, pause, stop), not one per event.
    info = [ln for ln in lines if ln["level"] != "DEBUG"]
    assert not [ln for ln in info if re.search(r"\bok-\d", ln["msg"]) or str(ln.get("event_id", "")).startswith("ok-")]
    assert len(info) < 25, [ln["msg"] for ln in info]  # 40 good events, a handful of state changes


def test_repeats_are_collapsed_per_subject_and_counted() -> None:
    import logging

    from integrand.logs import Repeats

    now = [0.0]
    f = Repeats(window=60, clock=lambda: now[0])

    def rec(level: int, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("integrand.x", level, __file__, 1, msg, args, None)

    dead = "sink %s: delivery %d failed permanently, dead-lettered: %s"
    kept = [f.filter(rec(logging.ERROR, dead, "crm", i, "HTTP 400")) for i in range(50)]
    assert kept == [True] + [False] * 49
    assert f.filter(rec(logging.ERROR, dead, "erp", 1, "HTTP 400"))  # another subject
    assert f.filter(rec(logging.DEBUG, "sink %s: delivery %d sent", "crm", 7))  # debug: all of it
    assert f.filter(rec(logging.CRITICAL, "ALERT sink %s", "demo")) and f.filter(
        rec(logging.CRITICAL, "ALERT sink %s", "demo")
    )
    now[0] = 61.0
    r = rec(logging.ERROR, dead, "crm", 99, "HTTP 400")
    assert f.filter(r)
    assert r.repeats == 49  # type: ignore[attr-defined]
    assert r.getMessage() == (
        "sink crm: delivery 99 failed permanently, dead-lettered: HTTP 400 "
        "[and 49 more like this in the 60 s before, not logged]"
    )
    assert not f.filter(rec(logging.ERROR, dead, "crm", 100, "HTTP 400"))
