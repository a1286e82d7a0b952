"""Shared set-up for the Salesforce tests: a running fake org, a real SQLite store, a started connector."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integrand_salesforce import SalesforceConfig, SalesforceConnector
from integrand_salesforce.testing import RunningFake, fake_salesforce

from integrand.app import ScopedState
from integrand.connector import ConnectorContext, HttpPool
from integrand.store import Store


@dataclass
class Env:
    sf: RunningFake
    store: Store
    tmp_path: Path
    pool: HttpPool

    @property
    def fake(self) -> Any:
        return self.sf.fake

    async def connector(
        self, name: str = "sf", auth: str = "jwt", *, role: str = "source", **extra: Any
    ) -> SalesforceConnector:
        cfg = SalesforceConfig.model_validate(self.sf.table(auth, **extra))
        ctx = ConnectorContext(
            name=name,
            role=role,  # type: ignore[arg-type]
            base_dir=self.tmp_path,
            state=ScopedState(self.store, f"{role}:{name}"),
            http=self.pool.for_connector(logging.getLogger(f"integrand.{role}.{name}.http")),
            clock=self.fake.clock,
        )
        conn = SalesforceConnector(cfg, ctx)
        await conn.start()
        return conn


@asynccontextmanager
async def sf_env(tmp_path: Path, **fake_kw: Any) -> AsyncIterator[Env]:
    async with fake_salesforce(**fake_kw) as sf:
        store = Store(tmp_path / "integrand.db")
        await store.open()
        pool = HttpPool(timeout=10.0)
        await pool.start()
        try:
            yield Env(sf, store, tmp_path, pool)
        finally:
            await pool.close()
            await store.close()
