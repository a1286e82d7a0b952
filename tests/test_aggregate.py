"""Aggregation on routes: windows by count and by time, per group, persisted across kill -9, deterministic."""

from __future__ import annotations

import random
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from integrand.aggregate import AggregateSettings, build_output
from integrand.errors import ConfigError
from integrand.testing import running_daemon, wait_for

from .daemon_proc import DaemonProcess
from .helpers import BASE, DEMO_SECRET, read_jsonl, settings_for, signed_headers, write_config

SOURCE = f"""
[sources.shop]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_field = "entity"
entity_id_field = "order"
type_field = "type"

[sinks.warehouse]
connector = "jsonl"
path = "var/warehouse.jsonl"

[sinks.raw]
connector = "jsonl"
path = "var/raw.jsonl"

[[routes]]
from = "shop"
to = ["raw"]
"""


def agg_route(**keys: Any) -> str:
    lines = "\n".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in keys.items())
    return f"""
[[routes]]
from = "shop"
to = ["warehouse"]
filter.type = ["line_item.*"]

[routes.aggregate]
{lines}
"""


async def post(session: aiohttp.ClientSession, url: str, i: int, order: str, amount: float) -> None:
    payload = {"type": "line_item.added", "entity": "order", "order": order, "amount": amount, "n": i}
    body = orjson.dumps(payload)
    async with session.post(url, data=body, headers=signed_headers(body, f"li{i}")) as r:
        assert r.status == 200, await r.text()


def aggregated(db: Path) -> int:
    """Deliveries the aggregator has taken into its window (done at its virtual sink)."""
    with sqlite3.connect(db) as c:
        row = c.execute(
            "SELECT COUNT(*) FROM deliveries WHERE sink LIKE 'warehouse~agg%' AND state = 'done'"
        ).fetchone()
    return int(row[0])


def item(i: int, received: str) -> dict[str, Any]:
    return {"id": f"li{i}", "source": "shop", "type": "t", "data": {"amount": i}, "received_at": received}


def test_output_is_a_function_of_the_window_only() -> None:
    s = AggregateSettings(max_count=10, sum=["data.amount", "data.missing"])
    items = [item(i, f"2026-01-01T00:00:0{i}Z") for i in range(6)]
    first = build_output(s, "shop", "r0", "g", items, 100.0, "count")
    for _ in range(5):
        shuffled = random.sample(items, len(items))
        again = build_output(s, "shop", "r0", "g", shuffled, 100.0, "count")
        assert again.id == first.id and again.data == first.data
    assert first.data["sums"] == {"data.amount": 15, "data.missing": 0}
    assert [e["id"] for e in first.data["items"]] == [f"li{i}" for i in range(6)]
    assert first.source == "shop.aggregate" and first.entity_id == "g"
    other = build_output(s, "shop", "r0", "g", items[:5], 100.0, "count")
    assert other.id != first.id  # another set of events is another window


def test_a_window_must_close_somehow(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        settings_for(tmp_path, SOURCE + agg_route(group_by="entity"))
    assert any(
        p.startswith("routes[1].aggregate: aggregate: give max_count, window, or both") for p in e.value.problems
    )
    with pytest.raises(ConfigError) as e:
        settings_for(tmp_path, SOURCE + agg_route(max_count=3, group_by="data amount"))
    assert any("routes[1].aggregate.group_by" in p for p in e.value.problems)


async def test_windows_by_count_per_group_then_by_time(tmp_path: Path) -> None:
    out = tmp_path / "var" / "warehouse.jsonl"
    s = settings_for(
        tmp_path, SOURCE + agg_route(group_by="entity", max_count=4, window="600ms", align=False, sum=["data.amount"])
    )
    async with running_daemon(s) as d, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/shop"
        for i in range(10):
            await post(session, url, i, "A" if i % 2 == 0 else "B", 1.5 * i)
        # A got 0,2,4,6,8 and B 1,3,5,7,9: one full window of 4 each at once, the fifth of each by time.
        await wait_for(lambda: len(read_jsonl(out)) == 4, timeout=20)
        raw = read_jsonl(tmp_path / "var" / "raw.jsonl")
    windows = read_jsonl(out)
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for w in windows:
        by_reason.setdefault(w["data"]["closed"], []).append(w)
    assert sorted((w["entity_id"], w["data"]["count"]) for w in by_reason["count"]) == [("order:A", 4), ("order:B", 4)]
    assert sorted((w["entity_id"], w["data"]["count"]) for w in by_reason["time"]) == [("order:A", 1), ("order:B", 1)]
    a = next(w for w in by_reason["count"] if w["entity_id"] == "order:A")
    assert [it["data"]["n"] for it in a["data"]["items"]] == [0, 2, 4, 6]
    assert a["data"]["sums"] == {"data.amount": 1.5 * (0 + 2 + 4 + 6)}
    assert a["type"] == "aggregate" and a["source"] == "shop.aggregate"
    assert len(raw) == 10  # the other route still gets every event on its own


async def test_kill9_mid_window_loses_nothing_and_delivers_one_window(tmp_path: Path) -> None:
    out = tmp_path / "var" / "warehouse.jsonl"
    cfg = write_config(
        tmp_path,
        SOURCE + agg_route(max_count=10, sum=["data.amount"]),
        base=BASE.replace('log_level = "debug"', 'log_level = "info"'),
    )
    d = DaemonProcess(cfg, tmp_path / "daemon.log")
    await d.start()
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(7):
                await post(session, d.url("shop"), i, f"o{i}", i)
            await wait_for(lambda: aggregated(tmp_path / "var" / "integrand.db") == 7, timeout=20)
            await d.kill()  # a window holding 7 of 10, only in the store
            await d.start()
            assert "resumed 1 open window(s) holding 7 event(s)" in d.output()
            for i in range(7, 10):
                await post(session, d.url("shop"), i, f"o{i}", i)
            await wait_for(lambda: len(read_jsonl(out)) == 1, timeout=20)
    finally:
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
    [w] = read_jsonl(out)
    assert w["data"]["count"] == 10 and w["data"]["closed"] == "count"
    assert [it["id"] for it in w["data"]["items"]] == [f"li{i}" for i in range(10)]
    assert w["data"]["sums"] == {"data.amount": 45}


async def test_a_refused_flush_keeps_the_window_and_the_redelivery_flushes_it_once(tmp_path: Path) -> None:
    from integrand.aggregate import Aggregator
    from integrand.app import ScopedState
    from integrand.connector import ConnectorContext, Event
    from integrand.errors import StoreUnavailable
    from integrand.testing import temp_store

    async with temp_store(tmp_path / "s.db") as store:
        ctx = ConnectorContext(name="w~agg0", role="sink", base_dir=tmp_path, state=ScopedState(store, "aggregate:x"))
        agg = Aggregator(
            AggregateSettings(max_count=3), ctx, store=store, source="shop", target="warehouse", tag="routes[0]:w"
        )
        await agg.start()
        evs = [Event(id=f"e{i}", source="shop", type="t", data={"n": i}) for i in range(3)]
        assert await agg.deliver_batch(evs[:2]) == [None, None]
        real = store.enqueue
        calls = 0

        async def refuse_once(items: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise StoreUnavailable("store cannot commit: database or disk is full")
            return await real(items, **kw)

        store.enqueue = refuse_once  # type: ignore[method-assign]
        with pytest.raises(StoreUnavailable):
            await agg.deliver_batch(evs[2:])  # the window is full; its flush is refused
        assert await agg.deliver_batch(evs[2:]) == [None]  # the dispatcher's retry: flushed now, once
        assert await agg.deliver_batch(evs[:1]) == [None]  # a late redelivery of the flushed window: ignored
        await agg.close()
        assert await store.event_count() == 1
        [row] = await store.lease(10, 30.0)
        assert [it["id"] for it in row.event.data["items"]] == ["e0", "e1", "e2"]


async def test_a_sighup_reload_keeps_aggregated_routes_and_their_open_windows(tmp_path: Path) -> None:
    """reload.py keeps the aggregated routes' virtual sinks: a window open at the SIGHUP fills and flushes after
    it, the next one too, and the reload's own change (a sink added) takes effect beside them."""
    out, extra = tmp_path / "var" / "warehouse.jsonl", tmp_path / "var" / "extra.jsonl"
    base = BASE.replace('log_level = "debug"', 'log_level = "info"')
    body = SOURCE + agg_route(max_count=5, sum=["data.amount"])
    cfg = write_config(tmp_path, body, base=base)
    d = DaemonProcess(cfg, tmp_path / "daemon.log")
    await d.start()
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                await post(session, d.url("shop"), i, f"o{i}", i)
            await wait_for(lambda: aggregated(tmp_path / "var" / "integrand.db") == 3, timeout=20)
            added = '\n[sinks.extra]\nconnector = "jsonl"\npath = "var/extra.jsonl"\n\n[[routes]]\nfrom = "shop"\nto = ["extra"]\n'
            cfg.write_text(base + body + added)
            d.signal(signal.SIGHUP)
            await wait_for(lambda: "reloaded" in d.output(), timeout=20)
            for i in range(3, 10):
                await post(session, d.url("shop"), i, f"o{i}", i)
            await wait_for(lambda: len(read_jsonl(out)) == 2, timeout=20)
            await wait_for(lambda: len(read_jsonl(extra)) == 7, timeout=20)
    finally:
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
    first, second = read_jsonl(out)
    assert [it["id"] for it in first["data"]["items"]] == [f"li{i}" for i in range(5)]  # 3 before the reload, 2 after
    assert [it["id"] for it in second["data"]["items"]] == [f"li{i}" for i in range(5, 10)]
    assert first["data"]["sums"] == {"data.amount": 10} and second["data"]["sums"] == {"data.amount": 35}
    assert "reload rejected" not in d.output() and "Traceback" not in d.output()
    assert [e["id"] for e in read_jsonl(extra)] == [f"li{i}" for i in range(3, 10)]


async def test_kill9_mid_time_window_flushes_it_whole_after_the_restart(tmp_path: Path) -> None:
    out = tmp_path / "var" / "warehouse.jsonl"
    cfg = write_config(
        tmp_path,
        SOURCE + agg_route(window="5s", align=False, group_by="entity", sum=["data.amount"]),
        base=BASE.replace('log_level = "debug"', 'log_level = "info"'),
    )
    d = DaemonProcess(cfg, tmp_path / "daemon.log")
    await d.start()
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(4):
                await post(session, d.url("shop"), i, "A", i)
            await wait_for(lambda: aggregated(tmp_path / "var" / "integrand.db") == 4, timeout=20)
            await d.kill()  # a time window holding 4, only in the store
            assert read_jsonl(out) == []
            await d.start()
            assert "resumed 1 open window(s) holding 4 event(s)" in d.output()
            await wait_for(lambda: len(read_jsonl(out)) == 1, timeout=20)
    finally:
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
    [w] = read_jsonl(out)
    assert w["data"]["closed"] == "time" and w["data"]["count"] == 4
    assert [it["id"] for it in w["data"]["items"]] == [f"li{i}" for i in range(4)]
    assert w["data"]["sums"] == {"data.amount": 6} and w["entity_id"] == "order:A"
