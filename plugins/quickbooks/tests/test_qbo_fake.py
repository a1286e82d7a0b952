"""The QuickBooks fake behaves like the documented API (so the connector tests mean something)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from integrand_quickbooks.fake import FakeQuickBooks
from qbo_support import qbo_env


async def _token(session: aiohttp.ClientSession, fake: FakeQuickBooks, refresh: str) -> tuple[int, dict[str, Any]]:
    auth = "Basic " + base64.b64encode(f"{fake.client_id}:{fake.client_secret}".encode()).decode()
    async with session.post(
        fake.url + "/oauth2/v1/tokens/bearer",
        data={"grant_type": "refresh_token", "refresh_token": refresh},
        headers={"Authorization": auth},
    ) as r:
        return r.status, await r.json()


async def _get(
    session: aiohttp.ClientSession, fake: FakeQuickBooks, token: str, path: str, **params: str
) -> tuple[int, dict[str, Any]]:
    params.setdefault("minorversion", "75")
    async with session.get(
        f"{fake.url}/v3/company/{fake.realm_id}/{path}", params=params, headers={"Authorization": f"Bearer {token}"}
    ) as r:
        return r.status, await r.json()


async def _post(
    session: aiohttp.ClientSession, fake: FakeQuickBooks, token: str, path: str, body: Any, **params: str
) -> tuple[int, dict[str, Any]]:
    params.setdefault("minorversion", "75")
    async with session.post(
        f"{fake.url}/v3/company/{fake.realm_id}/{path}",
        params=params,
        data=orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    ) as r:
        return r.status, await r.json()


async def test_refresh_rotates_and_spends_the_old_token(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, aiohttp.ClientSession() as s:
        first = env.fake.issue_refresh_token()
        status, body = await _token(s, env.fake, first)
        assert status == 200
        assert body["expires_in"] == 3600
        assert body["x_refresh_token_expires_in"] == 8726400
        assert body["refresh_token"] != first
        status, again = await _token(s, env.fake, first)
        assert status == 400
        assert again == {"error": "invalid_grant"}
        status, _ = await _token(s, env.fake, body["refresh_token"])
        assert status == 200


async def test_access_token_expires_after_an_hour(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, aiohttp.ClientSession() as s:
        _, tok = await _token(s, env.fake, env.fake.issue_refresh_token())
        status, _ = await _get(s, env.fake, tok["access_token"], "query", query="select * from Customer")
        assert status == 200
        env.fake.advance(3601)
        status, body = await _get(s, env.fake, tok["access_token"], "query", query="select * from Customer")
        assert status == 401
        assert body["Fault"]["type"] == "AuthenticationFault"


async def test_query_pages_and_caps(tmp_path: Path) -> None:
    async with qbo_env(tmp_path, max_page=5, per_second=1000) as env, aiohttp.ClientSession() as s:
        for i in range(12):
            env.fake.create("Customer", {"DisplayName": f"C{i}"})
        _, tok = await _token(s, env.fake, env.fake.issue_refresh_token())
        q = "select * from Customer ORDERBY MetaData.LastUpdatedTime STARTPOSITION {} MAXRESULTS 1000"
        seen: list[str] = []
        start = 1
        while True:
            _, body = await _get(s, env.fake, tok["access_token"], "query", query=q.format(start))
            rows = body["QueryResponse"].get("Customer", [])
            assert len(rows) <= 5
            seen += [r["DisplayName"] for r in rows]
            if len(rows) < 5:
                break
            start += len(rows)
        assert seen == [f"C{i}" for i in range(12)]
        status, body = await _get(
            s, env.fake, tok["access_token"], "query", query="select * from Customer MAXRESULTS 1001"
        )
        assert status == 400
        assert "Fault" in body


async def test_cdc_window_cap_and_deleted_stubs(tmp_path: Path) -> None:
    async with qbo_env(tmp_path, max_page=3) as env, aiohttp.ClientSession() as s:
        _, tok = await _token(s, env.fake, env.fake.issue_refresh_token())
        t0 = datetime.now(UTC) - timedelta(minutes=1)
        for i in range(2):
            env.fake.create("Customer", {"DisplayName": f"C{i}"})
        inv = env.fake.create("Invoice", {"TotalAmt": 10})
        env.fake.create("Invoice", {"TotalAmt": 20})
        env.fake.delete("Invoice", inv["Id"])
        status, body = await _get(
            s, env.fake, tok["access_token"], "cdc", entities="Customer,Invoice", changedSince=t0.isoformat()
        )
        assert status == 200
        blocks = body["CDCResponse"][0]["QueryResponse"]
        customers = blocks[0]["Customer"]
        invoices = blocks[1]["Invoice"]
        assert len(customers) + len(invoices) == 3  # capped
        env.fake.max_page = 1000
        _, body = await _get(s, env.fake, tok["access_token"], "cdc", entities="Invoice", changedSince=t0.isoformat())
        invoices = body["CDCResponse"][0]["QueryResponse"][0]["Invoice"]
        stub = [o for o in invoices if o.get("status") == "Deleted"]
        assert stub
        assert stub[0]["Id"] == inv["Id"]
        assert "TotalAmt" not in stub[0]
        old = (datetime.now(UTC) - timedelta(days=31)).isoformat()
        status, body = await _get(s, env.fake, tok["access_token"], "cdc", entities="Invoice", changedSince=old)
        assert status == 400
        assert body["Fault"]["Error"][0]["code"] == "2010"


async def test_writes_synctoken_requestid_minorversion(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, aiohttp.ClientSession() as s:
        _, tok = await _token(s, env.fake, env.fake.issue_refresh_token())
        at = tok["access_token"]
        status, body = await _post(s, env.fake, at, "customer", {"DisplayName": "Acme"}, requestid="r1")
        assert status == 200
        cid = body["Customer"]["Id"]
        status, again = await _post(s, env.fake, at, "customer", {"DisplayName": "Acme"}, requestid="r1")
        assert status == 200
        assert again["Customer"]["Id"] == cid
        assert len(env.fake.all("Customer")) == 1
        status, dup = await _post(s, env.fake, at, "customer", {"DisplayName": "Acme"}, requestid="r2")
        assert status == 400
        assert dup["Fault"]["Error"][0]["code"] == "6240"
        upd = {"Id": cid, "SyncToken": "0", "sparse": True, "CompanyName": "Acme Inc"}
        status, body = await _post(s, env.fake, at, "customer", upd)
        assert status == 200
        assert body["Customer"]["SyncToken"] == "1"
        assert body["Customer"]["DisplayName"] == "Acme"
        status, stale = await _post(s, env.fake, at, "customer", upd)
        assert status == 400
        assert stale["Fault"]["Error"][0]["code"] == "5010"
        status, old = await _post(s, env.fake, at, "customer", {"DisplayName": "B"}, minorversion="65")
        assert status == 400
        assert "minorversion" in old["Fault"]["Error"][0]["Detail"]


async def test_throttles_at_ten_per_second_with_a_fault_body(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, aiohttp.ClientSession() as s:
        _, tok = await _token(s, env.fake, env.fake.issue_refresh_token())
        statuses = []
        for _ in range(12):
            status, body = await _get(s, env.fake, tok["access_token"], "query", query="select * from Customer")
            statuses.append(status)
        assert statuses.count(429) >= 1
        assert env.fake.throttled >= 1
        assert body["Fault"]["Error"][0]["code"] == "3001"


async def test_fault_inside_http_200_can_be_injected(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, aiohttp.ClientSession() as s:
        _, tok = await _token(s, env.fake, env.fake.issue_refresh_token())
        env.fake.inject(200, {"Fault": {"Error": [{"Message": "boom", "code": "10000"}], "type": "SystemFault"}})
        status, body = await _get(s, env.fake, tok["access_token"], "query", query="select * from Customer")
        assert status == 200
        assert body["Fault"]["type"] == "SystemFault"


async def test_webhook_bodies_are_signed_like_intuit(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        env.fake.create("Customer", {"DisplayName": "A"})
        for fmt in ("legacy", "cloudevents"):
            body = env.fake.webhook_body(env.fake.pending, fmt)
            headers = env.fake.webhook_headers(body, fmt)
            want = base64.b64encode(hmac.new(b"fake-verifier-token", body, hashlib.sha256).digest()).decode()
            assert headers["intuit-signature"] == want
            parsed = orjson.loads(body)
            if fmt == "legacy":
                ent = parsed["eventNotifications"][0]["dataChangeEvent"]["entities"][0]
                assert ent["name"] == "Customer"
                assert ent["operation"] == "Create"
                assert ent["lastUpdated"].endswith("-0700")
            else:
                assert parsed[0]["type"] == "qbo.customer.created.v1"
                assert parsed[0]["intuitaccountid"] == env.fake.realm_id
