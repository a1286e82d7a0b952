"""``integrand cursor set`` on a cluster: only the node running the source writes its cursor, under its fence.

A write through another node (or through the CLI on the shared store with no daemon beside it) would be
overwritten by the owner's next poll commit, or land between a takeover's read and its first commit, so
it is refused with the node to ask instead; through the owner it is applied and the next poll uses it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import orjson
import pytest

from integrand.testing import DaemonProcess

from .cluster_harness import Cluster, fresh_database
from .helpers import wait_for


async def _cli(node: DaemonProcess, config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "integrand.cli", *args, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **node.env},
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.timeout(240)
async def test_cursor_set_is_refused_off_the_owner_and_applied_fenced_on_it(tmp_path: Path) -> None:
    async with fresh_database() as dsn:
        c = Cluster(tmp_path, dsn, nodes=2, sources=1, ttl=3.0, seed=11, admin=True)
        api = c.apis[0]
        try:
            await c.start()
            assert c.db is not None
            db = c.db
            await wait_for(lambda: len(api.asked) >= 3, timeout=30)

            async def holder() -> str | None:
                owner: str | None = await db.fetchval(
                    "SELECT owner FROM leases WHERE name = 'source:crm0' AND expires_at > integrand_now()"
                )
                return owner

            owner_id = await holder()
            assert owner_id is not None
            owner = next(n for n in c.nodes if c.node_id(n) == owner_id)
            other = next(n for n in c.nodes if n is not owner)
            value = '{"since": "2026-01-01T00:00:00Z", "page": null}'

            # Through the node that does not run it: refused, naming the node that does; nothing written.
            before = await db.fetchval("SELECT value FROM cursors WHERE source = 'crm0' AND kind = 'poll'")
            code, out, err = await _cli(other, other.config, "cursor", "set", "crm0", value)
            assert code == 1, (out, err)
            assert f"source 'crm0' is run by node {owner_id}: set its cursor there" in err
            assert "Traceback" not in err
            after = await db.fetchval("SELECT value FROM cursors WHERE source = 'crm0' AND kind = 'poll'")
            assert orjson.loads(after).get("since") != "2026-01-01T00:00:00Z"
            assert before is not None

            # The CLI on the shared store with no daemon beside it (another host's config): refused too.
            lone = tmp_path / "lone"
            lone.mkdir()
            shutil.copy(other.config, lone / "config.toml")
            code, out, err = await _cli(other, lone / "config.toml", "cursor", "set", "crm0", value)
            assert code == 1, (out, err)
            assert f"source 'crm0' is run by node {owner_id}" in err

            async def ours_written() -> int:
                n: int = await db.fetchval(
                    "SELECT count(*) FROM cursor_log WHERE source = 'crm0' "
                    "AND convert_from(value, 'UTF8') LIKE '%2026-01-01T00:00:00Z%'"
                )
                return n

            assert await ours_written() == 0  # neither refused write reached the store

            # Through the owner: applied (under its lease's fence), and a poll follows at once.
            asked = len(api.asked)
            code, out, err = await _cli(owner, owner.config, "cursor", "set", "crm0", value)
            assert code == 0, (out, err)
            assert 'cursor of crm0 set to {"since":"2026-01-01T00:00:00Z","page":null}' in out
            assert await ours_written() >= 1  # ours (a poll from it may commit the same `since` again)
            await wait_for(lambda: len(api.asked) > asked, timeout=30)  # nudged: it polls from the new cursor
        finally:
            await c.close()
