"""After a burst the WAL is given back: once the store has been idle, it is checkpointed and truncated."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from integrand import app

from .daemon_proc import jsonl_ids, send_many
from .helpers import hook_url, running, settings_for, wait_for


async def test_wal_is_truncated_when_idle_after_a_burst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Longer than the dispatcher's idle lease (one empty commit a second): idle means no work, not no commit.
    monkeypatch.setattr(app, "WAL_IDLE_AFTER", 2.5)
    settings = settings_for(tmp_path)
    wal = tmp_path / "var" / "integrand.db-wal"
    biggest = 0
    async with running(settings) as d:
        ids = [f"w{i}" for i in range(2000)]
        _, failed = await send_many(hook_url(d), ids, concurrency=32)
        assert not failed
        biggest = os.stat(wal).st_size  # the burst's WAL, before the daemon goes idle
        await wait_for(lambda: set(jsonl_ids(tmp_path / "var" / "out.jsonl")) >= set(ids), timeout=60)
        await wait_for(lambda: os.stat(wal).st_size == 0, timeout=20)
        # Nothing was lost by truncating: the store still has every event, and takes new ones.
        assert await d.store.event_count() == len(ids)
        acked2, failed2 = await send_many(hook_url(d), ["after"])
        assert acked2 == {"after"} and not failed2
    assert biggest > 1_000_000, f"the burst grew the WAL to only {biggest} bytes; the test proves nothing"
