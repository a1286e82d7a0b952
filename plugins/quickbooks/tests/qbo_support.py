"""Shared set-up for the QuickBooks tests: a running fake, a real SQLite store, a configured connector."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integrand_quickbooks import QuickBooksConfig, QuickBooksConnector
from integrand_quickbooks.fake import FakeQuickBooks

from integrand.app import ScopedState
from integrand.connector import ConnectorContext, Http, HttpPool
from integrand.store import Store
from integrand.testing import wait_for as wait_for  # re-exported for the tests

# A fixed Fernet key for tests (32 url-safe base64 bytes), never used anywhere real.
TOKEN_KEY = "Jm6cgdGn1HBvYBMXFXoYzCAQzUrCBWFSrX8Ko-4f4nw="
OTHER_KEY = "qV1BvY9m3Q1a3aVFAsbNzyYQ8dTmx2t7yP9cS_JDe8o="


@dataclass
class Env:
    fake: FakeQuickBooks
    store: Store
    tmp_path: Path
    # One pool for every connector of the test, as the daemon shares one: same realm, same budget.
    pool: HttpPool

    def http(self, name: str) -> Http:
        return self.pool.for_connector(logging.getLogger(f"integrand.source.{name}.http"))

    def config(self, **overrides: Any) -> QuickBooksConfig:
        base: dict[str, Any] = {
            "realm_id": self.fake.realm_id,
            "client_id": self.fake.client_id,
            "client_secret": self.fake.client_secret,
            "verifier_token": self.fake.verifier_token,
            "token_key": TOKEN_KEY,
            "api_base": self.fake.url,
            "token_url": self.fake.url + "/oauth2/v1/tokens/bearer",
            "authorize_url": self.fake.url + "/connect/oauth2",
            "timeout": 10,
        }
        base.update(overrides)
        return QuickBooksConfig.model_validate(base)

    async def connector(self, name: str = "qbo", **overrides: Any) -> QuickBooksConnector:
        ctx = ConnectorContext(
            name=name, role="source", base_dir=self.tmp_path, state=ScopedState(self.store, name), http=self.http(name)
        )
        conn = QuickBooksConnector(self.config(**overrides), ctx)
        await conn.start()
        return conn


@asynccontextmanager
async def qbo_env(tmp_path: Path, **fake_kw: Any) -> AsyncIterator[Env]:
    fake = FakeQuickBooks(**fake_kw)
    await fake.start()
    store = Store(tmp_path / "integrand.db")
    await store.open()
    pool = HttpPool(timeout=10.0)
    await pool.start()
    try:
        yield Env(fake, store, tmp_path, pool)
    finally:
        await pool.close()
        await store.close()
        await fake.stop()


@asynccontextmanager
async def connected(env: Env, name: str = "qbo", **overrides: Any) -> AsyncIterator[QuickBooksConnector]:
    """A started connector bootstrapped with a refresh token the fake issued."""
    overrides.setdefault("refresh_token", env.fake.issue_refresh_token())
    conn = await env.connector(name, **overrides)
    try:
        yield conn
    finally:
        await conn.close()


def qbo_table(fake: FakeQuickBooks, extra: str = "") -> str:
    return f"""
connector = "quickbooks"
realm_id = "{fake.realm_id}"
client_id = "{fake.client_id}"
client_secret = "{fake.client_secret}"
verifier_token = "{fake.verifier_token}"
token_key = "{TOKEN_KEY}"
api_base = "{fake.url}"
token_url = "{fake.url}/oauth2/v1/tokens/bearer"
authorize_url = "{fake.url}/connect/oauth2"
timeout = "10s"
{extra}
"""
