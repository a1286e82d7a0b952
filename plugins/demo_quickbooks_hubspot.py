"""``make demo-quickbooks-hubspot``: both fakes and a real integrand; a customer made in QuickBooks appears in HubSpot.

Nothing leaves 127.0.0.1: the QuickBooks and HubSpot fakes (integrand_quickbooks.fake,
integrand_hubspot.fake) stand in for the real APIs and behave like them (signed webhooks,
OAuth token rotation, rate limits). integrand runs as `integrand run` on a generated config
under var/demo/: the QuickBooks source takes the webhook, the route enriches it (fetches the
customer), maps it to HubSpot contact properties and the HubSpot sink upserts it by email.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from integrand_hubspot.fake import FakeHubSpot
from integrand_quickbooks.fake import FakeQuickBooks

# A throwaway Fernet key: the demo's token store is deleted with var/demo.
DEMO_TOKEN_KEY = "Jm6cgdGn1HBvYBMXFXoYzCAQzUrCBWFSrX8Ko-4f4nw="  # noqa: S105 - a demo key, not a secret
DEMO_DIR = Path(__file__).resolve().parent.parent / "var" / "demo"


def config(qbo: FakeQuickBooks, hs: FakeHubSpot, refresh_token: str) -> str:
    return f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "."
log_level = "info"

[admin]
enabled = false

[sources.quickbooks]
connector = "quickbooks"
realm_id = "{qbo.realm_id}"
client_id = "{qbo.client_id}"
client_secret = "{qbo.client_secret}"
verifier_token = "{qbo.verifier_token}"
token_key = "{DEMO_TOKEN_KEY}"
refresh_token = "{refresh_token}"
api_base = "{qbo.url}"
token_url = "{qbo.url}/oauth2/v1/tokens/bearer"
authorize_url = "{qbo.url}/connect/oauth2"
entities = ["Customer"]

[sinks.hubspot_contacts]
connector = "hubspot"
access_token = "{hs.private_token}"
api_base = "{hs.url}"
id_property = "email"

[[routes]]
from = "quickbooks"
to = ["hubspot_contacts"]
filter = {{ entity = ["Customer"] }}
enrich = true

[routes.map]
email = {{ path = "data.object.PrimaryEmailAddr.Address", convert = ["strip", "lower"], required = true }}
firstname = "data.object.GivenName"
lastname = "data.object.FamilyName"
company = "data.object.CompanyName"
phone = "data.object.PrimaryPhone.FreeFormNumber"
"""


async def main() -> int:
    here = DEMO_DIR
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    qbo, hs = FakeQuickBooks(), FakeHubSpot()
    await qbo.start()
    await hs.start()
    print(f"QuickBooks fake on {qbo.url}, HubSpot fake on {hs.url}")
    cfg = here / "config.toml"
    cfg.write_text(config(qbo, hs, qbo.issue_refresh_token()))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "integrand.cli", "run", "--config", str(cfg), stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        port = None
        said: list[str] = []
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            said.append(line)
            if not line:
                print("integrand exited before it was ready:\n" + "".join(said), file=sys.stderr)
                return 1
            m = re.search(r"ready: webhooks on [\d.]+:(\d+)", line)
            port = int(m.group(1)) if m else None
        print(f"integrand is running (webhooks on 127.0.0.1:{port}, config {cfg})")
        qbo.webhook_url = f"http://127.0.0.1:{port}/hooks/quickbooks"
        customer = qbo.create(
            "Customer",
            {
                "DisplayName": "Ada Lovelace",
                "GivenName": "Ada",
                "FamilyName": "Lovelace",
                "CompanyName": "Analytical Engines Ltd",
                "PrimaryEmailAddr": {"Address": "Ada@Example.com"},
                "PrimaryPhone": {"FreeFormNumber": "(555) 010-1815"},
            },
        )
        print(f"1. created Customer {customer['Id']} 'Ada Lovelace' in the QuickBooks fake")
        status = await qbo.flush_webhooks()
        print(f"2. QuickBooks sent its signed webhook (legacy format); integrand answered {status}")
        deadline = time.monotonic() + 20
        while (contact := hs.find("contacts", "email", "ada@example.com")) is None:
            if time.monotonic() > deadline:
                print("the contact did not appear in the HubSpot fake within 20 s", file=sys.stderr)
                return 1
            await asyncio.sleep(0.05)
        props = contact["properties"]
        print("3. integrand fetched the customer from QuickBooks, mapped it and upserted it into HubSpot:")
        for key in ("email", "firstname", "lastname", "company", "phone"):
            print(f"     {key:<10} {props.get(key)}")
        print(
            f"   ({len(qbo.requests)} QuickBooks API calls, {len(hs.requests)} HubSpot API calls, no 429s: "
            f"{qbo.throttled == 0 and not hs.throttled})"
        )
        return 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        await qbo.stop()
        await hs.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
