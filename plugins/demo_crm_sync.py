"""``make demo-crm-sync``: Salesforce → validation → mapping → HubSpot and a custom CRM → confirmation back in Salesforce.

Nothing leaves 127.0.0.1. Three fakes stand in for the real systems: the Salesforce fake (REST API,
OAuth, and its gRPC Pub/Sub API with Change Data Capture), the HubSpot fake, and a small custom CRM
with its own REST API that announces its upserts by Standard Webhooks. integrand runs as
`integrand run` on a config generated under var/demo-crm/ from the mappings and schemas in
examples/crm-sync/:

    Salesforce Contact created ── CDC (Pub/Sub API) ──► integrand
        ├─ enrich (fetch the Contact) → validate → map → HubSpot contact (upsert by email)
        ├─ enrich → validate → map → CRM customer (http sink, signed, idempotent)
        ├─ CRM webhook "customer.upserted" → Salesforce Contact.CRM_Id__c      (confirmation)
        └─ HubSpot poll sees the contact → Salesforce Contact.HubSpot_Id__c    (confirmation)
    integrand's own Salesforce writes carry Sforce-Call-Options client=integrand, so their CDC
    events (changeOrigin) are not synced again: the loop guard.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from integrand_hubspot.fake import FakeHubSpot
from integrand_salesforce.testing import RunningFake, fake_salesforce

from integrand.signing import standard_sign
from integrand.testing import fake_api_server, standard_webhook_headers

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "crm-sync"
DEMO_DIR = ROOT / "var" / "demo-crm"
CRM_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # noqa: S105 - the demo's shared webhook secret
CONTACT_FIELDS = ["FirstName", "LastName", "Email", "Phone", "Integration_Key__c", "CRM_Id__c", "HubSpot_Id__c"]


class FakeCRM:
    """A custom CRM: ``POST /integrand`` takes integrand's signed envelope and upserts by ``external_key``,
    then announces the upsert to ``webhook_url`` (Standard Webhooks), as a real in-house CRM might."""

    def __init__(self, secret: str, latency: float = 0.0):
        self.secret = secret
        self.latency = latency
        self.customers: dict[str, dict[str, Any]] = {}
        self.seen: set[str] = set()
        self.webhook_url = ""
        self.requests = 0
        self._ids = itertools.count(1001)
        self._tasks: set[asyncio.Task[None]] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/integrand", self._upsert)
        app.router.add_get("/customers/{key}", self._get)
        return app

    async def _get(self, request: web.Request) -> web.Response:
        c = self.customers.get(request.match_info["key"])
        return web.json_response(c) if c else web.json_response({"error": "not found"}, status=404)

    async def _upsert(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        msg_id, ts = request.headers.get("webhook-id", ""), request.headers.get("webhook-timestamp", "0")
        want = standard_sign(self.secret, msg_id, int(ts), body)
        if want.split(" ")[0] not in request.headers.get("webhook-signature", "").split(" "):
            return web.json_response({"error": "bad signature"}, status=401)
        if self.latency:
            await asyncio.sleep(self.latency)
        data = orjson.loads(body).get("data") or {}
        key = str(data.get("external_key", ""))
        if not key:
            return web.json_response({"error": "external_key is required"}, status=422)
        existing = self.customers.get(key)
        customer = {**(existing or {"id": f"crm-{next(self._ids)}"}), **data}
        self.customers[key] = customer
        if msg_id not in self.seen:  # a redelivery (same webhook-id) is answered, not announced again
            self.seen.add(msg_id)
            task = asyncio.get_running_loop().create_task(self._announce(customer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.json_response({"id": customer["id"]})

    async def _announce(self, customer: dict[str, Any]) -> None:
        if not self.webhook_url:
            return
        body = orjson.dumps({"type": "customer.upserted", "customer": customer})
        headers = standard_webhook_headers(body, f"msg_crm_{customer['id']}_{time.time_ns()}", self.secret)
        async with aiohttp.ClientSession() as s, s.post(self.webhook_url, data=body, headers=headers) as r:
            await r.read()


def config(sf: RunningFake, hs: FakeHubSpot, crm_url: str) -> str:
    assert sf.pubsub is not None
    sf_table = sf.toml(
        cdc=True,
        topic="/data/ContactChangeEvent",
        objects=["Contact"],
        fields={"Contact": CONTACT_FIELDS},
    )
    props = '["email", "firstname", "lastname", "phone", "salesforce_key"]'
    return f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "."
log_level = "info"

[admin]
enabled = false

[dispatcher.retry]
base = "200ms"
cap = "5s"

# One Salesforce org for the CDC source and the confirmation sink: one session, one API budget.
[connections.sf]
{sf_table}
[sources.salesforce]
connection = "sf"

[sources.salesforce.poll]
enabled = false                 # CDC is the feed; the nightly reconciliation catches what it missed
reconcile = "0 3 * * *"

[sources.salesforce.stream]
backoff_base = "200ms"
backoff_cap = "5s"

[sinks.sf_confirm]
connection = "sf"
object = "Contact"
external_id_field = "Integration_Key__c"

[connections.hubspot]
connector = "hubspot"
access_token = "{hs.private_token}"
api_base = "{hs.url}"
properties = {props}

[sinks.hubspot_contacts]
connection = "hubspot"
id_property = "email"

[sources.hubspot]
connection = "hubspot"
initial_lookback = "1m"

[sources.hubspot.poll]
min_interval = "250ms"
max_interval = "2s"
target_latency = "500ms"

[sinks.crm_customers]
connector = "http"
url = "{crm_url}/integrand"
secret = "{CRM_SECRET}"

[sources.crm]
connector = "webhook"
signature = "standard-webhooks"
secret = "{CRM_SECRET}"
type_field = "type"
entity_id_field = "customer.external_key"

# Salesforce → HubSpot: fetch the Contact, map it, check the contract. (No loop_guard here: HubSpot's
# echo of this write is wanted, as the confirmation; the loop ends at Salesforce by changeOrigin.)
[[routes]]
from = "salesforce"
to = ["hubspot_contacts"]
filter = {{ type = ["contact.created", "contact.updated", "contact.undeleted"] }}
enrich = true
mapping = "{EXAMPLE / "sf-contact-to-hubspot-contact.toml"}"
validate = {{ schema = "{EXAMPLE / "schemas" / "hubspot-contact.json"}" }}

# Salesforce → the custom CRM.
[[routes]]
from = "salesforce"
to = ["crm_customers"]
filter = {{ type = ["contact.created", "contact.updated", "contact.undeleted"] }}
enrich = true
mapping = "{EXAMPLE / "sf-contact-to-crm-customer.toml"}"
validate = {{ schema = "{EXAMPLE / "schemas" / "crm-customer.json"}" }}

# Confirmations: both ids written back to the Salesforce Contact.
[[routes]]
from = "crm"
to = ["sf_confirm"]
mapping = "{EXAMPLE / "crm-customer-to-sf-confirmation.toml"}"

[[routes]]
from = "hubspot"
to = ["sf_confirm"]
mapping = "{EXAMPLE / "hubspot-contact-to-sf-confirmation.toml"}"
"""


async def start_integrand(cfg: Path) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "integrand.cli", "run", "--config", str(cfg), stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    said: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        said.append(line)
        if not line:
            raise RuntimeError("integrand exited before it was ready:\n" + "".join(said))
        m = re.search(r"ready: webhooks on [\d.]+:(\d+)", line)
        if m:
            asyncio.get_running_loop().create_task(_drain(proc))
            return proc, int(m.group(1))


LOG: list[str] = []


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        LOG.append(line.decode())


async def stop_integrand(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


def confirmed(sf: RunningFake, rid: str) -> bool:
    rec = sf.fake.get("Contact", rid) or {}
    return bool(rec.get("CRM_Id__c") and rec.get("HubSpot_Id__c"))


async def main(workdir: Path = DEMO_DIR) -> int:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)  # noqa: ASYNC240 - the demo's setup, before anything runs
    hs = FakeHubSpot()
    await hs.start()
    crm = FakeCRM(CRM_SECRET)
    async with fake_salesforce(pubsub=True) as sf, fake_api_server(crm.app()) as crm_url:
        assert sf.pubsub is not None
        sf.pubsub.enable("Contact", CONTACT_FIELDS)
        cfg = workdir / "config.toml"
        cfg.write_text(config(sf, hs, crm_url))
        print(
            f"Salesforce fake on {sf.fake.my_domain_url} (Pub/Sub {sf.pubsub.target}), HubSpot fake on {hs.url}, CRM on {crm_url}"
        )
        proc, port = await start_integrand(cfg)
        try:
            crm.webhook_url = f"http://127.0.0.1:{port}/hooks/crm"
            print(f"integrand is running (webhooks on 127.0.0.1:{port}, config {cfg})")
            deadline = time.monotonic() + 20
            while sf.pubsub.subscribes < 1:
                if time.monotonic() > deadline:
                    print("integrand did not subscribe to Change Data Capture within 20 s", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            rec = sf.fake.create(
                "Contact", FirstName="Ada", LastName="Lovelace", Email="Ada@Example.com", Phone="555-0101",
                Integration_Key__c="C-1815",
            )  # fmt: skip
            print(f"1. created Contact {rec['Id']} 'Ada Lovelace' (Integration_Key__c C-1815) in the Salesforce fake")
            seen: dict[str, float] = {}
            while not confirmed(sf, rec["Id"]):
                now = time.monotonic()
                if hs.find("contacts", "email", "ada@example.com") and "hubspot" not in seen:
                    seen["hubspot"] = now - t0
                if "C-1815" in crm.customers and "crm" not in seen:
                    seen["crm"] = now - t0
                if now - t0 > 20:
                    print("the confirmations did not arrive within 20 s; integrand said:", file=sys.stderr)
                    print("".join(LOG[-40:]), file=sys.stderr)
                    print(
                        f"CRM requests {crm.requests}, customers {crm.customers}; Contact now {sf.fake.get('Contact', rec['Id'])}",
                        file=sys.stderr,
                    )
                    return 1
                await asyncio.sleep(0.01)
            done = time.monotonic() - t0
            contact = hs.find("contacts", "email", "ada@example.com") or {}
            final = sf.fake.get("Contact", rec["Id"]) or {}
            print("2. Salesforce published a Change Data Capture event; integrand fetched the Contact, validated")
            print("   and mapped it, and upserted it into both systems:")
            print(
                f"     HubSpot contact {contact.get('id')} (email {contact.get('properties', {}).get('email')}) after {seen.get('hubspot', done) * 1000:.0f} ms"
            )
            print(f"     CRM customer {crm.customers['C-1815']['id']} after {seen.get('crm', done) * 1000:.0f} ms")
            print("3. the confirmations came back and were written to the Salesforce Contact:")
            print(
                f"     CRM_Id__c = {final.get('CRM_Id__c')}, HubSpot_Id__c = {final.get('HubSpot_Id__c')} after {done * 1000:.0f} ms"
            )
            await asyncio.sleep(1.0)  # let the loop guard prove itself: nothing more should happen
            print(
                f"4. loop guard: integrand's own writes to Salesforce were not synced again "
                f"(CRM upserts: {crm.requests}, HubSpot contacts: {len(hs.objects.get('contacts', {}))})"
            )
            return 0
        finally:
            await stop_integrand(proc)
            await hs.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
