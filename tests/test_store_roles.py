"""One writer per store, enforced: the daemon and a CLI writer share a lock; readers open the file read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from integrand.errors import StoreUnavailable
from integrand.events import Event
from integrand.store import Store, StoreLocked


def ev(i: str) -> Event:
    return Event(id=i, source="s", type="t", data={})


async def test_a_cli_writer_is_refused_while_a_daemon_holds_the_store(tmp_path: Path) -> None:
    daemon = Store(tmp_path / "q.db")
    await daemon.open()
    try:
        with pytest.raises(StoreLocked, match=r"daemon holds .*q\.db: write commands must go through it"):
            await Store(tmp_path / "q.db", role="writer").open()
    finally:
        await daemon.close()


async def test_a_cli_writer_holds_the_lock_against_a_daemon(tmp_path: Path) -> None:
    writer = Store(tmp_path / "q.db", role="writer")
    await writer.open()
    try:
        assert (await writer.enqueue([(ev("a"), ["k"])])).accepted == 1
        with pytest.raises(StoreLocked, match="already running"):
            await Store(tmp_path / "q.db").open()
    finally:
        await writer.close()
    daemon = Store(tmp_path / "q.db")  # the lock is free again
    await daemon.open()
    try:
        assert await daemon.event_count() == 1
    finally:
        await daemon.close()


async def test_a_reader_reads_beside_the_daemon_and_cannot_write(tmp_path: Path) -> None:
    daemon = Store(tmp_path / "q.db")
    await daemon.open()
    try:
        await daemon.enqueue([(ev("a"), ["k"])])
        reader = Store(tmp_path / "q.db", role="reader")
        await reader.open()
        try:
            assert await reader.counts() == {("k", "ready"): 1}
            assert await reader.dead_letters() == []
            with pytest.raises(StoreUnavailable, match="read-only"):
                await reader.enqueue([(ev("b"), ["k"])])
            with pytest.raises(StoreUnavailable, match="read-only"):
                await reader.cursor_set("s", {"page": 1})
            await daemon.enqueue([(ev("c"), ["k"])])  # the daemon is not disturbed, and the reader sees it
            assert await reader.event_count() == 2
        finally:
            await reader.close()
    finally:
        await daemon.close()


async def test_a_reader_never_creates_or_migrates_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="no store at"):
        await Store(tmp_path / "var" / "q.db", role="reader").open()
    assert not (tmp_path / "var").exists()


async def test_a_reader_leaves_a_closed_store_byte_for_byte_as_it_was(tmp_path: Path) -> None:
    s = Store(tmp_path / "q.db")
    await s.open()
    await s.enqueue([(ev("a"), ["k"])])
    await s.close()
    db = tmp_path / "q.db"
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    reader = Store(tmp_path / "q.db", role="reader")
    await reader.open()
    try:
        assert await reader.event_count() == 1
        assert await reader.cursors() == []
    finally:
        await reader.close()
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before
    # A reader of a WAL database may create the WAL index files (SQLite's own doing), never write frames.
    wal = tmp_path / "q.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
