"""The ``jsonl`` sink: one event envelope per line, flushed and fsynced per batch."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import IO

from integrand.connector import Connector, ConnectorConfig, Event, RelPath, RetryableError, Sink


class JsonlConfig(ConnectorConfig):
    path: RelPath
    fsync: bool = True


class JsonlSink(Connector[JsonlConfig], Sink):
    """Appends events to a file; a batch is one write and one fsync, so it is cheap and durable."""

    Config = JsonlConfig
    batch_size = 512
    writes_paths = ("path",)

    _file: IO[bytes] | None = None

    async def start(self) -> None:
        self._lock = asyncio.Lock()
        path = self.config.path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115, ASYNC230 - opened once at start, held for the daemon's lifetime

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, data: bytes) -> None:
        f = self._file
        if f is None:
            raise RetryableError("jsonl sink is closed")
        f.write(data)
        f.flush()
        if self.config.fsync:
            os.fsync(f.fileno())

    async def deliver(self, event: Event) -> None:
        [result] = await self.deliver_batch([event])
        if result is not None:
            raise result

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        data = b"".join(e.to_json() + b"\n" for e in events)
        async with self._lock:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._write, data)
            except OSError as e:
                err = RetryableError(f"cannot write {self.config.path}: {e.strerror or e}")
                return [err] * len(events)
        return [None] * len(events)
