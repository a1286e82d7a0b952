"""QuickBooks → HubSpot through the daemon: webhook, enrichment, mapping, batch upsert, against both fakes."""

from __future__ import annotations

from pathlib import Path

from integrand_hubspot.fake import FakeHubSpot
from qbo_support import qbo_env, qbo_table, wait_for

from integrand.testing import daemon_config, running_daemon

ROUTE = """
[[routes]]
from = "qbo"
to = ["hubspot"]
filter = { entity = ["Customer"] }
enrich = true

[routes.map]
email = { path = "data.object.PrimaryEmailAddr.Address", convert = ["strip", "lower"], required = true }
firstname = "data.object.GivenName"
lastname = "data.object.FamilyName"
company = "data.object.CompanyName"
qbo_customer_id = "data.object.Id"
"""


async def test_customer_created_in_quickbooks_appears_in_hubspot_and_stays_newest(tmp_path: Path) -> None:
    hs = FakeHubSpot()
    await hs.start()
    try:
        async with qbo_env(tmp_path) as env:
            cfg = daemon_config(
                tmp_path,
                f"""
[sources.qbo]
{qbo_table(env.fake, f'refresh_token = "{env.fake.issue_refresh_token()}"')}

[sources.qbo.poll]
enabled = false  # the webhook path alone (polling is tested in test_qbo_poll_daemon.py)

[sinks.hubspot]
connector = "hubspot"
access_token = "{hs.private_token}"
api_base = "{hs.url}"
version_property = "integrand_version"
"""
                + ROUTE,
            )
            async with running_daemon(cfg) as d:
                env.fake.webhook_url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/qbo"
                c = env.fake.create(
                    "Customer",
                    {
                        "DisplayName": "Ann Lee",
                        "GivenName": "Ann",
                        "FamilyName": "Lee",
                        "PrimaryEmailAddr": {"Address": " Ann@X.com "},
                    },
                )
                assert await env.fake.flush_webhooks() == 200

                def contact() -> dict[str, str] | None:
                    found = hs.find("contacts", "email", "ann@x.com")
                    return None if found is None else found["properties"]

                await wait_for(lambda: contact() is not None, timeout=20)
                got = contact()
                assert got is not None
                assert (got["firstname"], got["lastname"], got["qbo_customer_id"]) == ("Ann", "Lee", c["Id"])

                # Two edits a second apart; their notifications arrive newest first, then the older one, then a duplicate.
                env.fake.advance(1)
                env.fake.update("Customer", c["Id"], {"CompanyName": "Lee Ltd"})
                older = list(env.fake.pending)
                env.fake.pending.clear()
                env.fake.advance(1)
                env.fake.update("Customer", c["Id"], {"CompanyName": "Lee Holdings"})
                assert await env.fake.flush_webhooks(fmt="cloudevents") == 200
                env.fake.pending = older
                assert await env.fake.flush_webhooks() == 200
                env.fake.pending = older
                assert await env.fake.flush_webhooks() == 200

                async def settled() -> bool:
                    counts = await d.store.counts()
                    return bool(counts.get(("hubspot", "ready"), 0) + counts.get(("hubspot", "leased"), 0) == 0)

                await wait_for(settled, timeout=20)
                await wait_for(lambda: (contact() or {}).get("company") == "Lee Holdings", timeout=20)
            final = contact()
            assert final is not None
            assert final["company"] == "Lee Holdings"
            assert len(hs.objects["contacts"]) == 1
            written = [e.get("propertyValue") for e in hs.pending if e.get("propertyName") == "company"]
            assert written == ["Lee Holdings"]  # the stale value was never written, not even for a moment
            assert env.fake.throttled == 0
            assert hs.throttled == []
    finally:
        await hs.stop()
