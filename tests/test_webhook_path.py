"""The webhook path end to end, in process: listener → store → dispatcher → jsonl sink."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson

from .helpers import hook_url, post_signed, read_jsonl, running, settings_for, wait_for


async def test_signed_webhook_reaches_jsonl_sink(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    out = tmp_path / "var" / "out.jsonl"
    async with running(settings) as d, aiohttp.ClientSession() as s:
        status, body = await post_signed(s, hook_url(d), {"type": "customer.created", "id": 7}, "msg_1")
        assert (status, body) == (200, {"accepted": 1, "duplicates": 0})
        await wait_for(lambda: len(read_jsonl(out)) == 1)
    [line] = read_jsonl(out)
    assert line["id"] == "msg_1"
    assert line["source"] == "demo"
    assert line["type"] == "customer.created"
    assert line["data"] == {"type": "customer.created", "id": 7}
    assert line["received_at"].endswith("Z")


async def test_duplicate_delivery_is_200_and_delivered_once(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    out = tmp_path / "var" / "out.jsonl"
    async with running(settings) as d, aiohttp.ClientSession() as s:
        first = await post_signed(s, hook_url(d), {"n": 1}, "msg_dup")
        second = await post_signed(s, hook_url(d), {"n": 1}, "msg_dup")
        assert first == (200, {"accepted": 1, "duplicates": 0})
        assert second == (200, {"accepted": 0, "duplicates": 1})
        await post_signed(s, hook_url(d), {"n": 2}, "msg_other")
        await wait_for(lambda: len(read_jsonl(out)) == 2)
    assert sorted(line["id"] for line in read_jsonl(out)) == ["msg_dup", "msg_other"]


async def test_port_in_use_names_the_config_key(tmp_path: Path) -> None:
    import socket

    import pytest

    from integrand.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        base = f'[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "var"\n[admin]\nlisten = "127.0.0.1:0"\n'
        settings = settings_for(tmp_path, base=base)
        with pytest.raises(ConfigError, match=f"daemon.listen: cannot listen on 127.0.0.1:{port}"):
            async with running(settings):
                pass


async def test_a_late_stripe_event_is_still_delivered(tmp_path: Path) -> None:
    """Stripe events are a log: an older event for the same object arriving late is not 'stale'."""
    import time

    from integrand import signing

    body_cfg = """
[sources.stripe]
connector = "webhook"
signature = "stripe"
secret = "whsec_test"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "stripe"
to = ["out"]
"""
    out = tmp_path / "var" / "out.jsonl"
    async with running(settings_for(tmp_path, body_cfg)) as d, aiohttp.ClientSession() as s:
        for evt, created in (("evt_new", 1700000100), ("evt_old", 1700000000)):
            body = orjson.dumps(
                {
                    "id": evt,
                    "type": "invoice.updated",
                    "created": created,
                    "data": {"object": {"id": "in_1", "object": "invoice"}},
                }
            )
            headers = {
                "Content-Type": "application/json",
                "Stripe-Signature": signing.stripe_sign("whsec_test", int(time.time()), body),
            }
            async with s.post(hook_url(d, "stripe"), data=body, headers=headers) as r:
                assert (r.status, await r.json()) == (200, {"accepted": 1, "duplicates": 0})
        await wait_for(lambda: len(read_jsonl(out)) == 2)
    assert [line["id"] for line in read_jsonl(out)] == ["evt_new", "evt_old"]
