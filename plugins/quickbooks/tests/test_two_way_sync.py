"""The shipped QuickBooks ⇄ HubSpot example (its mappings and loop guards) running against both fakes."""

from __future__ import annotations

from pathlib import Path

from integrand_hubspot.fake import FakeHubSpot
from qbo_support import qbo_env, qbo_table, wait_for

from integrand.testing import daemon_config, running_daemon

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "quickbooks-hubspot"
PROPS = (
    '["email", "firstname", "lastname", "company", "phone", "address", "city", "state", "zip", '
    '"country", "lifecyclestage", "qbo_customer_since", "qbo_balance", "qbo_customer_id"]'
)


async def test_both_ways_without_bouncing(tmp_path: Path) -> None:
    hs = FakeHubSpot()
    await hs.start()
    try:
        async with qbo_env(tmp_path) as env:
            rt = env.fake.issue_refresh_token()
            cfg = daemon_config(
                tmp_path,
                f"""
[sources.quickbooks]
{qbo_table(env.fake, f'refresh_token = "{rt}"' + chr(10) + 'entities = ["Customer"]')}

[sources.quickbooks.poll]
enabled = false

[sources.hubspot]
connector = "hubspot"
access_token = "{hs.private_token}"
client_secret = "{hs.client_secret}"
api_base = "{hs.url}"
properties = {PROPS}

[sources.hubspot.poll]
enabled = false

[sinks.hubspot_contacts]
connector = "hubspot"
access_token = "{hs.private_token}"
api_base = "{hs.url}"
id_property = "email"

[sinks.qbo_customers]
{qbo_table(env.fake, f'refresh_token = "{rt}"' + chr(10) + 'entity = "Customer"' + chr(10) + 'match_field = "PrimaryEmailAddr.Address"')}

[[routes]]
from = "quickbooks"
to = ["hubspot_contacts"]
filter = {{ entity = ["Customer"] }}
enrich = true
mapping = "{EXAMPLE / "qbo-customer-to-hubspot-contact.toml"}"
loop_guard = {{ key = "email", echo_source = "hubspot", echo_path = "data.object.properties" }}

[[routes]]
from = "hubspot"
to = ["qbo_customers"]
filter = {{ entity = ["contact"] }}
enrich = true
mapping = "{EXAMPLE / "hubspot-contact-to-qbo-customer.toml"}"
loop_guard = {{ key = "PrimaryEmailAddr.Address", echo_source = "quickbooks", echo_path = "data.object" }}
""",
            )
            async with running_daemon(cfg) as d:
                env.fake.webhook_url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/quickbooks"
                hs.webhook_url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/hubspot"

                async def settled() -> bool:
                    counts = await d.store.counts()
                    busy = sum(n for (_, state), n in counts.items() if state in ("ready", "leased"))
                    return bool(busy == 0)

                # 1. A customer is created in QuickBooks: it reaches HubSpot.
                c = env.fake.create(
                    "Customer",
                    {
                        "DisplayName": "Grace Hopper",
                        "GivenName": "Grace",
                        "FamilyName": "Hopper",
                        "PrimaryEmailAddr": {"Address": "grace@navy.example"},
                        "BillAddr": {"Country": "USA"},
                    },
                )
                assert await env.fake.flush_webhooks() == 200
                await wait_for(lambda: hs.find("contacts", "email", "grace@navy.example") is not None, timeout=20)
                contact = hs.find("contacts", "email", "grace@navy.example")
                assert contact is not None
                assert contact["properties"]["country"] == "United States"  # the example's lookup table
                # 2. HubSpot announces that write back: recognised as integrand's own echo, not written to QuickBooks.
                assert await hs.flush_webhooks() == 200
                await wait_for(settled, timeout=20)
                assert env.fake.get("Customer", c["Id"])["SyncToken"] == "0"  # type: ignore[index]
                # 3. Someone edits the contact in HubSpot: the change reaches QuickBooks, found by email.
                hs.edit("contacts", contact["id"], {"company": "US Navy"})
                assert await hs.flush_webhooks() == 200
                await wait_for(
                    lambda: (env.fake.get("Customer", c["Id"]) or {}).get("CompanyName") == "US Navy", timeout=20
                )
                # 4. QuickBooks announces that update: the echo stops here, HubSpot is not written again.
                writes = len(hs.batch_sizes)
                assert await env.fake.flush_webhooks() == 200
                await wait_for(settled, timeout=20)
                assert len(hs.batch_sizes) == writes
                counts = await d.store.counts()
                assert counts.get(("qbo_customers", "dead"), 0) == 0
                assert counts.get(("hubspot_contacts", "dead"), 0) == 0
                assert counts.get(("qbo_customers", "done"), 0) >= 2  # the echo was handled (skipped), then the edit
            assert len(env.fake.all("Customer")) == 1
            assert len(hs.objects["contacts"]) == 1
            assert env.fake.throttled == 0
            assert hs.throttled == []
    finally:
        await hs.stop()
