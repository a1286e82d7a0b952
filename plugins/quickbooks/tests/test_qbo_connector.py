"""The quickbooks connector against the fake: webhooks, tokens, enrichment, polling, sink, limits."""

from __future__ import annotations

import base64
import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from integrand_quickbooks import QuickBooksConfig
from integrand_quickbooks import tokens as tokens_mod
from integrand_quickbooks._time import utc_version
from integrand_quickbooks.fake import fault
from pydantic import ValidationError
from qbo_support import OTHER_KEY, TOKEN_KEY, connected, qbo_env, wait_for

from integrand.connector import (
    AuthError,
    Event,
    PayloadError,
    PermanentError,
    RateLimiter,
    RetryableError,
    SignatureError,
    WebhookRequest,
)
from integrand.events import utcnow_iso


def _request(body: bytes, headers: dict[str, str], ct: str = "application/json") -> WebhookRequest:
    return WebhookRequest(
        source="qbo",
        method="POST",
        url="http://127.0.0.1/hooks/qbo",
        headers=headers,
        body=body,
        received_at=utcnow_iso(),
        content_type=ct,
    )


# --- webhooks -------------------------------------------------------------------------------------


async def test_both_webhook_formats_become_one_event_per_change(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env) as qbo:
        c = env.fake.create("Customer", {"DisplayName": "Acme"})
        env.fake.update("Customer", c["Id"], {"CompanyName": "Acme Inc"})
        inv = env.fake.create("Invoice", {"TotalAmt": 5})
        env.fake.delete("Invoice", inv["Id"])
        changes = list(env.fake.pending)
        results = {}
        for fmt in ("legacy", "cloudevents"):
            body = env.fake.webhook_body(changes, fmt)
            headers = env.fake.webhook_headers(body, fmt)
            req = _request(body, headers, headers["Content-Type"])
            qbo.verify(req, 0.0)
            events = qbo.parse(req)
            results[fmt] = [(e.type, e.entity, e.entity_id, e.data["operation"], e.data["realm"]) for e in events]
            assert all(e.version and e.version.endswith("Z") for e in events)
        want = [
            ("customer.created", "Customer", c["Id"], "Create", env.fake.realm_id),
            ("customer.updated", "Customer", c["Id"], "Update", env.fake.realm_id),
            ("invoice.created", "Invoice", inv["Id"], "Create", env.fake.realm_id),
            ("invoice.deleted", "Invoice", inv["Id"], "Delete", env.fake.realm_id),
        ]
        assert results["legacy"] == want
        assert results["cloudevents"] == want


async def test_legacy_sample_from_the_docs_parses(tmp_path: Path) -> None:
    async with qbo_env(tmp_path, realm_id="1185883450") as env, connected(env) as qbo:
        body = (
            b'{"eventNotifications":[{"realmId":"1185883450","dataChangeEvent":{"entities":'
            b'[{"name":"Customer","id":"1","operation":"Create","lastUpdated":"2015-10-05T14:42:19-0700"}]}}]}'
        )
        (ev,) = qbo.parse(_request(body, {}))
        assert ev.version == "2015-10-05T21:42:19Z"
        assert ev.entity_id == "1"
        assert ev.data["lastUpdated"].endswith("-0700")
        # The same notification delivered again (Intuit retries) has the same id, so the store dedupes it.
        (again,) = qbo.parse(_request(body, {}))
        assert again.id == ev.id


async def test_other_realms_are_ignored_and_bad_bodies_refused(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env) as qbo:
        body = orjson.dumps(
            [
                {"specversion": "1.0", "id": "a", "type": "qbo.customer.updated.v1", "time": "2025-09-10T21:31:25.179851517Z",
                 "intuitentityid": "7", "intuitaccountid": "999", "data": {}},
                {"specversion": "1.0", "id": "b", "type": "qbo.customer.updated.v1", "time": "2025-09-10T21:31:25.179851517Z",
                 "intuitentityid": "8", "intuitaccountid": env.fake.realm_id, "data": {}},
            ]
        )  # fmt: skip
        events = qbo.parse(_request(body, {}))
        assert [e.entity_id for e in events] == ["8"]
        assert events[0].id == "ce_b"
        assert events[0].version == "2025-09-10T21:31:25Z"  # whole seconds, like LastUpdatedTime
        for bad in (b"{}", b"[1]", b'[{"type":"qbo.customer.exploded.v1"}]', b"not json"):
            with pytest.raises(PayloadError):
                qbo.parse(_request(bad, {}))


async def test_signature_is_checked_before_anything(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env) as qbo:
        body = b'{"eventNotifications":[]}'
        good = env.fake.webhook_headers(body)
        qbo.verify(_request(body, good), 0.0)
        with pytest.raises(SignatureError, match="missing"):
            qbo.verify(_request(body, {}), 0.0)
        with pytest.raises(SignatureError, match="does not match"):
            qbo.verify(_request(body + b" ", good), 0.0)
        assert qbo.sign(body, 0.0, "x") is not None
        assert qbo.sign(body, 0.0, "x")["intuit-signature"] == good["intuit-signature"]  # type: ignore[index]


# --- OAuth tokens ---------------------------------------------------------------------------------


async def test_rotated_refresh_token_survives_a_restart_encrypted(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        first = env.fake.issue_refresh_token()
        async with connected(env, refresh_token=first) as qbo:
            await qbo.query("select * from Customer")
            assert env.fake.refreshes == 1
            stored = await qbo.tokens.load()
            assert stored is not None
            assert stored.refresh_token != first
            env.fake.advance(3600)  # the access token expires: the next call refreshes (and rotates) again
            await qbo.query("select * from Customer")
            assert env.fake.refreshes == 2
            newest = (await qbo.tokens.load()).refresh_token  # type: ignore[union-attr]
        # "Restart": a new connector instance over the same store, configured with the long-spent bootstrap
        # token, and nothing in memory (a new process has no shared token manager yet).
        tokens_mod._MANAGERS.clear()
        async with connected(env, refresh_token=first) as again:
            env.fake.advance(3600)
            await again.query("select * from Customer")
            assert env.fake.refreshes == 3  # refreshed with the stored newest token; the spent one would be refused
        raw = (tmp_path / "integrand.db").read_bytes() + b"".join(
            p.read_bytes() for p in tmp_path.glob("integrand.db-wal")
        )
        assert newest.encode() not in raw
        assert b"enc" in raw
        rows = sqlite3.connect(tmp_path / "integrand.db").execute("SELECT value FROM state").fetchall()
        assert rows
        assert all(newest not in str(r[0]) for r in rows)


async def test_wrong_key_and_spent_tokens_are_auth_errors(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        async with connected(env) as qbo:
            await qbo.query("select * from Customer")
        other = await env.connector("qbo", token_key=OTHER_KEY)
        try:
            with pytest.raises(AuthError, match="cannot be decrypted"):
                await other.query("select * from Customer")
        finally:
            await other.close()
        rotated = await env.connector("qbo", token_key=[OTHER_KEY, TOKEN_KEY])
        try:
            await rotated.query("select * from Customer")  # old key still decrypts; the new one encrypts
        finally:
            await rotated.close()
        tokens_mod._MANAGERS.clear()  # a separate process: nothing shared in memory
        spent = await env.connector("fresh", refresh_token="RT1-never-issued")
        try:
            with pytest.raises(AuthError, match="refused"):
                await spent.query("select * from Customer")
        finally:
            await spent.close()


def test_config_rejects_bad_keys_and_old_minorversion(tmp_path: Path) -> None:
    base: dict[str, Any] = {"realm_id": "1", "client_id": "c", "client_secret": "s", "token_key": TOKEN_KEY}
    QuickBooksConfig.model_validate(base)
    with pytest.raises(ValidationError, match="Fernet"):
        QuickBooksConfig.model_validate({**base, "token_key": "short"})
    with pytest.raises(ValidationError, match="minorversion"):
        QuickBooksConfig.model_validate({**base, "minorversion": 74})
    cfg = QuickBooksConfig.model_validate(base)
    assert cfg.throttle_wait == 60
    assert cfg.requests_per_second == 10
    assert cfg.requests_per_minute == 500
    assert cfg.base == "https://quickbooks.api.intuit.com"
    assert cfg.token_url == "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"
    sandbox = QuickBooksConfig.model_validate({**base, "environment": "sandbox"})
    assert sandbox.base == "https://sandbox-quickbooks.api.intuit.com"


async def test_auth_command_flow_stores_tokens(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        qbo = await env.connector("qbo", redirect_uri="http://localhost:8765/cb")
        said: list[str] = []

        async def ask(prompt: str) -> str:
            url = said[-1]
            async with aiohttp.ClientSession() as s, s.get(url, allow_redirects=False) as r:
                assert r.status == 302
                return r.headers["Location"]  # what the browser's address bar shows after consent

        try:
            msg = await qbo.authorize(ask, said.append)
            assert "stored" in msg
            assert said[-1].startswith(env.fake.url + "/connect/oauth2?")
            assert "scope=com.intuit.quickbooks.accounting" in said[-1]
            await qbo.query("select * from Customer")
            assert env.fake.refreshes == 0  # the code exchange gave a working pair

            async def forged(prompt: str) -> str:
                return "http://localhost:8765/cb?code=x&state=wrong&realmId=" + env.fake.realm_id

            with pytest.raises(AuthError, match="state"):
                await qbo.authorize(forged, said.append)
        finally:
            await qbo.close()


# --- enrichment -----------------------------------------------------------------------------------


async def test_enrichment_fetches_in_batches_and_deletes_carry_no_body(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env, enrich_batch=2) as qbo:
        ids = [env.fake.create("Customer", {"DisplayName": f"C{i}"})["Id"] for i in range(5)]
        env.fake.update("Customer", ids[0], {"CompanyName": "newer"})
        inv = env.fake.create("Invoice", {"TotalAmt": 1})
        env.fake.delete("Invoice", inv["Id"])
        body = env.fake.webhook_body(env.fake.pending)
        events = qbo.parse(_request(body, {}))
        before = len(env.fake.requests)
        enriched = await qbo.enrich(events)
        # 5 distinct customers in batches of 2 = 3 queries; the invoice was created then deleted: 1 query finds nothing.
        assert len(env.fake.requests) - before == 4
        by = {(e.entity_id, e.data["operation"]): e for e in enriched if e.entity == "Customer"}
        assert by[(ids[0], "Create")].data["object"]["CompanyName"] == "newer"  # an old notice carries the newest state
        assert by[(ids[0], "Create")].version == by[(ids[0], "Update")].version
        dele = next(e for e in enriched if e.type == "invoice.deleted")
        assert dele.data.get("object") is None
        assert "object" not in dele.data
        created = next(e for e in enriched if e.type == "invoice.created")
        assert created.data["object"] is None  # gone by the time we looked


# --- polling --------------------------------------------------------------------------------------


async def test_cdc_poll_pages_past_the_cap_and_sees_deletes(tmp_path: Path) -> None:
    async with (
        qbo_env(tmp_path, max_page=1000) as env,
        connected(env, initial_lookback=120, entities=["Customer", "Invoice"], page_size=3) as qbo,
    ):
        for i in range(7):
            env.fake.create("Customer", {"DisplayName": f"C{i}"})
        inv = env.fake.create("Invoice", {"TotalAmt": 3})
        env.fake.delete("Invoice", inv["Id"])
        import integrand_quickbooks.connector as mod

        mod_cap = mod.CDC_MAX
        mod.CDC_MAX = env.fake.max_page = 3
        try:
            cursor: Any = None
            seen: dict[str, Event] = {}
            for _ in range(10):
                res = await qbo.poll(cursor)
                for e in res.events:
                    seen[e.id] = e
                cursor = res.cursor
                if not res.more:
                    break
            assert not res.more
        finally:
            mod.CDC_MAX = mod_cap
            env.fake.max_page = 1000
        names = sorted(e.data["object"]["DisplayName"] for e in seen.values() if e.entity == "Customer")
        assert names == [f"C{i}" for i in range(7)]
        ops = {e.data["operation"] for e in seen.values() if e.entity == "Invoice"}
        assert "Delete" in ops
        assert {e.meta["via"] for e in seen.values()} == {"cdc", "query"}  # query paging for one crowded second
        # A later poll from the cursor brings only what changed since.
        env.fake.update("Customer", "1", {"CompanyName": "X"})
        res = await qbo.poll(cursor)
        fresh = [e for e in res.events if e.id not in seen]
        assert [(e.entity_id, e.data["operation"]) for e in fresh] == [("1", "Update")]


async def test_missed_webhook_is_caught_by_cdc_with_the_same_event_id(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env, initial_lookback=60) as qbo:
        c = env.fake.create("Customer", {"DisplayName": "Seen"})
        hooked = qbo.parse(_request(env.fake.webhook_body(env.fake.pending), {}))
        env.fake.pending.clear()
        env.fake.create("Customer", {"DisplayName": "Missed"})
        env.fake.pending.clear()  # that webhook never arrives
        res = await qbo.poll(None)
        by_name = {e.data["object"]["DisplayName"]: e for e in res.events}
        assert set(by_name) == {"Seen", "Missed"}
        assert c["Id"] == by_name["Seen"].entity_id == hooked[0].entity_id
        assert by_name["Missed"].data["operation"] == "Create"
        again = await qbo.poll(res.cursor)  # the overlap brings them again with the same ids: the store drops them
        assert {e.id for e in again.events} <= {e.id for e in res.events}


async def test_beyond_thirty_days_polling_reconciles_through_query(tmp_path: Path) -> None:
    async with qbo_env(tmp_path, max_page=1000) as env, connected(env, page_size=2, entities=["Customer"]) as qbo:
        for i in range(5):
            env.fake.create("Customer", {"DisplayName": f"C{i}"})
        old = (datetime.now(UTC) - timedelta(days=45)).isoformat(timespec="seconds")
        cursor: Any = {"since": {"Customer": old}}
        names: set[str] = set()
        all_polled: list[Event] = []
        for _ in range(10):
            res = await qbo.poll(cursor)
            all_polled += res.events
            names |= {e.data["object"]["DisplayName"] for e in res.events}
            cursor = res.cursor
            if not res.more:
                break
        assert names == {f"C{i}" for i in range(5)}
        assert not any(p.endswith("/cdc") for _, _, p in env.fake.requests)
        await qbo.poll(cursor)
        assert env.fake.requests[-1][2].endswith("/cdc")  # back on CDC once caught up
        since = (datetime.now(UTC) - timedelta(days=1)).timestamp()
        recon: list[Event] = []
        page: Any = None
        for _ in range(10):
            got = await qbo.reconcile(since, page)
            recon += got.events
            page = got.cursor
            if not got.more:
                break
        assert len(recon) == 5
        assert all(e.meta["via"] == "query" for e in recon)
        assert {e.id for e in recon} <= {e.id for e in all_polled}  # same ids as polling: nothing new


def _create_at(env: Any, offset: float, name: str) -> None:
    """A customer stamped ``offset`` seconds from now but listed from now on (committed late, or indexed late)."""
    env.fake.advance(offset)
    env.fake.create("Customer", {"DisplayName": name})
    env.fake.advance(-offset)


async def _walk(qbo: Any, cursor: Any, names: set[str]) -> Any:
    for _ in range(10):
        res = await qbo.poll(cursor)
        names |= {e.data["object"]["DisplayName"] for e in res.events}
        cursor = res.cursor
        if not res.more:
            return cursor
    raise AssertionError("the walk did not end")


async def test_a_change_committed_late_during_a_query_walk_is_read_by_the_next_pass(tmp_path: Path) -> None:
    """The query walk's keyset moves past a change not listed yet when the page covering its time was read;
    the walk's end must leave the cursor before it (the pattern of http-poll's 5839bfe)."""
    async with (
        qbo_env(tmp_path, max_page=1000) as env,
        connected(env, page_size=2, entities=["Customer"], overlap=30) as qbo,
    ):
        _create_at(env, -20, "C0")
        _create_at(env, -10, "C1")
        for i in range(2, 5):
            env.fake.create("Customer", {"DisplayName": f"C{i}"})
        old = (datetime.now(UTC) - timedelta(days=45)).isoformat(timespec="seconds")
        res = await qbo.poll({"since": {"Customer": old}})
        names = {e.data["object"]["DisplayName"] for e in res.events}
        assert names == {"C0", "C1"} and res.more
        _create_at(env, -15, "Late")  # lagged 15 s (< overlap): behind the page just read
        cursor = await _walk(qbo, res.cursor, names)
        assert "Late" not in names
        await _walk(qbo, cursor, names)  # the next pass (CDC)
        assert "Late" in names


async def test_a_change_committed_late_during_a_capped_cdc_walk_is_read_by_the_next_pass(tmp_path: Path) -> None:
    """A CDC answer at the cap walks the type with since moved to the newest object seen; a change committed
    late behind it must be within the next pass's reach."""
    import integrand_quickbooks.connector as mod

    async with (
        qbo_env(tmp_path, max_page=1000) as env,
        connected(env, initial_lookback=120, entities=["Customer"], overlap=30) as qbo,
    ):
        for offset, name in ((-20, "C0"), (-15, "C1"), (-10, "C2"), (-5, "C3")):
            _create_at(env, offset, name)
        mod_cap = mod.CDC_MAX
        mod.CDC_MAX = env.fake.max_page = 3
        try:
            names: set[str] = set()
            res = await qbo.poll(None)  # at the cap: walk the types one at a time
            assert res.more
            res = await qbo.poll(res.cursor)  # C0..C2, since moves to C2's time
            names |= {e.data["object"]["DisplayName"] for e in res.events}
            assert names == {"C0", "C1", "C2"} and res.more
            _create_at(env, -12, "Late")  # lagged 12 s (< overlap), stamped before C2
            cursor = await _walk(qbo, res.cursor, names)
            assert "Late" not in names
            for _ in range(3):  # the next passes (at this tiny cap, each walks again)
                cursor = await _walk(qbo, cursor, names)
        finally:
            mod.CDC_MAX = mod_cap
            env.fake.max_page = 1000
        assert "Late" in names


# --- sink -----------------------------------------------------------------------------------------


def _ev(data: Any, key: str = "e1", entity: str = "Customer") -> Event:
    return Event(id=key, source="hubspot", type="contact.updated", data=data, entity=entity)


async def test_sink_creates_then_sparse_updates_by_match_field(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env, match_field="DisplayName") as qbo:
        await qbo.deliver(_ev({"DisplayName": "Acme", "CompanyName": "Acme"}, "e1"))
        (c,) = env.fake.all("Customer")
        await qbo.deliver(_ev({"DisplayName": "Acme", "PrimaryPhone": {"FreeFormNumber": "555"}}, "e2"))
        (c2,) = env.fake.all("Customer")
        assert c2["Id"] == c["Id"]
        assert c2["SyncToken"] == "1"
        assert c2["CompanyName"] == "Acme"
        assert c2["PrimaryPhone"] == {"FreeFormNumber": "555"}
        # Redelivery of e1 (a crash before the ack) replays Intuit's first answer: still one customer.
        await qbo.deliver(_ev({"DisplayName": "Acme", "CompanyName": "Acme"}, "e1"))
        assert len(env.fake.all("Customer")) == 1
        inv = _ev({"Line": [], "CustomerRef": {"value": c["Id"]}, "TotalAmt": 9}, "e3", entity="Invoice")
        await qbo.deliver(inv)
        assert env.fake.all("Invoice")[0]["TotalAmt"] == 9


async def test_stale_synctoken_rereads_and_retries(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env) as qbo:
        c = env.fake.create("Customer", {"DisplayName": "Acme"})
        # Someone edits the customer between our read and our write, once.
        env.fake.inject(200, {"Customer": {**c, "SyncToken": "0"}})  # our read sees the old token
        env.fake.update("Customer", c["Id"], {"Notes": "edited in the UI"})
        await qbo.deliver(_ev({"Id": c["Id"], "CompanyName": "Acme Inc"}))
        now = env.fake.get("Customer", c["Id"])
        assert now is not None
        assert now["CompanyName"] == "Acme Inc"
        assert now["Notes"] == "edited in the UI"
        assert now["SyncToken"] == "2"


async def test_faults_are_sorted_into_retryable_permanent_and_auth(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env, throttle_wait=0.3) as qbo:
        env.fake.create("Customer", {"DisplayName": "Taken"})
        with pytest.raises(PermanentError, match="6240"):
            await qbo.deliver(_ev({"DisplayName": "Taken"}, "dup"))
        env.fake.inject(200, fault("10000", "An application error has occurred", "SystemFault"))
        with pytest.raises(RetryableError):
            await qbo.deliver(_ev({"DisplayName": "New"}, "sys"))
        env.fake.inject(403, fault("120", "Authorization Failure", "AuthorizationFault"))
        with pytest.raises(AuthError):
            await qbo.deliver(_ev({"DisplayName": "New"}, "authz"))
        env.fake.inject(429, fault("3001", "message=ThrottleExceeded", "ThrottleExceeded"))
        with pytest.raises(RetryableError) as ei:
            await qbo.deliver(_ev({"DisplayName": "New"}, "thr"))
        assert ei.value.retry_after == 0.3  # the configured wait; 60 s by default, as Intuit asks
        env.fake.inject(503, "")
        waited = qbo.limiter.waited
        with pytest.raises(RetryableError):
            await qbo.query("select * from Customer")
        assert qbo.limiter.waited > waited  # after the 429 every caller on this realm waited


async def test_rate_limits_are_never_exceeded(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env) as qbo, connected(env, "qbo-sink") as sink:
        import asyncio

        # A source and a sink of the same company share one limiter: together they stay under 10/s.
        assert qbo.limiter is sink.limiter
        await asyncio.gather(
            *(qbo.query("select * from Customer") for _ in range(13)),
            *(sink.query("select * from Item") for _ in range(12)),
        )
        assert env.fake.throttled == 0
        assert len(env.fake.requests) == 25


async def test_limiter_holds_the_minute_window_on_a_fake_clock() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)
        now[0] += d

    lim = RateLimiter([(10, 1.0), (500, 60.0)], clock=lambda: now[0], sleep=sleep)
    stamps = []
    for _ in range(1200):
        async with lim.slot():
            stamps.append(now[0])
    for i in range(len(stamps)):
        assert sum(1 for t in stamps[i : i + 11] if t < stamps[i] + 1.0) <= 10
        assert sum(1 for t in stamps[i : i + 501] if t < stamps[i] + 60.0) <= 500
    assert stamps[-1] >= 120  # 1,200 requests at 500/min take at least two minutes


def test_versions_are_utc_and_sortable() -> None:
    assert utc_version("2015-12-23T12:55:50-08:00") == "2015-12-23T20:55:50Z"
    assert utc_version("2015-10-05T14:42:19-0700") < utc_version("2015-10-05T14:42:20-0700")


async def test_source_and_sink_of_one_company_share_rotating_tokens(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        rt = env.fake.issue_refresh_token()
        async with (
            connected(env, "source-qbo", refresh_token=rt) as src,
            connected(env, "sink-qbo", refresh_token=rt) as snk,
        ):
            assert src.tokens is snk.tokens
            await src.query("select * from Customer")
            env.fake.advance(3600)
            await snk.query("select * from Customer")
            await src.query("select * from Customer")
            assert env.fake.refreshes == 2  # one rotation chain, never two racing on one refresh token
            for scope in ("source-qbo", "sink-qbo"):
                assert (await env.store.state_get(scope, tokens_mod.STATE_KEY)) is not None


async def test_fetch_gathers_concurrent_calls_into_one_query(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env) as qbo:
        import asyncio

        ids = [env.fake.create("Customer", {"DisplayName": f"C{i}"})["Id"] for i in range(6)]
        env.fake.update("Customer", ids[2], {"CompanyName": "changed"})
        events = qbo.parse(_request(env.fake.webhook_body(env.fake.pending), {}))
        await qbo.query("select * from Customer")  # tokens in place, so only fetches are counted below
        before = len(env.fake.requests)
        fetched = await asyncio.gather(*(qbo.fetch(e) for e in events))
        assert len(env.fake.requests) - before == 1  # seven events, six customers, one query
        assert all(f.data["object"]["Id"] == f.entity_id for f in fetched)
        assert fetched[2].data["object"]["CompanyName"] == "changed"
        gone = Event(
            id="g",
            source="qbo",
            type="customer.updated",
            data={"operation": "Update"},
            entity="Customer",
            entity_id="999",
        )
        assert (await qbo.fetch(gone)).data["object"] is None
        dele = Event(
            id="d",
            source="qbo",
            type="customer.deleted",
            data={"operation": "Delete"},
            entity="Customer",
            entity_id="1",
        )
        assert await qbo.fetch(dele) is dele


async def test_sink_matches_by_a_dotted_field(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env, match_field="PrimaryEmailAddr.Address") as qbo:
        body = {"DisplayName": "Ann Lee", "PrimaryEmailAddr": {"Address": "ann@x.com"}}
        await qbo.deliver(_ev(body, "m1"))
        await qbo.deliver(_ev({**body, "CompanyName": "Lee Ltd"}, "m2"))
        (c,) = env.fake.all("Customer")
        assert c["CompanyName"] == "Lee Ltd"
        assert c["SyncToken"] == "1"


async def test_fetch_arriving_while_a_query_is_in_flight_is_not_forgotten(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env, enrich_batch=2) as qbo:
        import asyncio

        ids = [env.fake.create("Customer", {"DisplayName": f"C{i}"})["Id"] for i in range(5)]
        events = qbo.parse(_request(env.fake.webhook_body(env.fake.pending), {}))
        await qbo.query("select * from Customer")
        env.fake.latency = 0.3
        first = asyncio.create_task(qbo.fetch(events[0]))
        await wait_for(lambda: len(env.fake.requests) > 1)  # the first batch's query is on its way
        rest = [asyncio.create_task(qbo.fetch(e)) for e in events[1:]]  # two full batches and a lingering one
        done = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        assert [e.data["object"]["Id"] for e in done] == ids


async def test_closing_with_a_fetch_in_flight_fails_it_instead_of_hanging(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env) as qbo:
        import asyncio

        env.fake.create("Customer", {"DisplayName": "C"})
        (ev,) = qbo.parse(_request(env.fake.webhook_body(env.fake.pending), {}))
        await qbo.query("select * from Customer")
        env.fake.latency = 1.0
        task = asyncio.create_task(qbo.fetch(ev))
        await wait_for(lambda: len(env.fake.requests) > 1)
        await qbo.close()
        with pytest.raises(RetryableError, match="closed"):
            await asyncio.wait_for(task, 5)


async def test_sink_writes_items_and_payments_too(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env, connected(env) as qbo:
        await qbo.deliver(_ev({"Name": "Widget", "Type": "Service", "UnitPrice": 5}, "i1", entity="Item"))
        (item,) = env.fake.all("Item")
        await qbo.deliver(_ev({"Id": item["Id"], "UnitPrice": 6}, "i2", entity="Item"))
        await qbo.deliver(_ev({"TotalAmt": 12.5, "CustomerRef": {"value": "1"}}, "p1", entity="Payment"))
        (item,) = env.fake.all("Item")
        assert item["UnitPrice"] == 6
        assert item["Name"] == "Widget"
        assert item["SyncToken"] == "1"
        assert env.fake.all("Payment")[0]["TotalAmt"] == 12.5


async def test_requests_are_logged_by_the_helper_without_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="integrand")
    async with qbo_env(tmp_path) as env, connected(env) as qbo:
        env.fake.create("Customer", {"DisplayName": "Logged"})
        assert len(await qbo.query("select * from Customer")) == 1
        basic = base64.b64encode(f"{env.fake.client_id}:{env.fake.client_secret}".encode()).decode()
        secrets = [*env.fake.access_tokens, *env.fake.refresh_tokens, env.fake.client_secret, basic]
    assert "→ GET" in caplog.text and "/query?" in caplog.text  # the shared helper sent it
    assert "(request id " in caplog.text  # intuit_tid, as Intuit support asks for
    assert secrets
    for s in secrets:
        assert s not in caplog.text
