"""integrand.sync without a database: a listing source into a sink that cannot stage, the route's filter and
mapping on the way, the progress line on a terminal, and the --since parser."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from integrand.builtin.jsonl import JsonlSink
from integrand.config import parse_config
from integrand.connector import Connector, ConnectorConfig, Event, ReconcilePage, ReconcilingSource
from integrand.plugins import Registry
from integrand.sync import Progress, SyncReport, build_run, parse_since, sync_once
from integrand.testing import connector_context, temp_store


class ListingConfig(ConnectorConfig):
    n: int = 25


class Listing(Connector[ListingConfig], ReconcilingSource):
    """Lists n records, 10 a page, cursor = the next offset."""

    Config = ListingConfig
    page_size: ClassVar[int] = 10

    async def reconcile(self, since: float | None, cursor: Any) -> ReconcilePage:
        start = int(cursor or 0)
        end = min(start + self.page_size, self.config.n)
        events = [
            Event(
                id=f"r{i}",
                source=self.ctx.name,
                type="thing.read",
                entity="thing" if i % 5 else "other",
                entity_id=str(i),
                version="1",
                data={"name": f"Thing {i}"},
            )
            for i in range(start, end)
        ]
        return ReconcilePage(events, cursor=end, more=end < self.config.n)


def settings(tmp_path: Path) -> Any:
    raw = {
        "sources": {"list": {"connector": "listing"}},
        "sinks": {"out": {"connector": "jsonl", "path": "out.jsonl", "fsync": False}},
        "routes": [
            {
                "from": "list",
                "to": ["out"],
                "filter": {"entity": ["thing"]},
                "map": {"title": "data.name", "n": "entity_id"},
            }
        ],
    }
    return parse_config(raw, base_dir=tmp_path, registry=Registry.of({"listing": Listing, "jsonl": JsonlSink}))


async def test_a_full_sync_into_a_sink_that_cannot_stage_is_an_upsert_only_sync(tmp_path: Path) -> None:
    s = settings(tmp_path)
    async with temp_store(tmp_path / "s.db") as store:
        src = Listing(s.sources["list"].options, connector_context(store, name="list", base_dir=tmp_path))
        sink = JsonlSink(s.sinks["out"].options, connector_context(store, name="out", role="sink", base_dir=tmp_path))
        await sink.start()
        try:
            run = build_run(s, {"source:list": src, "sink:out": sink}, store, "list", "out")
            out = io.StringIO()
            out.isatty = lambda: True  # type: ignore[method-assign]
            report = await sync_once(run, full=True, since=None, progress=Progress(out))
        finally:
            await sink.close()
    assert report.mode.startswith("full (upsert only")
    assert (report.read, report.filtered, report.written, report.failed, report.deleted) == (25, 5, 20, 0, 0)
    lines = [orjson.loads(x) for x in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [x["data"] for x in lines[:2]] == [{"title": "Thing 1", "n": "1"}, {"title": "Thing 2", "n": "2"}]
    assert "\rlist → out: 25 read" in out.getvalue() and out.getvalue().endswith("\n")
    assert report.summary().startswith("sync list → out (full (upsert only")


def test_the_summary_line_counts_everything() -> None:
    r = SyncReport("app", "warehouse", "full", read=2495, written=3, unchanged=2492, deleted=5, seconds=1.42)
    assert r.summary() == (
        "sync app → warehouse (full): read 2,495, written 3, unchanged 2,492, deleted 5, failed 0 in 1.4 s"
    )


def test_no_progress_line_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(out)
    p.update(SyncReport("a", "b", "full", read=5), force=True)
    p.done()
    assert out.getvalue() == ""


def test_since_takes_an_iso_time_or_a_duration_back() -> None:
    assert parse_since("2026-01-31T12:00Z") == 1769860800.0
    assert parse_since("2026-01-31") == 1769817600.0
    assert parse_since("2d", now=1_000_000.0) == 1_000_000.0 - 2 * 86400
    with pytest.raises(argparse.ArgumentTypeError, match="neither an ISO-8601 time"):
        parse_since("last tuesday")
