"""``[store] backend = "postgres"``: the config keys, and real ``integrand run`` nodes on one database."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from integrand.config import load_config
from integrand.errors import ConfigError

from .daemon_proc import DaemonProcess, jsonl_ids, send_many
from .helpers import BASE, DEMO, wait_for, write_config
from .pgdb import fresh_schema

PG_STORE = '\n[store]\nbackend = "postgres"\ndsn = {env = "INTEGRAND_TEST_STORE_DSN"}\n'

NODE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "5s"

[admin]
enabled = false

[dispatcher]
workers = 4
"""


def test_a_postgres_store_needs_a_dsn_by_reference(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, DEMO + '\n[store]\nbackend = "postgres"\n', BASE))
    assert 'store.dsn: required when store.backend = "postgres"' in str(err.value)


def test_a_postgres_dsn_must_be_a_postgresql_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRAND_TEST_STORE_DSN", "mysql://root:pw-secret@db/x")
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, DEMO + PG_STORE, BASE))
    assert "store.dsn: expected a postgresql:// URL (from env:INTEGRAND_TEST_STORE_DSN)" in str(err.value)
    assert "pw-secret" not in str(err.value)


def test_a_dsn_is_never_given_inline(tmp_path: Path) -> None:
    body = DEMO + '\n[store]\nbackend = "postgres"\ndsn = "postgresql://postgres@127.0.0.1/x"\n'
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, body, BASE))
    assert "store.dsn: give it by reference" in str(err.value)


def test_a_dsn_without_the_postgres_backend_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRAND_TEST_STORE_DSN", "postgresql://postgres@127.0.0.1/x")
    body = DEMO + '\n[store]\ndsn = {env = "INTEGRAND_TEST_STORE_DSN"}\n'
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, body, BASE))
    assert 'store.dsn: only used with store.backend = "postgres"' in str(err.value)


async def test_two_nodes_on_one_database_deliver_every_webhook_once(
    tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Webhooks spread over two `integrand run` nodes sharing a PostgreSQL store: every acknowledged one
    reaches a sink exactly once (at one node's jsonl file or the other's), and both nodes stop cleanly."""
    schema = await fresh_schema(pg_database)
    monkeypatch.setenv("INTEGRAND_TEST_STORE_DSN", f"{pg_database}?search_path={schema}")
    nodes = []
    for name in ("n1", "n2"):
        (tmp_path / name).mkdir()
        nodes.append(DaemonProcess(write_config(tmp_path / name, DEMO + PG_STORE, NODE), tmp_path / f"{name}.log"))
    ids = [f"msg_{i:04d}" for i in range(600)]
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        results = await asyncio.gather(
            send_many(nodes[0].url(), ids[0::2], concurrency=16), send_many(nodes[1].url(), ids[1::2], concurrency=16)
        )
        acked = results[0][0] | results[1][0]
        assert acked == set(ids), f"{len(set(ids) - acked)} webhooks were refused"

        def delivered() -> Counter[str]:
            return Counter(
                jsonl_ids(tmp_path / "n1" / "var" / "out.jsonl") + jsonl_ids(tmp_path / "n2" / "var" / "out.jsonl")
            )

        await wait_for(lambda: set(delivered()) >= set(ids), timeout=60, interval=0.1)
        for n in nodes:
            n.signal(signal.SIGTERM)
        assert [await n.wait() for n in nodes] == [0, 0]
        assert max(delivered().values()) == 1, "a webhook was delivered twice"
        conn = await asyncpg.connect(pg_database, server_settings={"search_path": schema})
        try:
            rows = await conn.fetch("SELECT state, count(*) FROM deliveries GROUP BY state")
            states = {r[0]: r[1] for r in rows}
        finally:
            await conn.close()
        assert states == {"done": len(ids)}
        assert "postgresql://127.0.0.1:5432/" in nodes[0].output()  # the store it runs on, without secrets
    finally:
        for n in nodes:
            await n.kill()
