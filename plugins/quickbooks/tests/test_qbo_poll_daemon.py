"""A missed QuickBooks webhook is caught by CDC polling in the running daemon."""

from __future__ import annotations

from pathlib import Path

import orjson
from qbo_support import qbo_env, qbo_table, wait_for

from integrand.testing import daemon_config, running_daemon


async def test_missed_webhook_is_caught_by_cdc_polling(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.qbo]
{qbo_table(env.fake, f'refresh_token = "{env.fake.issue_refresh_token()}"' + chr(10) + 'entities = ["Customer"]' + chr(10) + 'initial_lookback = "1m"')}

[sources.qbo.poll]
min_interval = "200ms"
max_interval = "1s"
target_latency = "1s"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "qbo"
to = ["out"]
""",
        )
        out = tmp_path / "var" / "out.jsonl"

        def names() -> set[str]:
            if not out.exists():
                return set()
            lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
            found = {(e["data"].get("object") or {}).get("DisplayName") for e in lines}
            return {str(n) for n in found if n is not None}

        async with running_daemon(cfg) as d:
            env.fake.webhook_url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/qbo"
            env.fake.create("Customer", {"DisplayName": "Heard"})
            assert await env.fake.flush_webhooks() == 200
            env.fake.create("Customer", {"DisplayName": "Missed"})
            assert await env.fake.flush_webhooks(drop=True) is None  # this notification never arrives
            await wait_for(lambda: "Missed" in names(), timeout=20)
        assert {"Heard", "Missed"} <= names()
        assert env.fake.throttled == 0
