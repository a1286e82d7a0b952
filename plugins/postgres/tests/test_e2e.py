"""End to end through the daemon: a QuickBooks (fake) invoice lands as a warehouse row; a row inserted into an
application table reaches a HubSpot (fake) contact; ``integrand replay`` re-sends retained events to a sink."""

from __future__ import annotations

from pathlib import Path

from integrand_hubspot.fake import FakeHubSpot
from integrand_quickbooks.fake import FakeQuickBooks
from pg_support import Schema, acli, cli

from integrand.testing import daemon_config, running_daemon, wait_for

TOKEN_KEY = "Jm6cgdGn1HBvYBMXFXoYzCAQzUrCBWFSrX8Ko-4f4nw="  # a test-only Fernet key

WAREHOUSE = """
CREATE TABLE invoices (
    id text PRIMARY KEY, doc_number text, customer_id text, amount numeric(12,2), due date,
    etl_loaded_at timestamptz NOT NULL DEFAULT now(), etl_source text, etl_version text, etl_event_id text,
    deleted_at timestamptz
)
"""


def qbo_source(fake: FakeQuickBooks) -> str:
    return f"""
[sources.qbo]
connector = "quickbooks"
realm_id = "{fake.realm_id}"
client_id = "{fake.client_id}"
client_secret = "{fake.client_secret}"
verifier_token = "{fake.verifier_token}"
token_key = "{TOKEN_KEY}"
refresh_token = "{fake.issue_refresh_token()}"
api_base = "{fake.url}"
token_url = "{fake.url}/oauth2/v1/tokens/bearer"
authorize_url = "{fake.url}/connect/oauth2"
timeout = "10s"

[sources.qbo.poll]
enabled = false
"""


async def test_a_quickbooks_invoice_lands_as_a_warehouse_row(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(WAREHOUSE)
    fake = FakeQuickBooks()
    await fake.start()
    try:
        cfg = daemon_config(
            tmp_path,
            qbo_source(fake)
            + f"""
[sinks.warehouse]
connector = "postgres"
dsn = "{schema.dsn}"
table = "invoices"
key = "id"
[sinks.warehouse.columns]
id = "data.object.Id"
doc_number = "data.object.DocNumber"
customer_id = "data.object.CustomerRef.value"
amount = {{ path = "data.object.TotalAmt", convert = "number" }}
due = "data.object.DueDate"

[[routes]]
from = "qbo"
to = ["warehouse"]
filter = {{ entity = ["Invoice"] }}
enrich = true
""",
        )
        async with running_daemon(cfg) as d:
            fake.webhook_url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/qbo"
            inv = fake.create(
                "Invoice",
                {"DocNumber": "1001", "CustomerRef": {"value": "58"}, "TotalAmt": 250.75, "DueDate": "2026-03-01"},
            )
            assert await fake.flush_webhooks() == 200

            async def landed() -> bool:
                return bool(await schema.fetchval("SELECT count(*) FROM invoices") == 1)

            await wait_for(landed, timeout=20)
            fake.advance(1)
            fake.update("Invoice", inv["Id"], {"TotalAmt": 300})
            assert await fake.flush_webhooks() == 200

            async def updated() -> bool:
                return str(await schema.fetchval("SELECT amount FROM invoices")) == "300.00"

            await wait_for(updated, timeout=20)
        row = dict((await schema.fetch("SELECT * FROM invoices"))[0])
        assert (row["id"], row["doc_number"], row["customer_id"], row["due"].isoformat()) == (
            inv["Id"],
            "1001",
            "58",
            "2026-03-01",
        )
        assert row["etl_source"] == "qbo" and row["etl_version"] and row["etl_event_id"]

        # The table is emptied by mistake: integrand's retained events put it back.
        await schema.execute("TRUNCATE invoices")
        done = await acli(cfg, "replay", "--since", "1h", "--to", "warehouse")  # enriches from the fake
        assert done.returncode == 0, done.stderr
        assert "sync qbo → warehouse (replay): read 2, written 2" in done.stdout
        assert str(await schema.fetchval("SELECT amount FROM invoices")) == "300.00"  # newest wins, in order
    finally:
        await fake.stop()


async def test_a_row_inserted_into_an_application_table_reaches_a_hubspot_contact(
    schema: Schema, tmp_path: Path
) -> None:
    await schema.execute("CREATE TABLE app_users (id serial PRIMARY KEY, email text NOT NULL, first text, last text)")
    hs = FakeHubSpot()
    await hs.start()
    try:
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.app]
connector = "postgres-cdc"
dsn = "{schema.dsn}"
tables = ["app_users"]

[sinks.hubspot]
connector = "hubspot"
access_token = "{hs.private_token}"
api_base = "{hs.url}"
version_property = "integrand_version"

[[routes]]
from = "app"
to = ["hubspot"]
filter = {{ type = ["app_users.created", "app_users.updated"] }}

[routes.map]
email = {{ path = "data.after.email", convert = ["strip", "lower"], required = true }}
firstname = "data.after.first"
lastname = "data.after.last"
app_user_id = "data.after.id"
""",
        )
        done = cli(cfg, "postgres", "install", "app")
        assert done.returncode == 0, done.stderr
        async with running_daemon(cfg):
            await schema.execute("INSERT INTO app_users (email, first, last) VALUES (' Ada@Example.com ', 'Ada', 'L')")
            await wait_for(lambda: hs.find("contacts", "email", "ada@example.com") is not None, timeout=20)
            await schema.execute("UPDATE app_users SET last = 'Lovelace'")

            def renamed() -> bool:
                found = hs.find("contacts", "email", "ada@example.com")
                return found is not None and found["properties"].get("lastname") == "Lovelace"

            await wait_for(renamed, timeout=20)
        found = hs.find("contacts", "email", "ada@example.com")
        assert found is not None
        assert found["properties"]["firstname"] == "Ada" and found["properties"]["app_user_id"] == "1"
        assert len(hs.objects["contacts"]) == 1
    finally:
        await hs.stop()
