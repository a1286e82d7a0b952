"""The quickbooks and hubspot connectors inside the running daemon (listener, store, dispatcher) against the fakes."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from qbo_support import qbo_env, qbo_table, wait_for

from integrand.testing import daemon_config, running_daemon, standard_webhook_headers

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


async def _post_signed(session: aiohttp.ClientSession, url: str, payload: Any, msg_id: str) -> int:
    body = orjson.dumps(payload)
    async with session.post(url, data=body, headers=standard_webhook_headers(body, msg_id, WHSEC)) as r:
        return r.status


async def test_quickbooks_webhooks_in_both_formats_through_the_daemon(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.qbo]
{qbo_table(env.fake, 'refresh_token = "unused"')}

[sources.qbo.poll]
enabled = false  # webhooks only here: CDC polling would add its own events for the same customers

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "qbo"
to = ["out"]
""",
        )
        out = tmp_path / "var" / "out.jsonl"
        async with running_daemon(cfg) as d:
            env.fake.webhook_url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/qbo"
            a = env.fake.create("Customer", {"DisplayName": "A"})
            first = env.fake.webhook_body(list(env.fake.pending))
            assert await env.fake.flush_webhooks() == 200
            env.fake.update("Customer", a["Id"], {"CompanyName": "A Inc"})
            assert await env.fake.flush_webhooks(fmt="cloudevents") == 200
            await wait_for(lambda: len(_lines(out)) == 2)
            async with aiohttp.ClientSession() as s:
                # Intuit redelivers the first notification (it saw no ack): acknowledged as a duplicate.
                async with s.post(env.fake.webhook_url, data=first, headers=env.fake.webhook_headers(first)) as r:
                    assert r.status == 200
                    assert await r.json() == {"accepted": 0, "duplicates": 1}
                bad = {**env.fake.webhook_headers(first), "intuit-signature": "AAAA"}
                async with s.post(env.fake.webhook_url, data=first, headers=bad) as r:
                    assert r.status == 401
            env.fake.delete("Customer", a["Id"])  # (real QuickBooks only deactivates customers; the fake allows it)
            assert await env.fake.flush_webhooks() == 200
            await wait_for(lambda: len(_lines(out)) == 3)
        got = _lines(out)
        assert [e["type"] for e in got] == ["customer.created", "customer.updated", "customer.deleted"]
        assert got[0]["entity_id"] == a["Id"]
        assert got[0]["data"]["realm"] == env.fake.realm_id
        assert got[1]["id"].startswith("ce_")


async def test_quickbooks_sink_in_the_daemon_keeps_under_ten_per_second(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.in]
connector = "webhook"
signature = "standard-webhooks"
secret = "{WHSEC}"
entity_field = "entity"
entity_id_field = "DisplayName"

[sinks.qbo]
batch_size = 1
{qbo_table(env.fake, f'refresh_token = "{env.fake.issue_refresh_token()}"' + chr(10) + 'entity = "Customer"')}

[[routes]]
from = "in"
to = ["qbo"]
""",
        )
        async with running_daemon(cfg) as d, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/in"
            statuses = await asyncio.gather(
                *(_post_signed(s, url, {"DisplayName": f"C{i}", "entity": "Customer"}, f"m{i}") for i in range(25))
            )
            assert set(statuses) == {200}
            await wait_for(lambda: len(env.fake.all("Customer")) == 25, timeout=30)
        assert env.fake.throttled == 0  # eight dispatcher workers, one limiter: never over 10/s or 500/min
        assert sorted(c["DisplayName"] for c in env.fake.all("Customer")) == sorted(f"C{i}" for i in range(25))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _daemon(cfg: Path) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "integrand.cli", "run", "--config", str(cfg), stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert line, "daemon exited before it was ready"
        m = re.search(r"ready: webhooks on [\d.]+:(\d+)", line)
        if m:
            return proc, int(m.group(1))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    await asyncio.wait_for(proc.stderr.read(), 30)
    assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_rotated_token_survives_a_daemon_restart(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        first = env.fake.issue_refresh_token()
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.in]
connector = "webhook"
signature = "standard-webhooks"
secret = "{WHSEC}"

[sinks.qbo]
{qbo_table(env.fake, f'refresh_token = "{first}"' + chr(10) + 'entity = "Customer"')}

[[routes]]
from = "in"
to = ["qbo"]
""",
        )
        async with aiohttp.ClientSession() as s:
            proc, port = await _daemon(cfg)
            try:
                assert (
                    await _post_signed(s, f"http://127.0.0.1:{port}/hooks/in", {"DisplayName": "Before"}, "m1") == 200
                )
                await wait_for(lambda: len(env.fake.all("Customer")) == 1, timeout=20)
            finally:
                await _stop(proc)
            assert env.fake.refreshes == 1  # the bootstrap token is spent now
            env.fake.advance(3601)  # and the access token it gave has expired
            proc, port = await _daemon(cfg)  # same config: it still names the spent bootstrap token
            try:
                assert await _post_signed(s, f"http://127.0.0.1:{port}/hooks/in", {"DisplayName": "After"}, "m2") == 200
                await wait_for(lambda: len(env.fake.all("Customer")) == 2, timeout=20)
            finally:
                await _stop(proc)
        assert env.fake.refreshes == 2  # refreshed with the rotated token the first run stored
        db = b"".join(p.read_bytes() for p in (tmp_path / "var").glob("integrand.db*"))
        assert first.encode() not in db
        assert not any(t.encode() in db for t in env.fake.refresh_tokens)  # encrypted at rest


async def test_a_poller_and_a_sink_of_one_realm_share_its_budget_in_the_daemon(tmp_path: Path) -> None:
    # The fake enforces 5 a second and 25 a minute for the realm; so do both connectors. Each alone
    # keeps to it; only one budget shared through integrand's HTTP helper keeps them to it together.
    async with qbo_env(tmp_path, per_second=5, per_minute=25) as env:
        limits = f'requests_per_second = 5{chr(10)}requests_per_minute = 25{chr(10)}refresh_token = "{env.fake.issue_refresh_token()}"'
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.in]
connector = "webhook"
signature = "standard-webhooks"
secret = "{WHSEC}"
entity_field = "entity"
entity_id_field = "DisplayName"

[sources.books]
{qbo_table(env.fake, limits + chr(10) + 'entities = ["Customer"]' + chr(10) + 'initial_lookback = "1m"')}

[sources.books.poll]
min_interval = "50ms"
max_interval = "100ms"
target_latency = "100ms"

[sinks.books_out]
batch_size = 1
{qbo_table(env.fake, limits + chr(10) + 'entity = "Customer"')}

[sinks.seen]
connector = "jsonl"
path = "var/seen.jsonl"

[[routes]]
from = "in"
to = ["books_out"]

[[routes]]
from = "books"
to = ["seen"]
""",
        )
        seen = tmp_path / "var" / "seen.jsonl"

        def polled() -> set[str]:
            return {str((e["data"].get("object") or {}).get("DisplayName")) for e in _lines(seen)}

        started = time.monotonic()
        async with running_daemon(cfg) as d, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/in"
            statuses = await asyncio.gather(
                *(_post_signed(s, url, {"DisplayName": f"S{i}", "entity": "Customer"}, f"s{i}") for i in range(10))
            )
            assert set(statuses) == {200}
            want = {f"S{i}" for i in range(10)}
            await wait_for(lambda: want <= polled(), timeout=30)  # the poller saw every write of the sink
            # Then the poller spends the rest of the minute's budget and waits in the shared limiter.
            budget = d.http.limiter(f"quickbooks:{env.fake.realm_id}")
            await wait_for(lambda: len(env.fake.requests) >= 25 and budget.waited > 30, timeout=30)
        assert time.monotonic() - started < 60
        assert env.fake.throttled == 0
        api = [(t, m, p) for t, m, p in env.fake.requests]
        writes = [r for r in api if r[1] == "POST" and r[2].endswith("/customer")]
        polls = [r for r in api if r[2].endswith("/cdc")]
        assert len(writes) == 10
        assert polls
        assert len(api) == 25  # within one minute: never more than the realm's 25, poller and sink together
        stamps = sorted(t for t, _, _ in api)
        assert all(sum(1 for u in stamps if t <= u < t + 1.0) <= 5 for t in stamps)
