"""Shared set-up for the HubSpot tests: a running fake and a configured connector."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from integrand_hubspot import HubSpotConfig, HubSpotConnector
from integrand_hubspot.fake import FakeHubSpot

from integrand.connector import ConnectorContext, HttpPool
from integrand.testing import wait_for as wait_for  # re-exported for the tests


class _Memory:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    async def get(self, key: str) -> Any:
        return self.data.get(key)

    async def set(self, key: str, value: Any) -> None:
        self.data[key] = value


@asynccontextmanager
async def hubspot(
    tmp_path: Path, fake_kw: dict[str, Any] | None = None, **overrides: Any
) -> AsyncIterator[tuple[FakeHubSpot, HubSpotConnector]]:
    fake = FakeHubSpot(**(fake_kw or {}))
    await fake.start()
    config: dict[str, Any] = {
        "access_token": fake.private_token,
        "client_secret": fake.client_secret,
        "api_base": fake.url,
        "token_url": fake.url + "/oauth/v1/token",
        "webhook_url": "https://integrand.example.com/hooks/hubspot",
    }
    config.update(overrides)
    pool = HttpPool(timeout=10.0)  # what the daemon shares between connectors
    http = pool.for_connector(logging.getLogger("integrand.source.hubspot.http"))
    conn = HubSpotConnector(
        HubSpotConfig.model_validate(config),
        ConnectorContext(name="hubspot", role="source", base_dir=tmp_path, state=_Memory(), http=http),
    )
    await conn.start()
    try:
        yield fake, conn
    finally:
        await conn.close()
        await pool.close()
        await fake.stop()
