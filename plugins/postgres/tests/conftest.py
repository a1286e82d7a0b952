"""Fixtures: a random schema on the machine's PostgreSQL per test; a session-wide logical-replication cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from pg_support import Cluster, Schema, logical_cluster, random_schema


@pytest_asyncio.fixture
async def schema() -> AsyncIterator[Schema]:
    async with random_schema() as s:
        yield s


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with logical_cluster() as c:
        yield c


@pytest_asyncio.fixture
async def logical_schema(cluster: Cluster) -> AsyncIterator[Schema]:
    async with random_schema(cluster.dsn) as s:
        yield s
