"""Routes at delivery time in the running daemon: enrich through the source's fetch, map, dead-letter what cannot map."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from integrand.config import load_config
from integrand.testing import fake_api_server

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
