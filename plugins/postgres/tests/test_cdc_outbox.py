"""CDC in outbox mode against a real server: install/uninstall, changes made while integrand was down,
several tables in one transaction in order, the outbox emptied only after the store's commit, kill -9."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from pg_support import Daemon, Schema, cli

from integrand.store import Store
from integrand.testing import daemon_config, running_daemon, wait_for

APP = """
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE orders (id bigint PRIMARY KEY, customer int, total numeric(10,2), note text);
"""


def config(tmp_path: Path, schema: Schema, extra: str = "") -> Path:
    return daemon_config(
        tmp_path,
        f"""
[sources.app]
connector = "postgres-cdc"
dsn = "{schema.dsn}"
tables = ["customers", "orders"]
poll_interval = "5s"
{extra}

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"
fsync = false

[[routes]]
from = "app"
to = ["out"]
""",
    )


def lines(tmp_path: Path) -> list[dict[str, Any]]:
    p = tmp_path / "var" / "out.jsonl"
    return [orjson.loads(x) for x in p.read_bytes().splitlines()] if p.exists() else []


async def outbox_count(schema: Schema) -> int:
    return int(await schema.fetchval("SELECT count(*) FROM integrand_outbox_app"))


def outbox_empty(schema: Schema) -> Any:
    async def check() -> bool:
        return await outbox_count(schema) == 0

    return check


async def test_install_then_changes_made_while_down_arrive_in_commit_order(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(APP)
    cfg = config(tmp_path, schema)
    done = cli(cfg, "postgres", "install", "app")
    assert done.returncode == 0, done.stderr
    assert f"installed: outbox {schema.name}.integrand_outbox_app" not in done.stdout  # unqualified config
    assert "installed: trigger integrand_cdc_app on customers" in done.stdout
    # integrand is not running: these must wait in the outbox.
    con = await schema.connect()
    try:
        async with con.transaction():
            await con.execute("INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com')")
            await con.execute("INSERT INTO orders VALUES (10, 1, 99.50, $1)", "x" * 9000)  # > a NOTIFY payload
            await con.execute("UPDATE customers SET email = 'ada@lovelace.org' WHERE id = 1")
        async with con.transaction():
            await con.execute("DELETE FROM orders WHERE id = 10")
            await con.execute("INSERT INTO customers VALUES (2, 'Grace', NULL)")
    finally:
        await con.close()
    assert await outbox_count(schema) == 5

    async with running_daemon(cfg):
        await wait_for(lambda: len(lines(tmp_path)) == 5, timeout=20)
        await wait_for(outbox_empty(schema), timeout=10)  # deleted once stored
        # A change while running: the NOTIFY wakes the listener well before the 5 s safety poll.
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await schema.execute("UPDATE customers SET name = 'Grace Hopper' WHERE id = 2")
        await wait_for(lambda: len(lines(tmp_path)) == 6, timeout=4)
        assert loop.time() - t0 < 4
    # Stored in commit order (the sink sees per-row order; rows of different entities may interleave).
    store = Store(tmp_path / "var" / "integrand.db", role="client")
    await store.open()
    try:
        stored = []
        for i in range(1, 7):
            d = await store.delivery(i)
            assert d is not None
            stored.append(d.event.to_dict())
        position = await store.cursor_get("app", "stream")
    finally:
        await store.close()
    assert sorted(e["id"] for e in lines(tmp_path)) == sorted(e["id"] for e in stored)
    got = stored
    assert [(e["type"], e["entity"].split(".")[1], e["entity_id"]) for e in got] == [
        ("customers.created", "customers", "1"),
        ("orders.created", "orders", "10"),
        ("customers.updated", "customers", "1"),
        ("orders.deleted", "orders", "10"),
        ("customers.created", "customers", "2"),
        ("customers.updated", "customers", "2"),
    ]
    upd = got[2]["data"]
    assert upd["op"] == "u"
    assert upd["before"]["email"] == "ada@example.com" and upd["after"]["email"] == "ada@lovelace.org"
    assert got[3]["data"]["op"] == "d" and got[3]["data"]["after"] is None and got[3]["data"]["before"]["id"] == 10
    assert len(got[1]["data"]["after"]["note"]) == 9000
    src = got[0]["data"]["source"]
    assert src["table"] == "customers" and src["schema"] == schema.name and src["mode"] == "outbox"
    assert src["txId"] == got[1]["data"]["source"]["txId"] == got[2]["data"]["source"]["txId"]
    assert src["txId"] != got[3]["data"]["source"]["txId"]
    assert isinstance(src["ts_ms"], int) and isinstance(got[0]["data"]["ts_ms"], int)
    versions = [e["version"] for e in got]
    assert versions == sorted(versions)
    assert position == got[-1]["data"]["source"]["outbox_id"]  # the committed position: the last id stored

    done = cli(cfg, "postgres", "uninstall", "app")
    assert done.returncode == 0, done.stderr
    assert await schema.fetchval("SELECT to_regclass('integrand_outbox_app')") is None
    assert await schema.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = 'integrand_cdc_app'") == 0


async def test_a_source_without_its_outbox_says_how_to_install_it(schema: Schema, tmp_path: Path) -> None:
    from integrand_postgres import PostgresSource

    from integrand.connector import PositionLost
    from integrand.testing import running_connector, temp_store

    await schema.execute(APP)
    async with (
        temp_store(tmp_path / "s.db") as store,
        running_connector(
            PostgresSource, {"dsn": schema.dsn, "tables": ["customers"]}, store, base_dir=tmp_path, name="app"
        ) as src,
    ):
        assert isinstance(src, PostgresSource)
        gen = src.stream(None)
        with pytest.raises(PositionLost, match="integrand postgres install app"):
            await anext(gen)


async def test_read_ahead_skips_the_rows_in_flight_and_finds_a_late_commit(schema: Schema, tmp_path: Path) -> None:
    """Read ahead (integrand asks for the next batch before the last one is stored), the outbox is read past the
    rows in flight, and a transaction that took a lower id but committed later is still found."""
    from integrand_postgres import PostgresSource

    from integrand.testing import running_connector, temp_store

    await schema.execute(APP)
    assert cli(config(tmp_path, schema), "postgres", "install", "app").returncode == 0
    con, late = await schema.connect(), await schema.connect()
    opts = {"dsn": schema.dsn, "tables": ["customers", "orders"], "batch_size": 10, "poll_interval": "5s"}
    try:
        async with (
            temp_store(tmp_path / "s.db") as store,
            running_connector(PostgresSource, opts, store, base_dir=tmp_path, name="app") as src,
        ):
            assert isinstance(src, PostgresSource) and src.read_ahead > 0
            tx = late.transaction()
            await tx.start()
            await late.execute("INSERT INTO customers VALUES (999, 'late', NULL)")  # the lowest outbox id
            for i in range(25):
                await con.execute("INSERT INTO customers VALUES ($1, $2, NULL)", i, f"c{i}")
            gen = src.stream(None)
            try:
                read = [await anext(gen) for _ in range(3)]  # none acknowledged yet
                assert [e.entity_id for b in read for e in b.events] == [str(i) for i in range(25)]
                await tx.commit()  # its NOTIFY wakes the reader well before the 5 s poll
                b4 = await asyncio.wait_for(anext(gen), 4)
                assert [e.entity_id for e in b4.events] == ["999"]
                assert [b.position for b in [*read, b4]] == sorted(b.position for b in [*read, b4])
                for b in [*read, b4]:
                    await src.ack(b)
                assert await outbox_count(schema) == 0
            finally:
                await gen.aclose()  # type: ignore[attr-defined]  # an async generator
    finally:
        await con.close()
        await late.close()


async def test_kill9_mid_stream_loses_nothing_and_stores_nothing_twice(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(APP)
    cfg = config(tmp_path, schema, "batch_size = 20")
    assert cli(cfg, "postgres", "install", "app").returncode == 0
    d = Daemon(cfg)
    d.start()
    n = 400
    try:
        await wait_for(d.ready, timeout=30)
        con = await schema.connect()
        try:
            for i in range(n):
                await con.execute("INSERT INTO customers VALUES ($1, $2, NULL)", i, f"c{i}")
                if i == n // 2:
                    await wait_for(lambda: len(lines(tmp_path)) > 0, timeout=20)
                    d.kill()  # mid-stream: some changes stored, some read and not yet stored, some not read
            left = await outbox_count(schema)
            assert left > 0  # the rest waits for integrand
            d.start()
            await wait_for(d.ready, timeout=30)
            await wait_for(outbox_empty(schema), timeout=30)
            await wait_for(lambda: len({e["entity_id"] for e in lines(tmp_path)}) == n, timeout=30)
        finally:
            await con.close()
    finally:
        assert d.stop() == 0
    store = Store(tmp_path / "var" / "integrand.db", role="client")
    await store.open()
    try:
        assert await store.event_count() == n  # each change stored once
        versions = []
        for i in range(1, n + 1):
            row = await store.delivery(i)
            assert row is not None
            versions.append(row.event.version or "")
        assert versions == sorted(versions)  # stored in the order the inserts committed
        assert await store.cursor_get("app", "stream") == max(e["data"]["source"]["outbox_id"] for e in lines(tmp_path))
    finally:
        await store.close()
    assert sorted({e["entity_id"] for e in lines(tmp_path)}, key=int) == [str(i) for i in range(n)]
