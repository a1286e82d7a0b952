"""integrand's connector contract suite against the postgres sink on a real table."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest
from integrand_postgres import PostgresSink
from pg_support import Schema, random_schema

from integrand.connector import Event
from integrand.testing import ConnectorContract


class TestPostgresSinkContract(ConnectorContract):
    connector_class = PostgresSink

    @pytest.fixture
    async def fake_api(self) -> AsyncIterator[Schema]:
        async with random_schema() as s:
            await s.execute(
                "CREATE TABLE t (id text PRIMARY KEY, name text, etl_loaded_at timestamptz NOT NULL DEFAULT now(), "
                "etl_source text, etl_version text, etl_event_id text, deleted_at timestamptz)"
            )
            yield s

    @pytest.fixture
    def connector_config(self, fake_api: Schema) -> Mapping[str, Any]:
        return {"dsn": fake_api.dsn, "table": "t", "key": "id", "columns": {"id": "entity_id", "name": "data.name"}}

    @pytest.fixture
    def sink_events(self) -> Sequence[Event]:
        return [
            Event(
                id=f"e{i}",
                source="s",
                type="thing.updated",
                entity="thing",
                entity_id=str(i),
                version="1",
                data={"name": f"n{i}"},
            )
            for i in range(5)
        ]
