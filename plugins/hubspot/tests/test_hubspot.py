"""The hubspot connector and its fake: signatures (SDK vectors), webhook arrays, search polling, upsert sink, limits."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hs_support import hubspot, wait_for
from integrand_hubspot import HubSpotConfig, HubSpotConnector, signing
from integrand_hubspot.connector import retry_after_for
from pydantic import ValidationError

from integrand.connector import (
    AuthError,
    ConnectorContext,
    Event,
    PayloadError,
    PermanentError,
    RetryableError,
    SignatureError,
    WebhookRequest,
)
from integrand.events import utcnow_iso

SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
URI = "https://www.example.com/webhook_uri"
SDK_BODY = b"{'example_field':'example_value'}"


def test_sdk_vectors() -> None:
    # From HubSpot's SDK tests and docs (reference: third-party-apis.md, "Webhook signatures").
    assert signing.v3(SECRET, "POST", URI, SDK_BODY, "15000000") == "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw="
    assert signing.v1(SECRET, SDK_BODY) == "69fc6631a867edd4f9e9e627fc5c1148e3fbdd8b21837b6d2b8901c1fa57f750"
    assert (
        signing.v2(SECRET, "POST", URI, SDK_BODY) == "4fe4e3a7d3cf09db53be39d0a58130e2aaba074ec123a9e355b876a689a1c383"
    )
    # The docs' v2 GET example and v1 example with a real event body.
    assert signing.v2(SECRET, "GET", URI, b"") == "eee2dddcc73c94d699f5e395f4b9d454a069a6855fbfa152e91e88823087200e"
    doc_body = (
        b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,"subscriptionType":'
        b'"contact.creation","attemptNumber":0,"objectId":123,"changeSource":"CRM","changeFlag":"NEW","appId":54321}]'
    )
    assert signing.v1(SECRET, doc_body) == "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de"


def _req(
    body: bytes, headers: dict[str, str], url: str = "https://integrand.example.com/hooks/hubspot"
) -> WebhookRequest:
    return WebhookRequest("hubspot", "POST", url, headers, body, utcnow_iso(), "application/json")


async def test_v3_verified_v1_v2_only_where_configured(tmp_path: Path) -> None:
    async with hubspot(tmp_path) as (fake, hs):
        fake.put("contacts", {"email": "a@x.com"})
        body = orjson.dumps(fake.pending)
        url = hs.config.webhook_url or ""
        now = fake.now()
        hs.verify(_req(body, fake.webhook_headers(url, body)), now)
        with pytest.raises(SignatureError, match="does not match"):
            hs.verify(_req(body + b" ", fake.webhook_headers(url, body)), now)
        with pytest.raises(SignatureError, match="outside"):
            hs.verify(_req(body, fake.webhook_headers(url, body)), now + 301)
        old = fake.webhook_headers(url, body, ("v1",))
        with pytest.raises(SignatureError, match="accepted: v3"):
            hs.verify(_req(body, old), now)
    async with hubspot(tmp_path, signature_versions=["v3", "v2", "v1"]) as (fake, hs):
        body = b'[{"objectId":1}]'
        url = hs.config.webhook_url or ""
        hs.verify(_req(body, fake.webhook_headers(url, body, ("v1",))), fake.now())
        hs.verify(_req(body, fake.webhook_headers(url, body, ("v2",))), fake.now())
        bad = {**fake.webhook_headers(url, body, ("v2",)), "X-HubSpot-Signature": "0" * 64}
        with pytest.raises(SignatureError):
            hs.verify(_req(body, bad), fake.now())
        signed = hs.sign(body, time.time(), "x")
        assert signed is not None
        hs.verify(_req(body, signed), time.time())


async def test_webhook_array_becomes_events_with_stable_ids(tmp_path: Path) -> None:
    async with hubspot(tmp_path) as (fake, hs):
        c = fake.put("contacts", {"email": "a@x.com"})
        fake.edit("contacts", c["id"], {"firstname": "Ann"})
        body = orjson.dumps(fake.pending)
        events = hs.parse(_req(body, {}))
        assert [(e.type, e.entity, e.entity_id) for e in events] == [
            ("contact.creation", "contact", c["id"]),
            ("contact.propertyChange", "contact", c["id"]),
        ]
        assert events[1].data["propertyName"] == "firstname"
        assert events[1].version
        assert events[1].version.endswith("Z")
        retried = [{**e, "attemptNumber": 3} for e in fake.pending]
        assert [e.id for e in hs.parse(_req(orjson.dumps(retried), {}))] == [e.id for e in events]
        legacy = [{**fake.pending[0], "eventType": fake.pending[0]["subscriptionType"]}]
        del legacy[0]["subscriptionType"]
        assert hs.parse(_req(orjson.dumps(legacy), {}))[0].type == "contact.creation"
        for bad in (b"{}", b"[1]", b'[{"objectId": 1}]', b"nope"):
            with pytest.raises(PayloadError):
                hs.parse(_req(bad, {}))


async def test_search_polling_survives_the_10k_cap_by_restarting_the_window(tmp_path: Path) -> None:
    # The real cap is 10,000 results; the fake's is lowered so the test stays fast, the logic is the same.
    async with hubspot(
        tmp_path, {"search_cap": 25, "search_per_second": 50}, page_size=10, search_cap=25, initial_lookback=3600
    ) as (fake, hs):
        base = int(time.time() * 1000) - 60_000
        for i in range(73):
            fake.put("contacts", {"email": f"c{i}@x.com"}, at_ms=base + i // 2)  # two per millisecond
        cursor: Any = None
        seen: dict[str, Event] = {}
        polls = 0
        while True:
            res = await hs.poll(cursor)
            polls += 1
            seen.update({e.id: e for e in res.events})
            cursor = res.cursor
            if not res.more:
                break
            assert polls < 50
        emails = {e.data["object"]["properties"]["email"] for e in seen.values()}
        assert emails == {f"c{i}@x.com" for i in range(73)}
        assert not any(r == "TEN_SECONDLY_ROLLING" for r in fake.throttled)
        # Nothing new: the next sweep (from the overlap before the last one began) brings only ids already seen.
        again: list[Event] = []
        while True:
            res = await hs.poll(cursor)
            again += res.events
            cursor = res.cursor
            if not res.more:
                break
        assert {e.id for e in again} <= set(seen)
        fake.edit("contacts", next(iter(fake.objects["contacts"])), {"firstname": "New"})
        later: list[Event] = []
        while True:
            res = await hs.poll(cursor)
            later += res.events
            cursor = res.cursor
            if not res.more:
                break
        assert [e.data["object"]["properties"].get("firstname") for e in later if e.id not in seen] == ["New"]


async def test_a_change_indexed_late_during_a_multi_page_sweep_is_read_by_the_next_one(tmp_path: Path) -> None:
    """A sweep of several pages goes on reading newer changes while it pages; one that became searchable only
    after the page covering its time was read must still be within the next sweep's reach (http-poll's 5839bfe).

    Restarting ``overlap`` before the newest change of the whole sweep skipped it for good when the sweep
    ran longer than the overlap: here changes stamped a minute after the sweep began.
    """
    async with hubspot(tmp_path, page_size=2, initial_lookback=3600) as (fake, hs):
        now = int(time.time() * 1000)
        fake.put("contacts", {"email": "c0@x.com"}, at_ms=now - 20_000)
        fake.put("contacts", {"email": "c1@x.com"}, at_ms=now - 10_000)
        fake.put("contacts", {"email": "c2@x.com"}, at_ms=now - 5_000)
        res = await hs.poll(None)
        assert res.more
        seen = {e.data["object"]["properties"]["email"] for e in res.events}
        assert seen == {"c0@x.com", "c1@x.com"}
        # Committed 15 s ago but searchable only now: behind the page already read (lag < overlap).
        fake.put("contacts", {"email": "late@x.com"}, at_ms=now - 15_000)
        fake.put("contacts", {"email": "c3@x.com"}, at_ms=now + 60_000)  # the sweep is still going a minute on
        cursor: Any = res.cursor
        for _ in range(10):
            res = await hs.poll(cursor)
            seen |= {e.data["object"]["properties"]["email"] for e in res.events}
            cursor = res.cursor
            if not res.more:
                break
        assert "late@x.com" not in seen  # offset paging: the insert shifted it out of this sweep's pages
        res = await hs.poll(cursor)
        seen |= {e.data["object"]["properties"]["email"] for e in res.events}
        assert "late@x.com" in seen


async def test_a_record_edited_during_a_sweep_does_not_shift_another_out_of_it(tmp_path: Path) -> None:
    """Search pages by position: a record edited during a sweep moves to the end, the rest move up one, and
    the record at the next page boundary was skipped; from a backlog an hour old, for good (its time is far
    before where the next sweep starts). The sweep now pages by modification time (keyset)."""
    async with hubspot(tmp_path, page_size=2, initial_lookback=7200) as (fake, hs):
        now = int(time.time() * 1000)
        ids = [fake.put("contacts", {"email": f"b{i}@x.com"}, at_ms=now - 3_600_000 + i * 1000)["id"] for i in range(6)]
        res = await hs.poll(None)
        seen = {e.data["object"]["properties"]["email"] for e in res.events}
        assert seen == {"b0@x.com", "b1@x.com"} and res.more
        fake.edit("contacts", ids[0], {"firstname": "Edited"})  # b0 moves to the end
        cursor: Any = res.cursor
        for _ in range(10):
            res = await hs.poll(cursor)
            seen |= {e.data["object"]["properties"]["email"] for e in res.events}
            cursor = res.cursor
            if not res.more:
                break
        assert seen == {f"b{i}@x.com" for i in range(6)}


async def test_search_uses_hs_lastmodifieddate_for_other_objects(tmp_path: Path) -> None:
    async with hubspot(
        tmp_path, object_type="companies", properties=["name", "domain"], id_property="domain", initial_lookback=60
    ) as (fake, hs):
        fake.put("companies", {"name": "Acme", "domain": "acme.com"})
        res = await hs.poll(None)
        assert [e.data["object"]["properties"]["name"] for e in res.events] == ["Acme"]
        assert "hs_lastmodifieddate" in res.events[0].data["object"]["properties"]
        assert res.events[0].entity == "company"


def _ev(props: dict[str, Any], key: str, version: str | None = None, entity_id: str = "1") -> Event:
    return Event(
        id=key,
        source="qbo",
        type="customer.updated",
        data=props,
        entity="Customer",
        entity_id=entity_id,
        version=version,
    )


async def test_batch_upsert_by_id_property_and_bad_items_isolated(tmp_path: Path) -> None:
    async with hubspot(tmp_path) as (fake, hs):
        events = [_ev({"email": f"u{i}@x.com", "firstname": f"U{i}"}, f"e{i}", entity_id=str(i)) for i in range(150)]
        events.append(_ev({"email": "not-an-email", "firstname": "Bad"}, "bad", entity_id="bad"))
        events.append(_ev({"firstname": "NoKey"}, "nokey", entity_id="nk"))
        results = await hs.deliver_batch(events)
        assert all(r is None for r in results[:150])
        assert isinstance(results[150], PermanentError)
        assert "invalid email" in str(results[150])
        assert isinstance(results[151], PermanentError)
        assert len(fake.objects["contacts"]) == 150
        assert max(fake.batch_sizes) <= 100
        # Upsert again: updates in place, never duplicates.
        await hs.deliver(_ev({"email": "u1@x.com", "firstname": "Changed"}, "e-again"))
        assert len(fake.objects["contacts"]) == 150
        found = fake.find("contacts", "email", "u1@x.com")
        assert found is not None
        assert found["properties"]["firstname"] == "Changed"
        # Two events for one contact in one batch collapse to the last (HubSpot refuses duplicate ids).
        res = await hs.deliver_batch(
            [_ev({"email": "z@x.com", "firstname": "Old"}, "z1"), _ev({"email": "z@x.com", "firstname": "New"}, "z2")]
        )
        assert res == [None, None]
        z = fake.find("contacts", "email", "z@x.com")
        assert z is not None
        assert z["properties"]["firstname"] == "New"


async def test_version_property_prevents_stale_writes(tmp_path: Path) -> None:
    async with hubspot(tmp_path, version_property="integrand_version") as (fake, hs):
        await hs.deliver(_ev({"email": "a@x.com", "firstname": "Newest"}, "n", version="2025-01-02T00:00:00Z"))
        await hs.deliver(_ev({"email": "a@x.com", "firstname": "Older"}, "o", version="2025-01-01T00:00:00Z"))
        await hs.deliver(_ev({"email": "a@x.com", "firstname": "Newest"}, "n", version="2025-01-02T00:00:00Z"))
        a = fake.find("contacts", "email", "a@x.com")
        assert a is not None
        assert a["properties"]["firstname"] == "Newest"
        assert a["properties"]["integrand_version"] == "2025-01-02T00:00:00Z"
        await hs.deliver(_ev({"email": "a@x.com", "firstname": "Newer still"}, "n3", version="2025-01-03T00:00:00Z"))
        a = fake.find("contacts", "email", "a@x.com")
        assert a is not None
        assert a["properties"]["firstname"] == "Newer still"


async def test_429_policy_names_and_headers(tmp_path: Path) -> None:
    async with hubspot(tmp_path, {"per_ten_seconds": 3}) as (fake, hs):
        await hs.deliver(_ev({"email": "r0@x.com"}, "r0"))
        fake._sent.extend([fake.now()] * 2)  # another app on the same account spends the rest of the window
        with pytest.raises(RetryableError) as ei:
            await hs.deliver(_ev({"email": "r9@x.com"}, "r9"))
        assert ei.value.retry_after == 10.0
        assert "TEN_SECONDLY_ROLLING" in str(ei.value)
        assert hs.limiter.paused_for() > 0  # and this connector now waits out the window
    async with hubspot(tmp_path, {"daily": 1}) as (fake, hs):
        await hs.deliver(_ev({"email": "d@x.com"}, "d"))
        assert hs.limiter.paused_for() > 0  # Daily-Remaining reached 0: paused before HubSpot says 429
        hs.ctx.http.pool.clear_pauses()
        with pytest.raises(RetryableError) as ei:
            await hs.deliver(_ev({"email": "d2@x.com"}, "d2"))
        assert "DAILY" in str(ei.value)
        assert (ei.value.retry_after or 0) >= 60
    assert retry_after_for("TEN_SECONDLY_ROLLING", {"X-HubSpot-RateLimit-Interval-Milliseconds": "10000"}, 0) == 10.0


async def test_rolling_limit_is_never_exceeded(tmp_path: Path) -> None:
    async with hubspot(tmp_path, {"per_ten_seconds": 100, "search_per_second": 5}, page_size=1) as (fake, hs):
        for i in range(3):
            fake.put("contacts", {"email": f"s{i}@x.com"})
        cursor: Any = {"since": 0}
        for _ in range(8):  # 8 searches at ≤ 5/s
            res = await hs.poll(cursor)
            cursor = res.cursor
        assert fake.throttled == []


async def test_oauth_refreshes_on_expiry(tmp_path: Path) -> None:
    async with hubspot(tmp_path, access_token=None, client_id="fake-hubspot-client", refresh_token="placeholder") as (
        fake,
        hs,
    ):
        # The fake issues the refresh token; hand it to the running connector's config.
        rt = fake.issue_refresh_token()
        hs.config = HubSpotConfig.model_validate(
            {**hs.config.model_dump(), "refresh_token": rt, "client_secret": fake.client_secret}
        )
        await hs.deliver(_ev({"email": "o@x.com"}, "o1"))
        first = hs._access
        fake.advance(1801)
        await hs.deliver(_ev({"email": "o2@x.com"}, "o2"))
        assert hs._access != first
        assert len(fake.objects["contacts"]) == 2
    async with hubspot(tmp_path, access_token="pat-wrong") as (fake, hs):
        with pytest.raises(AuthError):
            await hs.deliver(_ev({"email": "x@x.com"}, "x"))


def test_config_defaults_and_auth_rules() -> None:
    c = HubSpotConfig.model_validate({"access_token": "pat-1"})
    assert c.api_base == "https://api.hubapi.com"
    assert c.page_size == 200
    assert c.search_cap == 10_000
    assert c.modified == "lastmodifieddate"
    with pytest.raises(ValidationError, match="client_id"):
        HubSpotConfig.model_validate({"refresh_token": "r"})
    with pytest.raises(ValidationError, match="not both"):
        HubSpotConfig.model_validate(
            {"refresh_token": "r", "client_id": "c", "client_secret": "s", "access_token": "p"}
        )


async def test_fetch_completes_webhook_events_and_reconcile_pages(tmp_path: Path) -> None:
    async with hubspot(tmp_path, initial_lookback=60) as (fake, hs):
        c = fake.put("contacts", {"email": "f@x.com", "firstname": "Fay", "secret_note": "not asked for"})
        fake.edit("contacts", c["id"], {"lastname": "Ng"})
        events = hs.parse(_req(orjson.dumps(fake.pending), {}))
        full = await hs.fetch(events[0])
        props = full.data["object"]["properties"]
        assert props["email"] == "f@x.com"
        assert props["lastname"] == "Ng"  # the creation event carries the newest state
        assert "secret_note" not in props
        assert full.version == events[1].version  # version of what was fetched, not of the notice
        gone = Event(
            id="x",
            source="hubspot",
            type="contact.propertyChange",
            data={"subscriptionType": "contact.propertyChange"},
            entity="contact",
            entity_id="999999",
        )
        assert (await hs.fetch(gone)).data["object"] is None
        dele = Event(
            id="y",
            source="hubspot",
            type="contact.deletion",
            data={"subscriptionType": "contact.deletion"},
            entity="contact",
            entity_id=c["id"],
        )
        assert await hs.fetch(dele) is dele
        for i in range(4):
            fake.put("contacts", {"email": f"r{i}@x.com"})

        since = datetime(2020, 1, 1, tzinfo=UTC).timestamp()
        page: Any = None
        got: list[Event] = []
        for _ in range(10):
            rp = await hs.reconcile(since, page)
            got += rp.events
            page = rp.cursor
            if not rp.more:
                break
        assert sorted(e.data["object"]["properties"]["email"] for e in got) == [
            "f@x.com",
            *(f"r{i}@x.com" for i in range(4)),
        ]


async def test_a_poller_and_a_sink_of_one_account_share_its_budget(tmp_path: Path) -> None:
    # HubSpot allows this app 10 requests per 10 s on the account; the poller and the sink each keep to
    # it alone, and only the budget they share in integrand's HTTP helper keeps them to it together.
    async with hubspot(tmp_path, {"per_ten_seconds": 10}, page_size=1, requests_per_10s=10) as (fake, poller):
        for i in range(3):
            fake.put("contacts", {"email": f"p{i}@x.com"})
        sink = HubSpotConnector(
            poller.config,
            ConnectorContext(
                name="hubspot-out",
                role="sink",
                base_dir=tmp_path,
                state=poller.ctx.state,
                http=poller.ctx.http.pool.for_connector(logging.getLogger("integrand.sink.hubspot-out.http")),
            ),
        )
        await sink.start()
        assert sink.limiter is poller.limiter

        async def poll_six() -> None:
            cursor: Any = {"since": 0}
            for _ in range(6):
                cursor = (await poller.poll(cursor)).cursor

        tasks = [asyncio.create_task(poll_six())] + [
            asyncio.create_task(sink.deliver(_ev({"email": f"s{i}@x.com"}, f"s{i}"))) for i in range(6)
        ]
        try:
            # Twelve requests wanted, ten allowed: the last two wait for the window to roll.
            await wait_for(lambda: len(fake.requests) == 10 and poller.limiter.waited > 5)
            assert not all(t.done() for t in tasks)
            assert len(fake.requests) == 10
            assert fake.throttled == []
            assert {p for _, _, p in fake.requests} >= {"/crm/v3/objects/contacts/search"}
            assert any(p.endswith("/batch/upsert") for _, _, p in fake.requests)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await sink.close()
