"""Connector state: a small key/value table per scope (tokens, a connector's own bookkeeping, the loop guard's memory).

Each ``state_set`` is its own op, committed (group commit) before it returns.
"""

from __future__ import annotations

from typing import Any

import orjson

from .engine import Conn, Engine


class ConnectorState(Engine):
    """``state_get`` reads; ``state_set`` returns once committed."""

    async def state_get(self, scope: str, key: str) -> Any:
        async with self._read().execute("SELECT value FROM state WHERE scope = ? AND key = ?", (scope, key)) as cur:
            row = await cur.fetchone()
        return orjson.loads(row[0]) if row else None

    async def state_set(self, scope: str, key: str, value: Any) -> None:
        blob = orjson.dumps(value)

        async def op(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO state (scope, key, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (scope, key, blob, self.clock()),
            )

        await self._submit(op)
