"""Store support for the pull side: cursors committed with their events, and the entity-version table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from integrand.errors import StoreUnavailable
from integrand.events import Event, VersionError
from integrand.store import Store, version_newer


def ev(
    eid: str,
    entity_id: str | None = "42",
    version: str | None = "1",
    data: object = None,
    type_: str = "customer.updated",
) -> Event:
    return Event(
        id=eid,
        source="src",
        type=type_,
        data=data if data is not None else {"v": version},
        entity="customer",
        entity_id=entity_id,
        version=version,
    )


async def open_store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "q.db")
    await store.open()
    return store


async def test_events_and_cursor_commit_together(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        assert await store.cursor_get("src") is None
        res = await store.enqueue_with_cursor([(ev("a"), ["out"])], "src", {"since": "2026-01-01T00:00:00Z"})
        assert (res.accepted, res.duplicates, res.stale) == (1, 0, 0)
        assert await store.cursor_get("src") == {"since": "2026-01-01T00:00:00Z"}
        # An empty page still moves the cursor.
        await store.enqueue_with_cursor([], "src", {"since": "b"})
        assert await store.cursor_get("src") == {"since": "b"}
        assert [(c.source, c.kind, c.value) for c in await store.cursors()] == [("src", "poll", {"since": "b"})]
    finally:
        await store.close()


async def test_failed_commit_keeps_old_cursor_and_no_events(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        await store.enqueue_with_cursor([(ev("a"), ["out"])], "src", 1)

        # Sabotage the events table so the next transaction fails after the cursor row was staged.
        async def break_events(conn: object) -> None:
            await conn.execute("CREATE TRIGGER no_more BEFORE INSERT ON cursors BEGIN SELECT RAISE(ABORT, 'boom'); END")  # type: ignore[attr-defined]

        await store._submit(break_events)
        with pytest.raises((sqlite3.Error, StoreUnavailable)):
            await store.enqueue_with_cursor([(ev("b", entity_id="43"), ["out"])], "src", 2)
        assert await store.cursor_get("src") == 1
        assert await store.event_count() == 1
    finally:
        await store.close()


async def test_cursor_survives_reopen_and_reset(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    await store.enqueue_with_cursor([], "src", ["opaque", 3])
    await store.cursor_set("other", {"page": 2}, kind="reconcile")
    await store.close()
    store = await open_store(tmp_path)
    try:
        assert await store.cursor_get("src") == ["opaque", 3]
        assert await store.cursor_get("other", kind="reconcile") == {"page": 2}
        await store.cursor_set("src", None)
        assert await store.cursor_get("src") is None
    finally:
        await store.close()


async def test_entity_table_drops_stale_and_repeats(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        r = await store.enqueue([(ev("v2", version="2"), ["out"])])
        assert (r.accepted, r.stale) == (1, 0)
        # Older version: never overwrites the newer one.
        r = await store.enqueue([(ev("v1", version="1"), ["out"])])
        assert (r.accepted, r.stale) == (0, 1)
        # Same version, same content, new event id (a poll after a webhook): a repeat.
        r = await store.enqueue([(ev("v2-again", version="2"), ["out"])])
        assert (r.accepted, r.stale) == (0, 1)
        # Same version, different content: kept (a thin webhook, then the full record).
        r = await store.enqueue([(ev("v2-full", version="2", data={"v": "2", "name": "Ada"}), ["out"])])
        assert (r.accepted, r.stale) == (1, 0)
        # Numeric versions compare as numbers, not strings.
        r = await store.enqueue([(ev("v10", version="10"), ["out"])])
        assert r.accepted == 1
        r = await store.enqueue([(ev("v9", version="9"), ["out"])])
        assert r.stale == 1
        # Within one batch too.
        r = await store.enqueue(
            [(ev("x3", entity_id="7", version="3"), ["out"]), (ev("x2", entity_id="7", version="2"), ["out"])]
        )
        assert (r.accepted, r.stale) == (1, 1)
        got = await store.entity_versions("src", [("customer", "42"), ("customer", "7"), ("customer", "nope")])
        assert set(got) == {("customer", "42"), ("customer", "7")}
        assert got[("customer", "42")].version == "10"
        assert got[("customer", "42")].event_id == "v10"
        assert got[("customer", "7")].version == "3"
        assert await store.event_count() == 4
    finally:
        await store.close()


async def test_deletes_are_recorded_and_events_without_entity_untouched(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        await store.enqueue([(ev("c", version="1"), ["out"])])
        await store.enqueue([(ev("d", version="2", type_="customer.deleted"), ["out"])])
        got = await store.entity_versions("src", [("customer", "42")])
        assert got[("customer", "42")].deleted
        # No entity id: no entity row, no dropping even for identical data.
        r = await store.enqueue([(ev("n1", entity_id=None), ["out"]), (ev("n2", entity_id=None), ["out"])])
        assert r.accepted == 2
    finally:
        await store.close()


def test_version_order() -> None:
    assert version_newer("10", "9")
    assert not version_newer("9", "10")
    assert version_newer("2026-01-02T00:00:00Z", "2026-01-01T23:59:59Z")
    assert version_newer("2026-01-01T00:00:00.5Z", "2026-01-01T00:00:00Z")  # as strings, '.' < 'Z'
    assert version_newer("2026-01-01T00:30:00Z", "2026-01-01T01:00:00+01:00")  # instants, not strings
    with pytest.raises(VersionError, match="neither a number nor an ISO-8601 time"):
        version_newer("a", "a")
    with pytest.raises(VersionError, match="one form of version"):
        version_newer("1767225600000", "2026-01-01T00:00:00Z")
