"""The hubspot sink inside the running daemon (listener, store, dispatcher) against the fake."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from hs_support import wait_for
from integrand_hubspot.fake import FakeHubSpot

from integrand.testing import daemon_config, running_daemon, standard_webhook_headers

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def _post_signed(session: aiohttp.ClientSession, url: str, payload: Any, msg_id: str) -> int:
    body = orjson.dumps(payload)
    async with session.post(url, data=body, headers=standard_webhook_headers(body, msg_id, WHSEC)) as r:
        return r.status


async def test_hubspot_sink_in_the_daemon_batches_and_never_writes_stale(tmp_path: Path) -> None:
    fake = FakeHubSpot()
    await fake.start()
    try:
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.in]
connector = "webhook"
signature = "standard-webhooks"
secret = "{WHSEC}"
entity_field = "entity"
entity_id_field = "email"
version_field = "version"

[sinks.hubspot]
connector = "hubspot"
access_token = "{fake.private_token}"
api_base = "{fake.url}"
version_property = "integrand_version"

[[routes]]
from = "in"
to = ["hubspot"]
""",
        )
        async with running_daemon(cfg) as d, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/in"
            for i in range(150):
                payload = {
                    "email": f"p{i}@x.com",
                    "firstname": f"P{i}",
                    "entity": "contact",
                    "version": "2025-01-01T00:00:00Z",
                }
                assert await _post_signed(s, url, payload, f"a{i}") == 200
            await wait_for(lambda: len(fake.objects.get("contacts", {})) == 150, timeout=30)
            # A newer change, then a late, older notification for the same contact, then a duplicate of the newer.
            newer = {"email": "p1@x.com", "firstname": "Newest", "entity": "contact", "version": "2025-03-01T00:00:00Z"}
            older = {"email": "p1@x.com", "firstname": "Stale", "entity": "contact", "version": "2025-02-01T00:00:00Z"}
            assert await _post_signed(s, url, newer, "n1") == 200
            assert await _post_signed(s, url, older, "o1") == 200
            assert await _post_signed(s, url, newer, "n1") == 200

            async def settled() -> bool:
                counts = await d.store.counts()
                return bool(counts.get(("hubspot", "ready"), 0) + counts.get(("hubspot", "leased"), 0) == 0)

            await wait_for(settled, timeout=20)
        p1 = fake.find("contacts", "email", "p1@x.com")
        assert p1 is not None
        assert p1["properties"]["firstname"] == "Newest"
        assert p1["properties"]["integrand_version"] == "2025-03-01T00:00:00Z"
        assert max(fake.batch_sizes) <= 100
        assert fake.throttled == []
        assert len(fake.objects["contacts"]) == 150
    finally:
        await fake.stop()


async def test_hubspot_webhooks_signed_v3_through_the_daemon(tmp_path: Path) -> None:
    fake = FakeHubSpot()
    await fake.start()
    try:
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.hubspot]
connector = "hubspot"
access_token = "{fake.private_token}"
client_secret = "{fake.client_secret}"
api_base = "{fake.url}"
# Webhooks only: a poll that saw the newest version first would (rightly) make the webhooks' older
# versions stale, and this test is about the webhook path.
poll = {{ enabled = false }}

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "hubspot"
to = ["out"]
""",
        )
        out = tmp_path / "var" / "out.jsonl"
        async with running_daemon(cfg) as d:
            # No webhook_url configured: the signed URI is the one the daemon was called on.
            fake.webhook_url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/hubspot"
            c = fake.put("contacts", {"email": "h@x.com"})
            fake.edit("contacts", c["id"], {"firstname": "Hal"})
            sent = list(fake.pending)
            assert await fake.flush_webhooks() == 200
            await wait_for(lambda: out.exists() and len(out.read_bytes().splitlines()) == 2)
            # HubSpot retries with a higher attemptNumber: the same events, acknowledged as duplicates.
            async with aiohttp.ClientSession() as s:
                retry = orjson.dumps([{**e, "attemptNumber": 1} for e in sent])
                headers = fake.webhook_headers(fake.webhook_url, retry)
                async with s.post(fake.webhook_url, data=retry, headers=headers) as r:
                    assert r.status == 200
                    assert await r.json() == {"accepted": 0, "duplicates": 2}
                body = orjson.dumps(sent)
                stale = fake.webhook_headers(fake.webhook_url, body)
                stale["X-HubSpot-Request-Timestamp"] = str(int((time.time() - 600) * 1000))
                async with s.post(fake.webhook_url, data=body, headers=stale) as r:
                    assert r.status == 401
                v1 = fake.webhook_headers(fake.webhook_url, body, ("v1",))
                async with s.post(fake.webhook_url, data=body, headers=v1) as r:
                    assert r.status == 401  # v1 is not accepted unless configured
        lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
        assert [e["type"] for e in lines] == ["contact.creation", "contact.propertyChange"]
        assert lines[1]["data"]["propertyValue"] == "Hal"
    finally:
        await fake.stop()
