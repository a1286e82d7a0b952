"""Routes at delivery time in the running daemon: enrich through the source's fetch, map, dead-letter what cannot map."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from integrand.config import load_config
from integrand.connector import Connector, ConnectorConfig, Enricher, Event, HttpPool, PermanentError
from integrand.routes import MappingError, RouteRuntime, RouteSettings
from integrand.store import Store
from integrand.testing import connector_context, fake_api_server

from .connectors import registry_with
from .helpers import BASE, DEMO_SECRET, hook_url, post_signed, read_jsonl, running, wait_for, write_config
from .test_routes import EXAMPLE, QBO_CUSTOMER


@pytest.fixture
async def books() -> AsyncIterator[tuple[str, list[str]]]:
    """A records API: customer 58 exists, 59 has no email, anything else is 404 with a request id."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        seen.append(rid)
        if rid == "58":
            return web.json_response(QBO_CUSTOMER)
        if rid == "59":
            return web.json_response({"Id": "59", "GivenName": "No Email"})
        if rid == "99":
            return web.json_response({"error": "down"}, status=503)
        return web.json_response({"error": "not found"}, status=404, headers={"intuit_tid": f"tid-{rid}"})

    app = web.Application()
    app.router.add_get("/records/{id}", record)
    async with fake_api_server(app) as url:
        yield url, seen


async def test_thin_webhook_is_enriched_then_mapped_and_bad_ones_dead_letter(
    tmp_path: Path, books: tuple[str, list[str]]
) -> None:
    url, seen = books
    body = f"""
[sources.qbo]
connector = "fetching"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
api_url = "{url}"
entity_field = "entity"
entity_id_field = "id"

[sinks.crm]
connector = "jsonl"
path = "crm.jsonl"

[[routes]]
from = "qbo"
to = ["crm"]
enrich = true
mapping = "{EXAMPLE / "qbo-customer-to-hubspot-contact.toml"}"
"""
    reg = registry_with(fetching="tests.connectors:FetchingWebhook")
    settings = load_config(write_config(tmp_path, body, BASE), registry=reg)
    out = tmp_path / "crm.jsonl"
    async with running(settings) as d, aiohttp.ClientSession() as s:
        for i, rid in enumerate(("58", "59", "77")):
            payload = {"type": "customer.updated", "entity": "Customer", "id": rid}
            assert (await post_signed(s, hook_url(d, "qbo"), payload, f"m{i}"))[0] == 200

        async def finished() -> bool:
            counts = await d.store.counts()
            return counts.get(("crm", "done"), 0) == 1 and counts.get(("crm", "dead"), 0) == 2

        await wait_for(finished)
        dead = {dl.event_id: dl.last_error for dl in await d.store.dead_letters()}
    [line] = read_jsonl(out)
    assert line["data"]["email"] == "birds@intuit.com"
    assert line["data"]["country"] == "United States"
    assert line["data"]["lifecyclestage"] == "customer"
    assert line["meta"]["route"] == {"from": "qbo", "to": "crm"}
    assert line["entity_id"] == "58"
    assert sorted(seen) == ["58", "59", "77"]  # fetched at delivery time, once each (no retries: permanent)
    assert "MappingError: map.email: required" in dead["m1"]
    assert "PermanentError: HTTP 404" in dead["m2"]
    assert "(request id tid-77)" in dead["m2"]


class BatchFetcher(Connector[ConnectorConfig], Enricher):
    """Fetches a whole batch in one request, as the QuickBooks query endpoint allows (``where Id in (…)``)."""

    api_url = ""

    async def fetch(self, event: Event) -> Event:
        raise AssertionError("the route runtime must use fetch_many for a batch")

    async def fetch_many(self, events: Sequence[Event]) -> list[Event | BaseException]:
        ids = ",".join(e.entity_id or "" for e in events)
        found = (await self.ctx.http.get(f"{self.api_url}/batch", params={"ids": ids})).json()
        return [
            replace(e, data={"object": found[e.entity_id]})
            if e.entity_id in found
            else PermanentError(f"{e.entity} {e.entity_id} no longer exists")
            for e in events
        ]


async def test_a_batch_is_enriched_with_one_request_per_source(
    tmp_path: Path, integrand_store: Store, http_pool: HttpPool
) -> None:
    calls: list[str] = []

    async def batch(request: web.Request) -> web.Response:
        calls.append(request.query["ids"])
        records = {"58": QBO_CUSTOMER, "59": {"Id": "59"}}
        return web.json_response({i: records[i] for i in request.query["ids"].split(",") if i in records})

    app = web.Application()
    app.router.add_get("/batch", batch)
    async with fake_api_server(app) as url:
        ctx = connector_context(integrand_store, name="qbo", base_dir=tmp_path, pool=http_pool)
        fetcher = BatchFetcher(ConnectorConfig(), ctx)
        fetcher.api_url = url
        route = RouteSettings.model_validate(
            {
                "from": "qbo",
                "to": ["crm"],
                "enrich": True,
                "mapping": str(EXAMPLE / "qbo-customer-to-hubspot-contact.toml"),
            }
        )
        runtime = RouteRuntime.build([route], {"qbo": fetcher}, integrand_store)
        events = [
            Event(id=f"e{i}", source="qbo", type="customer.updated", data={}, entity="Customer", entity_id=i)
            for i in ("58", "59", "77")
        ]
        out = await runtime.prepare_batch("crm", events)
    assert calls == ["58,59,77"]
    assert isinstance(out[0], Event)
    assert out[0].data["email"] == "birds@intuit.com"
    assert isinstance(out[1], MappingError)
    assert isinstance(out[2], PermanentError)
    assert "Customer 77 no longer exists" in str(out[2])


async def test_a_source_down_for_enrichment_pauses_its_deliveries_not_the_sink(
    tmp_path: Path, books: tuple[str, list[str]]
) -> None:
    url, seen = books
    body = f"""
[sources.qbo]
connector = "fetching"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
api_url = "{url}"
entity_field = "entity"
entity_id_field = "id"

[sinks.crm]
connector = "jsonl"
path = "crm.jsonl"
retry = {{ base = "20ms", cap = "50ms", max_attempts = 50 }}
breaker = {{ failure_threshold = 1, open_for = "300ms", max_open_for = "300ms" }}

[[routes]]
from = "qbo"
to = ["crm"]
enrich = true
"""
    reg = registry_with(fetching="tests.connectors:FetchingWebhook")
    settings = load_config(write_config(tmp_path, body, BASE), registry=reg)
    async with running(settings) as d, aiohttp.ClientSession() as s:
        payload = {"type": "customer.updated", "entity": "Customer", "id": "99"}
        assert (await post_signed(s, hook_url(d, "qbo"), payload, "down"))[0] == 200
        # 3 tries per fetch (aiohttp-retry on GET), then the source's breaker opens: it is probed every 300 ms.
        await wait_for(lambda: seen.count("99") >= 7)
        assert d.dispatcher.source_breakers["qbo"].status != "closed"
        assert d.dispatcher.sinks["crm"].breaker.status == "closed"  # … the sink is not blamed
        detail = await d.store.delivery(1)
        assert detail is not None and detail.attempts == 0  # … and the outage spent no attempt
        payload = {"type": "customer.updated", "entity": "Customer", "id": "58"}
        assert (await post_signed(s, hook_url(d, "qbo"), payload, "fine"))[0] == 200
        await wait_for(lambda: len(read_jsonl(tmp_path / "crm.jsonl")) == 1)
    [line] = read_jsonl(tmp_path / "crm.jsonl")
    assert line["data"]["object"]["Id"] == "58"
