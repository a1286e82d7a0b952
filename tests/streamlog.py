"""A small streaming connector over a file log, for the streamer's tests (in-process and as a real daemon).

The "upstream" is a directory another process writes, shaped like a broker with a replay log:

* ``log.jsonl`` — one message per line, ``{"seq": n, "id": …, "entity_id": …, "v": …, "data": …}``
  (a line that is not such an object is a poison message);
* ``acked`` — the upstream's ack floor: it redelivers everything after it, as a broker does;
* ``retained_from`` — the first sequence the log still has (retention passed before it);
* ``snapshot.jsonl`` — the current state, what a full resync reads;
* ``stall_receive`` / ``stall_ack`` — a sequence number: receiving (or acknowledging) the batch holding
  it writes ``stalled_receive`` / ``stalled_ack`` and hangs, so a test can kill the daemon exactly there.

``acks.log`` records every ack as ``first last`` so a test can check nothing was acked before its commit.
``ReadAheadLogSource`` (``streamlog-ahead``) is the same with ``read_ahead``: batches are read while
earlier ones commit.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from integrand.connector import (
    Connector,
    ConnectorConfig,
    Event,
    PositionLost,
    Rejected,
    RelPath,
    StreamBatch,
    StreamingSource,
)

DIST_INFO = """Metadata-Version: 2.1
Name: integrand-test-streamlog
Version: 0
"""


class LogConfig(ConnectorConfig):
    dir: RelPath
    batch: int = 50
    idle: float = 0.01


def _int_file(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip() or default)
    except FileNotFoundError:
        return default


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class LogSource(Connector[LogConfig], StreamingSource):
    """Streams ``log.jsonl`` from the upstream's ack floor; the position is the last sequence of a batch."""

    Config = LogConfig

    @property
    def dir(self) -> Path:
        return self.config.dir

    def _event(self, msg: dict[str, Any]) -> Event:
        return Event(
            id=str(msg["id"]),
            source=self.ctx.name,
            type=str(msg.get("type", "item.changed")),
            data=msg.get("data"),
            entity="item" if msg.get("entity_id") is not None else None,
            entity_id=None if msg.get("entity_id") is None else str(msg["entity_id"]),
            version=None if msg.get("v") is None else str(msg["v"]),
        )

    async def stream(self, position: Any) -> AsyncIterator[StreamBatch]:
        retained = _int_file(self.dir / "retained_from", 1)
        if position is not None and retained > int(position) + 1:
            raise PositionLost(
                f"the log starts at {retained}",
                position=position,
                detail=f"messages {int(position) + 1}..{retained - 1} expired",
            )
        start = max(_int_file(self.dir / "acked", 0), retained - 1)
        stall = _int_file(self.dir / "stall_receive", -1)
        log = self.dir / "log.jsonl"
        offset, seq = 0, 0
        pending: list[tuple[int, bytes]] = []
        while True:
            try:
                with log.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            end = chunk.rfind(b"\n")
            if end >= 0:
                offset += end + 1
                for line in chunk[: end + 1].splitlines():
                    seq += 1
                    if seq > start:
                        pending.append((seq, line))
            while pending:
                take, pending = pending[: self.config.batch], pending[self.config.batch :]
                batch = self._batch(take)
                if stall != -1 and take[0][0] <= stall <= take[-1][0]:
                    (self.dir / "stalled_receive").write_text(str(stall))
                    await asyncio.Event().wait()  # received, never committed: the test kills us here
                yield batch
            await asyncio.sleep(self.config.idle)

    def _batch(self, take: Sequence[tuple[int, bytes]]) -> StreamBatch:
        events: list[Event] = []
        rejected: list[Rejected] = []
        for seq, line in take:
            try:
                msg = orjson.loads(line)
                events.append(self._event(msg))
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                rejected.append(
                    Rejected(f"message {seq}: not a JSON object with an id ({type(e).__name__})", {"seq": str(seq)})
                )
        return StreamBatch(events, take[-1][0], token=(take[0][0], take[-1][0]), rejected=rejected)

    async def ack(self, batch: StreamBatch) -> None:
        first, last = batch.token
        stall = _int_file(self.dir / "stall_ack", -1)
        if stall != -1 and first <= stall <= last:
            (self.dir / "stalled_ack").write_text(str(stall))
            await asyncio.Event().wait()  # committed, never acknowledged
        with (self.dir / "acks.log").open("a") as f:
            f.write(f"{first} {last}\n")
        if last > _int_file(self.dir / "acked", 0):
            _write_atomic(self.dir / "acked", str(last))

    async def resync(self, lost: PositionLost) -> AsyncIterator[StreamBatch]:
        """The snapshot as one batch; afterwards the stream resumes at the log's current end."""
        lines = (self.dir / "snapshot.jsonl").read_bytes().splitlines()
        tail = len((self.dir / "log.jsonl").read_bytes().splitlines())
        yield StreamBatch([self._event(orjson.loads(ln)) for ln in lines], tail, token=(tail, tail))


class ReadAheadLogSource(LogSource):
    """The same log, read ahead while earlier batches commit (group commit: ``StreamingSource.read_ahead``).

    ``yielded`` counts the batches it handed over, for the tests that check how far it read."""

    read_ahead = 4
    yielded = 0

    async def stream(self, position: Any) -> AsyncIterator[StreamBatch]:
        async for batch in super().stream(position):
            ReadAheadLogSource.yielded += 1
            yield batch


class Upstream:
    """The writing side of the log (what a publishing service does), for the tests."""

    def __init__(self, root: Path):
        self.dir = root
        root.mkdir(parents=True, exist_ok=True)
        self.seq = 0

    def publish(self, messages: Sequence[dict[str, Any] | bytes]) -> None:
        lines = []
        for m in messages:
            self.seq += 1
            lines.append(m if isinstance(m, bytes) else orjson.dumps({"seq": self.seq, **m}))
        with (self.dir / "log.jsonl").open("ab") as f:
            f.write(b"".join(ln + b"\n" for ln in lines))

    @property
    def acked(self) -> int:
        return _int_file(self.dir / "acked", 0)

    def acks(self) -> list[tuple[int, int]]:
        p = self.dir / "acks.log"
        if not p.exists():
            return []
        return [(int(a), int(b)) for a, b in (ln.split() for ln in p.read_text().splitlines())]

    def set(self, name: str, value: Any) -> None:
        _write_atomic(self.dir / name, str(value))

    def clear(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)


def install_entry_point(root: Path) -> dict[str, str]:
    """Make ``connector = "streamlog"`` loadable in a child daemon: a dist-info on its PYTHONPATH."""
    info = root / "integrand_test_streamlog-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(DIST_INFO)
    (info / "entry_points.txt").write_text(
        "[integrand.connectors]\nstreamlog = tests.streamlog:LogSource\n"
        "streamlog-ahead = tests.streamlog:ReadAheadLogSource\n"
    )
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(p for p in (str(root), str(repo), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}
