"""CDC in logical replication mode on a private wal_level=logical server: commit order across tables, the slot
confirmed only after the store's commit, changes made while down, kill -9, a dropped slot → a reported full resync."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import orjson
from pg_support import Daemon, Schema, cli

from integrand.store import Store
from integrand.testing import daemon_config, running_daemon, wait_for

APP = """
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text, vip boolean, meta jsonb);
CREATE TABLE orders (id bigint PRIMARY KEY, customer int, total numeric(10,2));
"""


def config(tmp_path: Path, schema: Schema, slot: str, extra: str = "") -> Path:
    return daemon_config(
        tmp_path,
        f"""
[sources.app]
connector = "postgres-cdc"
mode = "logical"
dsn = "{schema.dsn}"
tables = ["customers", "orders"]
slot = "{slot}"
publication = "{slot}"
poll_interval = "20ms"
lag_every = "200ms"
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


async def stored(tmp_path: Path) -> tuple[list[dict[str, Any]], Any]:
    store = Store(tmp_path / "var" / "integrand.db", role="client")
    await store.open()
    try:
        out = []
        i = 1
        while (d := await store.delivery(i)) is not None:
            out.append(d.event.to_dict())
            i += 1
        return out, await store.cursor_get("app", "stream")
    finally:
        await store.close()


async def confirmed(schema: Schema, slot: str) -> int:
    from integrand_postgres.pgoutput import lsn_int

    text = await schema.fetchval(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot
    )
    return lsn_int(text)


async def cleanup(schema: Schema, slot: str) -> None:
    con = await schema.connect()
    try:
        await wait_for(lambda: _drop(con, slot), timeout=10)
        await con.execute(f"DROP PUBLICATION IF EXISTS {slot}")
    finally:
        await con.close()


async def _drop(con: asyncpg.Connection, slot: str) -> bool:
    """What an operator does to drop a slot in use: end the walsender that holds it, then drop it."""
    try:
        await con.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active", slot
        )
        await con.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slot
        )
    except asyncpg.ObjectInUseError:
        return False  # the walsender has not exited yet, or integrand reconnected meanwhile: again
    return True


async def test_changes_while_down_arrive_in_commit_order_and_the_slot_follows_the_store(
    logical_schema: Schema, tmp_path: Path
) -> None:
    schema, slot = logical_schema, logical_schema.name
    await schema.execute(APP)
    cfg = config(tmp_path, schema, slot)
    done = cli(cfg, "postgres", "install", "app")
    assert done.returncode == 0, done.stderr
    assert f"installed: replication slot {slot} (pgoutput)" in done.stdout
    try:
        con = await schema.connect()
        try:
            async with con.transaction():
                await con.execute("INSERT INTO customers VALUES (1, 'Ada', 'a@x', true, '{\"k\": [1]}')")
                await con.execute("INSERT INTO orders VALUES (10, 1, 99.50)")
                await con.execute("UPDATE customers SET email = 'ada@x' WHERE id = 1")
            async with con.transaction():
                await con.execute("DELETE FROM orders WHERE id = 10")
                await con.execute("INSERT INTO customers VALUES (2, 'Grace', NULL, false, NULL)")
        finally:
            await con.close()
        async with running_daemon(cfg) as d:
            await wait_for(lambda: len(lines(tmp_path)) == 5, timeout=20)
            events, position = await stored(tmp_path)
            await wait_for(lambda: _equals(confirmed(schema, slot), position), timeout=10)
            lag = d.metrics.registry.get_sample_value("integrand_stream_lag", {"source": "app"})
            assert lag is not None and lag >= 0  # the slot's unconfirmed WAL, as a metric
        assert [(e["type"], e["entity_id"]) for e in events] == [
            ("customers.created", "1"),
            ("orders.created", "10"),
            ("customers.updated", "1"),
            ("orders.deleted", "10"),
            ("customers.created", "2"),
        ]
        first = events[0]["data"]
        assert first["after"] == {"id": 1, "name": "Ada", "email": "a@x", "vip": True, "meta": {"k": [1]}}
        assert events[1]["data"]["after"]["total"] == 99.5
        assert events[3]["data"]["before"] == {"id": 10, "customer": None, "total": None}  # replica identity: the key
        src = first["source"]
        assert src["mode"] == "logical" and src["table"] == "customers" and src["lsn"]
        assert src["txId"] == events[2]["data"]["source"]["txId"] != events[3]["data"]["source"]["txId"]
        assert [e["version"] for e in events] == sorted(e["version"] for e in events)
    finally:
        await cleanup(schema, slot)


async def _equals(a: Any, b: Any) -> bool:
    return bool(await a == b)


async def test_a_change_still_on_its_way_from_the_replication_thread_is_not_skipped(
    logical_schema: Schema, tmp_path: Path, monkeypatch: Any
) -> None:
    """The replication thread has read a change and the server's WAL end past it, but has not handed the
    change over yet (a busy machine preempts it there): an idle stream must not move the slot past it."""
    import time as _time

    from integrand_postgres import walsender

    schema, slot = logical_schema, logical_schema.name
    await schema.execute(APP)
    cfg = config(tmp_path, schema, slot)
    assert cli(cfg, "postgres", "install", "app").returncode == 0
    real = walsender.WalReader._hand_over
    delayed: list[int] = []

    def slow_hand_over(self: Any, item: Any) -> bool:
        if isinstance(item, list) and item and not delayed:
            delayed.append(1)
            _time.sleep(2.5)  # in the thread: longer than the stream's idle advance (1 s)
        return real(self, item)

    monkeypatch.setattr(walsender.WalReader, "_hand_over", slow_hand_over)
    try:
        async with running_daemon(cfg):
            await wait_for(lambda: (tmp_path / "var" / "integrand.db").exists(), timeout=10)
            await _quiet_for(1.5)  # idle: the next advance is due as soon as the WAL end moves
            await schema.execute("INSERT INTO customers VALUES (7, 'late', NULL, NULL, NULL)")
            await wait_for(lambda: len(lines(tmp_path)) == 1, timeout=20)
        assert delayed == [1]
        events, _ = await stored(tmp_path)
        assert [(e["type"], e["entity_id"]) for e in events] == [("customers.created", "7")]
    finally:
        await cleanup(schema, slot)


async def _quiet_for(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)  # letting time pass is the scenario here (an idle stream), not a race fix


async def test_a_dropped_slot_is_reported_and_followed_by_a_full_resync(
    logical_schema: Schema, tmp_path: Path, caplog: Any
) -> None:
    schema, slot = logical_schema, logical_schema.name
    await schema.execute(APP)
    await schema.execute("INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 30) g")
    cfg = config(tmp_path, schema, slot, "batch_size = 7")
    assert cli(cfg, "postgres", "install", "app").returncode == 0
    try:
        async with running_daemon(cfg):
            await schema.execute("INSERT INTO orders VALUES (1, 1, 5)")
            await wait_for(lambda: len(lines(tmp_path)) == 1, timeout=20)
            con = await schema.connect()
            try:
                await wait_for(lambda: _drop(con, slot), timeout=10)  # an operator drops the slot
                await con.execute("UPDATE customers SET name = 'lost?' WHERE id = 3")  # while no slot exists
            finally:
                await con.close()
            # Reported, then every row is listed again (30 customers, 1 order), then streaming resumes.
            await wait_for(lambda: sum(e["data"]["op"] == "r" for e in lines(tmp_path)) == 31, timeout=30)
            await schema.execute("UPDATE customers SET name = 'after' WHERE id = 4")
            await wait_for(lambda: any(e["data"]["op"] == "u" for e in lines(tmp_path)), timeout=20)
        assert (
            "running the full resync" in caplog.text
            and f"replication slot {slot} does not exist (dropped?)" in caplog.text
        )
        snap = {
            e["entity_id"]: e for e in lines(tmp_path) if e["data"]["op"] == "r" and e["entity"].endswith("customers")
        }
        assert snap["3"]["data"]["after"]["name"] == "lost?"  # the change made while the slot was gone is in it
        assert all(e["data"]["source"]["snapshot"] for e in snap.values())
        upd = next(e for e in lines(tmp_path) if e["data"]["op"] == "u")
        assert upd["entity_id"] == "4" and upd["version"] > snap["4"]["version"]
    finally:
        await cleanup(schema, slot)


async def test_kill9_mid_stream_loses_nothing_and_stores_nothing_twice(logical_schema: Schema, tmp_path: Path) -> None:
    schema, slot = logical_schema, logical_schema.name
    await schema.execute(APP)
    cfg = config(tmp_path, schema, slot, "batch_size = 20")
    assert cli(cfg, "postgres", "install", "app").returncode == 0
    d = Daemon(cfg)
    d.start()
    n = 300
    try:
        await wait_for(d.ready, timeout=30)
        con = await schema.connect()
        try:
            for i in range(n):
                await con.execute("INSERT INTO customers VALUES ($1, $2)", i, f"c{i}")
                if i == n // 2:
                    await wait_for(lambda: len(lines(tmp_path)) > 0, timeout=20)
                    d.kill()
            d.start()
            await wait_for(d.ready, timeout=30)
            await wait_for(lambda: len({e["entity_id"] for e in lines(tmp_path)}) == n, timeout=30)
        finally:
            await con.close()
        events, position = await stored(tmp_path)
        await wait_for(lambda: _equals(confirmed(schema, slot), position), timeout=10)
    finally:
        assert d.stop() == 0
        await cleanup(schema, slot)
    assert [e["entity_id"] for e in events] == [str(i) for i in range(n)]  # once each, in commit order


async def test_a_slot_whose_wal_is_lost_is_reported_and_resynced(
    logical_schema: Schema, tmp_path: Path, caplog: Any
) -> None:
    schema, slot = logical_schema, logical_schema.name
    await schema.execute(APP)
    cfg = config(tmp_path, schema, slot)
    assert cli(cfg, "postgres", "install", "app").returncode == 0
    con = await schema.connect()
    try:
        # While integrand is stopped the slot falls more than max_slot_wal_keep_size behind and a checkpoint
        # removes the WAL it needed (this private server's setting; reset below).
        await con.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        await con.execute("SELECT pg_reload_conf()")
        for i in range(4):
            await con.execute("INSERT INTO customers VALUES ($1, 'while down')", i)
            await con.execute("SELECT pg_switch_wal()")
        await con.execute("CHECKPOINT")
        await con.execute("CHECKPOINT")
        status = await con.fetchval("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", slot)
        assert status == "lost"
        async with running_daemon(cfg):
            await wait_for(lambda: sum(e["data"]["op"] == "r" for e in lines(tmp_path)) == 4, timeout=30)
        assert "wal_status = lost" in caplog.text and "running the full resync" in caplog.text
        assert {e["entity_id"] for e in lines(tmp_path)} == {"0", "1", "2", "3"}
    finally:
        await con.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        await con.execute("SELECT pg_reload_conf()")
        await con.close()
        await cleanup(schema, slot)


async def test_a_truncate_becomes_one_truncated_event_per_table_in_commit_order(
    logical_schema: Schema, tmp_path: Path
) -> None:
    schema, slot = logical_schema, logical_schema.name
    await schema.execute(APP)
    cfg = config(tmp_path, schema, slot)
    assert cli(cfg, "postgres", "install", "app").returncode == 0
    try:
        async with running_daemon(cfg):
            con = await schema.connect()
            try:
                await con.execute("INSERT INTO customers VALUES (1, 'Ada')")
                await con.execute("INSERT INTO orders VALUES (10, 1, 5)")
                async with con.transaction():
                    await con.execute("TRUNCATE orders")
                    await con.execute("INSERT INTO orders VALUES (11, 1, 6)")
                await con.execute("TRUNCATE customers, orders RESTART IDENTITY")
            finally:
                await con.close()
            await wait_for(lambda: len(lines(tmp_path)) == 6, timeout=20)
        evs = lines(tmp_path)
        assert [(e["type"], e["entity_id"]) for e in evs] == [
            ("customers.created", "1"),
            ("orders.created", "10"),
            ("orders.truncated", None),
            ("orders.created", "11"),
            ("customers.truncated", None),
            ("orders.truncated", None),
        ]
        t = evs[2]
        assert t["entity"] == f"{schema.name}.orders"
        assert t["data"]["op"] == "t" and t["data"]["before"] is None and t["data"]["after"] is None
        assert t["data"]["truncate"] == {"cascade": False, "restart_identity": False}
        assert evs[4]["data"]["truncate"]["restart_identity"] is True
        assert evs[4]["data"]["source"]["txId"] == evs[5]["data"]["source"]["txId"]  # one statement, one transaction
        assert [e["version"] for e in evs] == sorted(e["version"] for e in evs)
    finally:
        await cleanup(schema, slot)
