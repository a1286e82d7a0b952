"""Shared set-up for the HubSpot tests: a running fake and a configured connector."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from integrand_hubspot import HubSpotConfig, HubSpotConnector
from integrand_hubspot.fake import FakeHubSpot

from integrand.connector import ConnectorContext, HttpPool
from integrand.testing import running_daemon
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


def running(config: Path) -> AbstractAsyncContextManager[Any]:
    """The daemon in this event loop on ``config`` until the block ends."""
    return running_daemon(config)


def daemon_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
shutdown_grace = "5s"

[admin]
enabled = false

[dispatcher.retry]
base = "50ms"
cap = "1s"
"""
        + body
    )
    return path
