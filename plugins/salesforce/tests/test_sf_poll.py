"""SOQL polling on SystemModstamp: nextRecordsUrl paging, deletions, getDeleted's window, the shared budget."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sf_support import sf_env

from integrand.testing import FakeClock


async def drain(conn: Any, cursor: Any = None, limit: int = 50) -> tuple[list[Any], Any]:
    """Poll until the source says nothing more is waiting; every event and the last cursor."""
    events: list[Any] = []
    for _ in range(limit):
        res = await conn.poll(cursor)
        events += res.events
        cursor = res.cursor
        if not res.more:
            return events, cursor
    raise AssertionError("poll never finished")


async def test_pages_through_next_records_url_and_resumes_mid_query(tmp_path: Path) -> None:
    clock = FakeClock(1_800_000_000)
    async with sf_env(tmp_path, page_size=200, clock=clock) as env:
        for i in range(450):
            env.fake.create("Account", Name=f"Acme {i}")
        env.fake.create("Contact", LastName="Lee")
        conn = await env.connector(initial_lookback="1h", objects=["Account", "Contact"])
        first = await conn.poll(None)
        assert len(first.events) == 200 and first.more
        assert first.cursor["page"]["url"].startswith("/services/data/v62.0/query/")
        # A restart between pages: a new instance resumes from the committed cursor's locator.
        again = await env.connector("sf2", initial_lookback="1h", objects=["Account", "Contact"])
        rest, cursor = await drain(again, first.cursor)
        ids = [e.entity_id for e in list(first.events) + rest]
        assert len(ids) == 451 == len(set(ids))
        assert {e.type for e in rest} == {"account.created", "contact.created"}
        # Nothing changed: the next cycle re-reads only what was within the overlap (same event ids),
        # and the one after reads nothing: settled rows are not read again.
        clock.advance(120)
        overlap, cursor = await drain(again, cursor)
        assert {e.id for e in overlap} <= {e.id for e in list(first.events) + rest}
        quiet, cursor = await drain(again, cursor)
        assert quiet == []
        clock.advance(1)
        env.fake.update("Account", first.events[0].entity_id, Name="Renamed")
        changed, _ = await drain(again, cursor)
        assert [(e.type, e.data["Name"]) for e in changed] == [("account.updated", "Renamed")]


async def test_an_expired_query_locator_restarts_that_query(tmp_path: Path) -> None:
    clock = FakeClock(1_800_000_000)
    async with sf_env(tmp_path, page_size=200, clock=clock, locator_lifetime=60) as env:
        for i in range(300):
            env.fake.create("Account", Name=f"A{i}")
        conn = await env.connector(initial_lookback="1h", objects=["Account"])
        first = await conn.poll(None)
        clock.advance(61)
        rest, _ = await drain(conn, first.cursor)
        assert len({e.entity_id for e in list(first.events) + rest}) == 300


async def test_deletions_arrive_in_order_through_query_all(tmp_path: Path) -> None:
    clock = FakeClock(1_800_000_000)
    async with sf_env(tmp_path, clock=clock) as env:
        rec = env.fake.create("Account", Name="Doomed")
        conn = await env.connector(initial_lookback="1h", objects=["Account"])
        _, cursor = await drain(conn)
        clock.advance(5)
        env.fake.delete("Account", rec["Id"])
        events, _ = await drain(conn, cursor)
        assert [(e.type, e.entity_id, e.meta.get("deleted")) for e in events] == [("account.deleted", rec["Id"], True)]


async def test_get_deleted_catches_deletions_and_a_window_beyond_reach_means_a_full_resync(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(1_800_000_000)
    async with sf_env(tmp_path, clock=clock) as env:
        keep = env.fake.create("Account", Name="Kept")
        gone = env.fake.create("Account", Name="Gone")
        # query, not queryAll: deletions come only from getDeleted, every deleted_check.
        conn = await env.connector(
            initial_lookback="1h", objects=["Account"], include_deleted=False, deleted_check="5m"
        )
        _, cursor = await drain(conn)
        clock.advance(10)
        env.fake.delete("Account", gone["Id"])
        quiet, cursor = await drain(conn, cursor)
        assert not [e for e in quiet if e.meta.get("deleted")], "getDeleted waits for deleted_check"
        clock.advance(300)
        found, cursor = await drain(conn, cursor)
        deleted = [e for e in found if e.meta.get("deleted")]
        assert [(e.type, e.entity_id, e.meta["via"]) for e in deleted] == [
            ("account.deleted", gone["Id"], "getDeleted")
        ]
        # The source is stopped for 16 days: getDeleted reaches 15 back, so what was deleted in the
        # meantime may be beyond reach. Logged, and the object is read again in full.
        clock.advance(16 * 86400)
        caplog.set_level(logging.WARNING)
        _, cursor = await drain(conn, cursor)
        assert "deletions in between may be missed; starting a full resync of Account" in caplog.text
        assert "Account" in cursor["resyncs"]
        again, _ = await drain(conn, cursor)
        assert keep["Id"] in {e.entity_id for e in again}, "the full resync re-read the live records"


async def test_the_purged_recycle_bin_moves_earliest_date_available(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(1_800_000_000)
    async with sf_env(tmp_path, clock=clock) as env:
        env.fake.create("Account", Name="A")
        conn = await env.connector(
            initial_lookback="1h", objects=["Account"], include_deleted=False, deleted_check="1m"
        )
        clock.advance(120)
        _, cursor = await drain(conn)
        clock.advance(3600)
        env.fake.purge(env.fake.now() - timedelta(minutes=5))  # emptied after our last check
        caplog.set_level(logging.WARNING)
        await drain(conn, cursor)
        assert "starting a full resync of Account" in caplog.text


async def test_the_api_budget_is_the_orgs_shared_by_source_and_sink(tmp_path: Path) -> None:
    async with sf_env(tmp_path, api_limit=1000) as env:
        src = await env.connector("src", objects=["Account"])
        sink = await env.connector("dst", role="sink", object="Account", external_id_field="ExtId__c")
        assert src.client is sink.client, "one org, one client: one session, one budget, one concurrency cap"
        from integrand.connector import Event

        await sink.deliver(Event(id="1", source="x", type="t", data={"ExtId__c": "E1", "Name": "N"}))
        res = await src.poll(None)
        assert res.budget_limit == 1000
        assert res.budget_remaining == 1000 - env.fake.api_usage
        assert env.fake.api_usage >= 2
