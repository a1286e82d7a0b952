"""kill -9 at random moments for a few rounds under webhooks, polling, a NATS stream and reloads; ``make soak``
runs the long one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from .crashloop import Figures, SinkWatch, check_sink, crash_loop, cursor_ahead
from .fake_rest import FakeRest

ROUNDS = 6


@pytest.mark.timeout(900)  # a few rounds, but each restart imports everything again: minutes on a busy machine
async def test_kill_9_loop_loses_nothing_repeats_nothing_keeps_order(tmp_path: Path) -> None:
    # A restart may take long on a shared machine (it is what is killed, not what is timed): deadlines, not sleeps.
    f = await crash_loop(tmp_path, ROUNDS, seed=7, start_timeout=120.0, drain_timeout=300.0)
    print(f.as_dict())
    assert f.problems == []
    assert f.rounds == ROUNDS
    # The history is not trivial: load ran through every round and was checked.
    assert f.webhooks_acked > 100
    assert f.webhook_retries > 0, "no sender ever saw the daemon down: the kills did not land under load"
    assert f.polled_changes > 50
    assert f.kills_mid_poll >= 1
    assert f.stream_acked > 100, "the NATS publisher hardly published"
    assert f.reloads_done >= 1 and f.kills_mid_reload >= 1
    assert f.lost == f.duplicates == f.order_violations == f.cursor_ahead == 0


def test_the_checker_sees_loss_duplicates_disorder_and_a_cursor_ahead() -> None:
    api = FakeRest()
    api.records = {"r1": {"updated_at": "2026-01-01T00:00:02Z"}}

    def line(src: str, i: str, entity: str, order: Any) -> dict[str, Any]:
        data = {"data": {"version": order}} if src == "demo" else {}
        return {"source": src, "id": i, "entity_id": entity, "data": data, "version": order}

    lines = [
        line("demo", "a-v1", "a", 1),
        line("demo", "a-v2", "a", 2),
        line("demo", "a-v2", "a", 2),  # twice
        line("demo", "b-v2", "b", 2),
        line("demo", "b-v1", "b", 1),  # out of order
        line("crm", "x1", "r1", "2026-01-01T00:00:01Z"),  # never reached its final version
    ]
    f = Figures()
    check_sink(lines, {"a-v1", "a-v2", "b-v1", "b-v2", "c-v1"}, api, f)
    assert (f.duplicates, f.order_violations, f.lost) == (1, 2, 2)  # the repeat counts as disorder too
    assert len(f.problems) == 5
    history = [("r1", "2026-01-01T00:00:01Z"), ("r2", "2026-01-01T00:00:03Z")]
    assert cursor_ahead({"since": "2026-01-01T00:00:01Z"}, history, {}) == ["r1@2026-01-01T00:00:01Z (stored None)"]
    assert cursor_ahead({"since": "2026-01-01T00:00:01Z"}, history, {"r1": "2026-01-01T00:00:01Z"}) == []


def test_the_per_kill_watch_counts_duplicates_and_disorder_and_leaves_a_torn_tail_for_later(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"

    def line(i: str, entity: str, v: int) -> bytes:
        body = {"source": "demo", "id": i, "entity_id": entity, "data": {"data": {"version": v}}, "version": v}
        return orjson.dumps(body) + b"\n"

    out.write_bytes(line("a-v1", "a", 1) + line("a-v2", "a", 2) + line("b-v2", "b", 2)[:20])  # a kill tore the last
    w = SinkWatch()
    w.advance(out)
    assert (len(w.keys), w.duplicates, w.order_violations) == (2, 0, 0)
    # The restarted sink cut the torn line and wrote its batch again, then a duplicate and an older version.
    out.write_bytes(out.read_bytes()[: w.offset] + line("b-v2", "b", 2) + line("a-v2", "a", 2) + line("b-v1", "b", 1))
    w.advance(out)
    assert (len(w.keys), w.duplicates, w.order_violations) == (4, 1, 2)  # the repeat is out of order too
