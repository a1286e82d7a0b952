"""integrand's connector contract suite, run against the HubSpot fake."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest
from integrand_hubspot import HubSpotConnector
from integrand_hubspot.fake import FakeHubSpot

from integrand.connector import Event
from integrand.testing import ConnectorContract


class TestHubSpotContract(ConnectorContract):
    connector_class = HubSpotConnector

    @pytest.fixture
    async def fake_api(self) -> AsyncIterator[FakeHubSpot]:
        fake = FakeHubSpot()
        await fake.start()
        for i in range(3):
            fake.put("contacts", {"email": f"contract{i}@x.com", "firstname": f"C{i}"})
        try:
            yield fake
        finally:
            await fake.stop()

    @pytest.fixture
    def connector_config(self, fake_api: FakeHubSpot) -> Mapping[str, Any]:
        return {
            "access_token": fake_api.private_token,
            "client_secret": fake_api.client_secret,
            "api_base": fake_api.url,
            "webhook_url": "http://127.0.0.1:8080/hooks/contract",
            "initial_lookback": 600,
        }

    @pytest.fixture
    def webhook_body(self, fake_api: FakeHubSpot) -> bytes:
        import orjson

        return orjson.dumps(fake_api.pending)

    @pytest.fixture
    def sink_events(self) -> Sequence[Event]:
        return [
            Event(id="h-1", source="contract-src", type="customer.created", data={"email": "w@x.com", "firstname": "W"})
        ]

    @pytest.fixture
    def thin_event(self, fake_api: FakeHubSpot) -> Event:
        oid = next(iter(fake_api.objects["contacts"]))
        data = {"subscriptionType": "contact.propertyChange", "objectId": int(oid)}
        return Event(
            id="t-1", source="contract", type="contact.propertyChange", data=data, entity="contact", entity_id=oid
        )

    @pytest.fixture
    def api_faults(self, fake_api: FakeHubSpot) -> Callable[[int | None, dict[str, str]], None]:
        return fake_api.fail_with

    @pytest.fixture
    def request_id_header(self) -> str:
        return "X-HubSpot-Correlation-Id"
