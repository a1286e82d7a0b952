"""integrand's connector contract suite, run against the QuickBooks fake."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest
from integrand_quickbooks import QuickBooksConnector
from integrand_quickbooks.fake import FakeQuickBooks
from qbo_support import TOKEN_KEY

from integrand.connector import Event
from integrand.testing import ConnectorContract


class TestQuickBooksContract(ConnectorContract):
    connector_class = QuickBooksConnector

    @pytest.fixture
    async def fake_api(self) -> AsyncIterator[FakeQuickBooks]:
        fake = FakeQuickBooks()
        await fake.start()
        for i in range(3):
            fake.create("Customer", {"DisplayName": f"Contract {i}"})
        try:
            yield fake
        finally:
            await fake.stop()

    @pytest.fixture
    def connector_config(self, fake_api: FakeQuickBooks) -> Mapping[str, Any]:
        return {
            "realm_id": fake_api.realm_id,
            "client_id": fake_api.client_id,
            "client_secret": fake_api.client_secret,
            "verifier_token": fake_api.verifier_token,
            "token_key": TOKEN_KEY,
            "refresh_token": fake_api.issue_refresh_token(),
            "api_base": fake_api.url,
            "token_url": fake_api.url + "/oauth2/v1/tokens/bearer",
            "entities": ["Customer"],
            "initial_lookback": 600,
            "entity": "Customer",
        }

    @pytest.fixture
    def webhook_body(self, fake_api: FakeQuickBooks) -> bytes:
        return fake_api.webhook_body(list(fake_api.pending))

    @pytest.fixture
    def sink_events(self) -> Sequence[Event]:
        return [Event(id="c-1", source="contract-src", type="customer.created", data={"DisplayName": "Written Co"})]

    @pytest.fixture
    def thin_event(self, fake_api: FakeQuickBooks) -> Event:
        data = {"realm": fake_api.realm_id, "entity": "Customer", "id": "1", "operation": "Update"}
        return Event(id="t-1", source="contract", type="customer.updated", data=data, entity="Customer", entity_id="1")

    @pytest.fixture
    def api_faults(self, fake_api: FakeQuickBooks) -> Callable[[int | None, dict[str, str]], None]:
        return fake_api.fail_with

    @pytest.fixture
    def request_id_header(self) -> str:
        return "intuit_tid"
