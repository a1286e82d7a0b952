"""The connector kit's contract suite against the fake org."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest
from integrand_salesforce import SalesforceConnector
from integrand_salesforce.fake import Fault
from integrand_salesforce.testing import RunningFake, fake_salesforce

from integrand.connector import Event
from integrand.testing import ConnectorContract, FakeClock


class TestSalesforceContract(ConnectorContract):
    connector_class = SalesforceConnector

    @pytest.fixture
    async def fake_api(self, fake_clock: FakeClock) -> AsyncIterator[RunningFake]:
        async with fake_salesforce(clock=fake_clock, page_size=200) as sf:
            for i in range(450):
                sf.fake.create("Account", Name=f"Acme {i}", ExtId__c=f"A-{i}")
            sf.fake.create("Contact", LastName="Lee", Email="lee@example.com")
            yield sf

    @pytest.fixture
    def connector_config(self, fake_api: RunningFake) -> Mapping[str, Any]:
        # initial_lookback covers the records created above (the fake's clock is the suite's).
        return fake_api.table(
            "jwt",
            object="Account",
            external_id_field="ExtId__c",
            initial_lookback="1d",
            fields={"Account": ["Name", "ExtId__c"]},
        )

    @pytest.fixture
    def sink_events(self) -> Sequence[Event]:
        return [
            Event(id="c-1", source="crm", type="customer.updated", data={"ExtId__c": "C-1", "Name": "Contoso"}),
            Event(id="c-2", source="crm", type="customer.updated", data={"ExtId__c": "A-3", "Name": "Acme renamed"}),
        ]

    @pytest.fixture
    def api_faults(self, fake_api: RunningFake) -> Callable[[int | None, dict[str, str]], None]:
        def fail(status: int | None, headers: dict[str, str]) -> None:
            fake_api.fake.faults.clear()
            if status is not None:
                fake_api.fake.faults.append(Fault(status, 10**9, None, headers))

        return fail

    @pytest.fixture
    def thin_event(self, fake_api: RunningFake) -> Event:
        rec = fake_api.fake.find("Account", "ExtId__c", "A-7")[0]
        return Event(
            id="om-1",
            source="contract",
            type="account.updated",
            data={"Id": rec["Id"]},
            entity="Account",
            entity_id=rec["Id"],
        )
