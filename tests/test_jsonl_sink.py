"""The jsonl sink writes each event once across restarts and failed writes: exactly once in the file."""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from integrand.builtin.jsonl import JsonlConfig, JsonlSink, tail_lines
from integrand.connector import ConnectorContext, Event, RetryableError

from .daemon_proc import jsonl_ids


class _NoState:
    async def get(self, key: str) -> Any:
        return None

    async def set(self, key: str, value: Any) -> None:
        return None


async def sink(path: Path, **cfg: Any) -> JsonlSink:
    ctx = ConnectorContext(name="out", role="sink", base_dir=path.parent, state=_NoState())
    s = JsonlSink(JsonlConfig.model_validate({"path": str(path), **cfg}, context={"base_dir": path.parent}), ctx)
    await s.start()
    return s


def events(ids: range, pad: int = 0) -> list[Event]:
    return [Event(id=f"e{i}", source="src", type="t", data={"n": i, "pad": "x" * pad}) for i in ids]


async def test_a_batch_delivered_again_after_a_restart_is_not_written_twice(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    s = await sink(out)
    assert await s.deliver_batch(events(range(0, 100))) == [None] * 100
    await s.close()  # the process died before the store recorded the batch as delivered
    s = await sink(out)
    assert await s.deliver_batch(events(range(50, 150))) == [None] * 100
    await s.close()
    assert jsonl_ids(out) == [f"e{i}" for i in range(150)]


async def test_repeats_inside_one_run_and_one_batch_are_written_once(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    s = await sink(out)
    await s.deliver_batch(events(range(3)) + events(range(3)))
    await s.deliver_batch(events(range(2, 5)))  # a lease that expired and was delivered again meanwhile
    await s.close()
    assert jsonl_ids(out) == ["e0", "e1", "e2", "e3", "e4"]


async def test_a_torn_last_line_is_dropped_at_start(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    s = await sink(out)
    await s.deliver_batch(events(range(3)))
    await s.close()
    with out.open("ab") as f:
        f.write(events(range(3, 4))[0].to_json()[:20])  # power lost mid-write: never acknowledged
    s = await sink(out)
    await s.deliver_batch(events(range(3, 5)))
    await s.close()
    assert jsonl_ids(out) == ["e0", "e1", "e2", "e3", "e4"]


async def test_window_reads_only_the_tail_and_zero_turns_the_check_off(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    s = await sink(out)
    await s.deliver_batch(events(range(5000), pad=300))  # ~2 MB: more than one block of the tail read
    await s.close()
    lines, whole, _ = tail_lines(out, 10)
    assert [orjson.loads(ln)["id"] for ln in lines] == [f"e{i}" for i in range(4990, 5000)]
    assert whole == out.stat().st_size
    s = await sink(out, dedupe_window=10)
    await s.deliver_batch(events(range(4985, 5001)))  # e4985..e4989 are outside a window of 10
    await s.close()
    ids = jsonl_ids(out)
    assert ids[5000:] == [f"e{i}" for i in range(4985, 4990)] + ["e5000"]
    s = await sink(out, dedupe_window=0)
    await s.deliver_batch(events(range(4999, 5000)))
    await s.close()
    assert jsonl_ids(out)[-1] == "e4999"


@pytest.fixture
def file_size_cap() -> Iterator[Any]:
    """RLIMIT_FSIZE as a disk that fills up mid-write: write() stops short, then fails with EFBIG."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)

    def cap(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, old[1]))

    try:
        yield cap
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


async def test_a_write_that_fails_half_way_is_cut_back_and_retried_whole(tmp_path: Path, file_size_cap: Any) -> None:
    out = tmp_path / "out.jsonl"
    s = await sink(out)
    await s.deliver_batch(events(range(10)))
    size = out.stat().st_size
    file_size_cap(size + 1000)
    results = await s.deliver_batch(events(range(10, 100), pad=100))  # ~15 KB: a few lines fit, then EFBIG
    assert all(isinstance(r, RetryableError) for r in results)
    assert out.stat().st_size == size  # nothing half-written stays
    file_size_cap(resource.RLIM_INFINITY)
    assert await s.deliver_batch(events(range(10, 100), pad=100)) == [None] * 90
    await s.close()
    assert jsonl_ids(out) == [f"e{i}" for i in range(100)]


async def test_a_reload_starting_a_second_sink_on_the_file_keeps_what_the_first_just_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that changes the sink starts a new instance while the old one still delivers its batch:
    the new one must not take the old one's fresh, acknowledged lines for a torn line and cut them off
    (found by the crash loop's reloads: lines marked done in the store were missing from the file)."""
    import integrand.builtin.jsonl as jsonl

    out = tmp_path / "out.jsonl"
    old = await sink(out)
    await old.deliver_batch(events(range(0, 5)))
    read = jsonl.tail_lines

    def read_then_the_old_sink_writes(path: Path, count: int) -> tuple[list[bytes], int, int]:
        result = read(path, count)
        # The old instance's batch lands after the new one read the tail and before it checks the size
        # (written past the lock: the check must hold without it too).
        assert old._fd is not None
        os.write(old._fd, b"".join(e.to_json() + b"\n" for e in events(range(5, 8))))
        return result

    monkeypatch.setattr(jsonl, "tail_lines", read_then_the_old_sink_writes)
    new = await sink(out)
    monkeypatch.setattr(jsonl, "tail_lines", read)
    await new.deliver_batch(events(range(8, 10)))
    await old.close()
    await new.close()
    assert jsonl_ids(out) == [f"e{i}" for i in range(10)]
