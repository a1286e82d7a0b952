"""A PostgreSQL database of the test session's own on 127.0.0.1:5432 (trust auth, user postgres).

Created once per session with a random name and dropped at its end; each test gets a schema of its
own in it (``fresh_schema``), so tests never see each other's rows. An unreachable server fails the
test with how to start it (never a skip: the PostgreSQL backend would go untested unnoticed).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
START_HINT = "start PostgreSQL: pg_ctlcluster --skip-systemctl-redirect 15 main start"


async def _admin(sql: str) -> None:
    try:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as e:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is unreachable ({type(e).__name__}: {e}); {START_HINT}")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def session_database() -> Iterator[str]:
    """The body of the ``pg_database`` session fixture: yields the DSN of a new database, then drops it."""
    name = f"integrand_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def fresh_schema(dsn: str) -> str:
    """A new empty schema in the session's database, for one test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    return schema
