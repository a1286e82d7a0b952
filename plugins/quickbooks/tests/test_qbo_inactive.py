"""Deactivated customers: QuickBooks leaves them out of queries unless Active is filtered; reconciliation must not."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from qbo_support import connected, qbo_env

from integrand.connector import PermanentError, WebhookRequest, utcnow_iso
from integrand.poller import reconcile_once
from integrand.routes import Router, RouteSettings


async def test_the_fake_hides_inactive_customers_from_queries_as_quickbooks_does(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env, entities=["Customer", "Invoice"]) as qbo:
        a = env.fake.create("Customer", {"DisplayName": "Active one"})
        b = env.fake.create("Customer", {"DisplayName": "Gone quiet"})
        env.fake.update("Customer", b["Id"], {"Active": False})
        assert [c["Id"] for c in await qbo.query("select * from Customer")] == [a["Id"]]
        both = await qbo.query("select * from Customer where Active IN (true, false)")
        assert sorted(c["Id"] for c in both) == sorted([a["Id"], b["Id"]])
        assert [c["Id"] for c in await qbo.query("select * from Customer where Active = false")] == [b["Id"]]
        with pytest.raises(PermanentError, match="4001"):
            await qbo.query("select * from Invoice where Active IN (true, false)")


async def test_reconciliation_finds_a_deactivation_whose_webhook_was_dropped(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env, entities=["Customer", "Invoice"]) as qbo:
        cust = env.fake.create("Customer", {"DisplayName": "Soon inactive"})
        env.fake.create("Invoice", {"CustomerRef": {"value": cust["Id"]}, "TotalAmt": 10})
        router = Router([RouteSettings.model_validate({"from": "qbo", "to": ["out"]})])
        first = await reconcile_once("qbo", qbo, env.store, router, window=None)
        assert first is not None and first.missed == 2
        env.fake.pending.clear()
        env.fake.advance(2)  # a later second: LastUpdatedTime has one-second resolution
        env.fake.update("Customer", cust["Id"], {"Active": False})  # its webhook never arrives
        report = await reconcile_once("qbo", qbo, env.store, router, window=None)
        assert report is not None and report.stale == 1, report
        page = await qbo.reconcile(None, None)
        [found] = [e for e in page.events if e.entity_id == cust["Id"]]
        assert found.data["object"]["Active"] is False


async def test_the_sink_updates_an_inactive_match_instead_of_creating_a_twin(tmp_path: Path) -> None:
    from integrand.connector import Event

    async with (
        qbo_env(tmp_path) as env,
        connected(env, entity="Customer", match_field="PrimaryEmailAddr.Address") as qbo,
    ):
        old = env.fake.create("Customer", {"DisplayName": "Lee", "PrimaryEmailAddr": {"Address": "lee@example.com"}})
        env.fake.update("Customer", old["Id"], {"Active": False})
        await qbo.deliver(
            Event(id="e1", source="crm", type="contact.updated", data={"DisplayName": "Lee", "Active": True,
                  "PrimaryEmailAddr": {"Address": "lee@example.com"}})
        )  # fmt: skip
        customers = env.fake.realms[env.fake.realm_id].objects["Customer"]
        assert len(customers) == 1 and customers[old["Id"]]["Active"] is True


async def test_changes_for_other_companies_are_counted_not_logged_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with qbo_env(tmp_path) as env, connected(env) as qbo:
        body = orjson.dumps(
            {"eventNotifications": [{"realmId": "999", "dataChangeEvent": {"entities": [
                {"name": "Customer", "id": str(i), "operation": "Update", "lastUpdated": "2025-09-10T21:31:25Z"}
                for i in range(50)]}}]}
        )  # fmt: skip
        req = WebhookRequest(
            source="qbo", method="POST", url="http://x/hooks/qbo", headers={}, body=body,
            received_at=utcnow_iso(), content_type="application/json",
        )  # fmt: skip
        caplog.set_level(logging.INFO)
        assert qbo.parse(req) == []
        assert qbo.other_realm_changes == 50
        assert "ignoring a change" not in caplog.text
