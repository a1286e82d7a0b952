"""``make demo-crm-sync``: Salesforce → validation → mapping → HubSpot → the custom CRM → confirmation, as one saga.

Nothing leaves 127.0.0.1. Three fakes stand in for the real systems: the Salesforce fake (REST API,
OAuth, and its gRPC Pub/Sub API with Change Data Capture), the HubSpot fake, and a small custom CRM
with its own REST API. integrand runs as `integrand run` on a config generated under var/demo-crm/
from the mappings and schemas in examples/crm-sync/:

    Salesforce Contact created ── CDC (Pub/Sub API) ──► integrand: saga "contact-sync"
        fetch the Contact once, then, each step keyed and recorded in the store:
        1. validate → map → HubSpot contact (upsert by email)             → its id
        2. validate → map (with the HubSpot id) → CRM customer (http sink) → its id
        3. both ids → the Salesforce Contact (the confirmation)
        a step that fails for good undoes the completed ones in reverse (archive / delete)
    integrand's own Salesforce write carries Sforce-Call-Options client=integrand, so its CDC event
    (changeOrigin) is not synced again: the loop guard.
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
    """A custom CRM: ``POST /integrand`` takes integrand's signed envelope and upserts by ``external_key``
    (answering ``{"id", "created"}``), or deletes it for a ``*.deleted`` event; idempotent on the
    ``webhook-id``. With ``webhook_url`` set it announces upserts (Standard Webhooks), as a real CRM might."""

    def __init__(self, secret: str, latency: float = 0.0):
        self.secret = secret
        self.latency = latency
        self.customers: dict[str, dict[str, Any]] = {}
        self.answers: dict[str, dict[str, Any]] = {}  # webhook-id → the first answer (idempotency)
        self.webhook_url = ""
        self.requests = 0
        self.deletes = 0
        self.refuse: set[str] = set()  # external keys answered 422 (a rule of the CRM's own), for compensation
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
        if msg_id in self.answers:  # a redelivery (same webhook-id): the first answer, nothing changed
            return web.json_response(self.answers[msg_id])
        envelope = orjson.loads(body)
        data = envelope.get("data") or {}
        key = str(data.get("external_key", ""))
        if not key:
            return web.json_response({"error": "external_key is required"}, status=422)
        if key in self.refuse:
            return web.json_response({"error": f"customer {key} is on a legal hold"}, status=422)
        if str(envelope.get("type", "")).endswith(".deleted"):
            self.deletes += 1
            self.customers.pop(key, None)
            self.answers[msg_id] = {"deleted": key}
            return web.json_response(self.answers[msg_id])
        existing = self.customers.get(key)
        customer = {**(existing or {"id": f"crm-{next(self._ids)}"}), **data}
        self.customers[key] = customer
        self.answers[msg_id] = {"id": customer["id"], "created": existing is None}
        if self.webhook_url:
            task = asyncio.get_running_loop().create_task(self._announce(customer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.json_response(self.answers[msg_id])

    async def _announce(self, customer: dict[str, Any]) -> None:
        body = orjson.dumps({"type": "customer.upserted", "customer": customer})
        headers = standard_webhook_headers(body, f"msg_crm_{customer['id']}_{time.time_ns()}", self.secret)
        async with aiohttp.ClientSession() as s, s.post(self.webhook_url, data=body, headers=headers) as r:
            await r.read()


def config(
    sf: RunningFake,
    hs: FakeHubSpot,
    crm_url: str,
    *,
    hubspot_url: str | None = None,
    feed: str = "cdc",
    tuned: bool = True,
    admin: bool = False,
) -> str:
    """The demo's config. ``feed``: "cdc" (Change Data Capture) or "outbound" (Outbound Messages at
    /hooks/salesforce); ``tuned``: the demo's short retry backoff (False: shipped defaults); ``admin``: the
    admin port and socket (for ``integrand reconcile``); ``hubspot_url``: HubSpot through a proxy."""
    if feed == "cdc":
        assert sf.pubsub is not None
        sf_table = sf.toml(
            cdc=True, topic="/data/ContactChangeEvent", objects=["Contact"], fields={"Contact": CONTACT_FIELDS}
        )
    else:
        sf_table = sf.toml(objects=["Contact"], fields={"Contact": CONTACT_FIELDS})
    props = '["email", "firstname", "lastname", "phone", "salesforce_key"]'
    admin_table = 'listen = "127.0.0.1:0"' if admin else "enabled = false"
    retry = '[dispatcher.retry]\nbase = "200ms"\ncap = "5s"\n' if tuned else ""
    streaming = (
        '[sources.salesforce.streaming]\nbackoff_base = "200ms"\nbackoff_cap = "5s"\n'
        if tuned and feed == "cdc"
        else ""
    )
    return f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "."
log_level = "info"

[admin]
{admin_table}

{retry}

# One Salesforce org for the CDC source and the confirmation sink: one session, one API budget.
[connections.sf]
{sf_table}
[sources.salesforce]
connection = "sf"

[sources.salesforce.poll]
enabled = false                 # CDC is the feed; the nightly reconciliation catches what it missed
reconcile = "0 3 * * *"

{streaming}

[sinks.sf_confirm]
connection = "sf"
object = "Contact"
external_id_field = "Integration_Key__c"

[sinks.hubspot_contacts]
connector = "hubspot"
access_token = "{hs.private_token}"
api_base = "{hubspot_url or hs.url}"
properties = {props}
id_property = "email"

[sinks.crm_customers]
connector = "http"
url = "{crm_url}/integrand"
secret = "{CRM_SECRET}"

# The saga (examples/crm-sync/config.toml explains each key).
[[sagas]]
name = "contact-sync"
from = "salesforce"
filter = {{ type = ["contact.created", "contact.updated", "contact.undeleted"] }}
enrich = true

[[sagas.steps]]
name = "hubspot"
sink = "hubspot_contacts"
mapping = "{EXAMPLE / "sf-contact-to-hubspot-contact.toml"}"
validate = {{ schema = "{EXAMPLE / "schemas" / "hubspot-contact.json"}" }}
compensate = {{ sink = "hubspot_contacts", type = "contact.deleted", only_if = "step.new", map = {{ id = {{ path = "step.id", required = true }} }} }}

[[sagas.steps]]
name = "crm"
sink = "crm_customers"
mapping = "{EXAMPLE / "sf-contact-to-crm-customer.toml"}"
validate = {{ schema = "{EXAMPLE / "schemas" / "crm-customer.json"}" }}
compensate = {{ sink = "crm_customers", type = "customer.deleted", only_if = "step.created", map = {{ external_key = {{ path = "data.Integration_Key__c", required = true }} }} }}

[[sagas.steps]]
name = "confirm"
sink = "sf_confirm"
map = {{ Integration_Key__c = {{ path = "data.Integration_Key__c", required = true }}, HubSpot_Id__c = {{ path = "steps.hubspot.id", required = true }}, CRM_Id__c = {{ path = "steps.crm.id", required = true }} }}
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


async def saga_story(cfg: Path) -> str:
    """``integrand saga show`` for the demo's one saga (its id is read from the store's saga records)."""
    import sqlite3

    db = cfg.parent / "integrand.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        keys = [r[0] for r in conn.execute("SELECT key FROM state WHERE scope = 'saga' ORDER BY updated_at")]
    finally:
        conn.close()
    if not keys:
        return "(no saga recorded)"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "integrand.cli", "saga", "show", keys[0], "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out.decode()


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
                    print("the confirmation did not arrive within 20 s; integrand said:", file=sys.stderr)
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
            print("2. Salesforce published a Change Data Capture event; integrand fetched the Contact and ran the")
            print("   saga contact-sync, each step validated, mapped, keyed and recorded in the store:")
            print(
                f"     step hubspot: HubSpot contact {contact.get('id')} (email {contact.get('properties', {}).get('email')}) after {seen.get('hubspot', done) * 1000:.0f} ms"
            )
            cust = crm.customers["C-1815"]
            print(
                f"     step crm:     CRM customer {cust['id']} with hubspot_id {cust.get('hubspot_id')} after {seen.get('crm', done) * 1000:.0f} ms"
            )
            print(
                f"     step confirm: CRM_Id__c = {final.get('CRM_Id__c')}, HubSpot_Id__c = {final.get('HubSpot_Id__c')} on the Salesforce Contact after {done * 1000:.0f} ms"
            )
            await asyncio.sleep(1.0)  # let the loop guard prove itself: nothing more should happen
            print(
                f"3. loop guard: integrand's own write to Salesforce was not synced again "
                f"(CRM upserts: {crm.requests}, HubSpot contacts: {len(hs.objects.get('contacts', {}))})"
            )
            print("4. integrand saga show:")
            print("   " + (await saga_story(cfg)).strip().replace("\n", "\n   "))
            return 0
        finally:
            await stop_integrand(proc)
            await hs.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
