"""The ``jsonl`` sink: one event envelope per line, flushed and fsynced per batch, each event written once.

Delivery is at least once: a batch written but not yet acknowledged when the process dies is delivered
again after the restart. The sink makes that exactly once in the file by remembering the keys of the
last ``dedupe_window`` events it wrote (read back from the file's tail at start) and skipping those.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson
from pydantic import Field

from integrand.connector import Connector, ConnectorConfig, Event, RelPath, RetryableError, Sink
from integrand.permissions import private_dir, private_file

TAIL_BLOCK = 1 << 20


class JsonlConfig(ConnectorConfig):
    path: RelPath
    fsync: bool = True
    # How many of the most recent events are checked before writing (0: no check). It must exceed what can
    # be in flight at a crash: dispatcher.workers x the batch size (8 x 256 by default).
    dedupe_window: int = Field(default=65536, ge=0)


def tail_lines(path: Path, count: int) -> tuple[list[bytes], int, int]:
    """The last ``count`` complete lines of ``path``, the length of the file up to its last newline (bytes
    after it are a line torn by a crash mid-write, whose event was never acknowledged), and the length read."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        buf, pos = b"", end
        while pos > 0 and buf.count(b"\n") <= count:
            step = min(TAIL_BLOCK, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
    complete = buf.rfind(b"\n") + 1
    whole = pos + complete
    lines = buf[:complete].split(b"\n")[:-1]
    if pos > 0:
        lines = lines[1:]  # the first may be cut by where reading began
    return lines[-count:] if count else [], whole, end


def envelope_keys(lines: Iterable[bytes]) -> list[str]:
    out = []
    for line in lines:
        try:
            doc = orjson.loads(line)
            out.append(f"{doc['source']}:{doc['id']}")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue  # not ours to judge: a line someone else appended
    return out


class RecentKeys:
    """The last ``size`` keys written, for a constant-time "already written?"."""

    def __init__(self, size: int, keys: Iterable[str] = ()):
        self.size = size
        self.order: deque[str] = deque()
        self.members: set[str] = set()
        for k in keys:
            self.add(k)

    def __contains__(self, key: str) -> bool:
        return key in self.members

    def add(self, key: str) -> None:
        if self.size <= 0 or key in self.members:
            return
        self.order.append(key)
        self.members.add(key)
        if len(self.order) > self.size:
            self.members.discard(self.order.popleft())

    def extend_new(self, keys: Iterable[str]) -> None:
        """Add keys known to be absent and distinct (a batch just checked against ``members``), in order."""
        if self.size <= 0:
            return
        self.order.extend(keys)
        self.members.update(keys)
        while len(self.order) > self.size:
            self.members.discard(self.order.popleft())


class JsonlSink(Connector[JsonlConfig], Sink):
    """Appends events to a file; a batch is one write and one fsync, so it is cheap and durable."""

    Config = JsonlConfig
    batch_size = 512
    writes_paths = ("path",)

    _fd: int | None = None

    async def start(self) -> None:
        self._lock = asyncio.Lock()
        path = self.config.path
        private_dir(path.parent)
        private_file(path)  # event bodies: 0600 whatever the umask
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # held for the daemon's lifetime
        try:
            lines, torn = await asyncio.to_thread(self._read_tail, fd)
        except BaseException:
            os.close(fd)
            raise
        if torn:
            self.log.warning("%s: dropped a partial last line left by a crash", path)
        self._recent = RecentKeys(self.config.dedupe_window, envelope_keys(lines))
        self._fd = fd

    def _read_tail(self, fd: int) -> tuple[list[bytes], bool]:
        """The tail's lines, a torn last line cut off. Under the file's lock: a reload starts a new sink while
        the old one may still be writing its last batch, and a line being written is not a torn one."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            lines, whole, end = tail_lines(self.config.path, self.config.dedupe_window)
            # Torn: what this read saw after the last newline, and only if nothing was appended since.
            torn = whole < end and os.fstat(fd).st_size == end
            if torn:
                # A line torn by a crash mid-write: its event was not acknowledged and will come again.
                os.ftruncate(fd, whole)
            return lines, torn
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, data: bytes) -> None:
        """All of ``data`` durably, or none of it: a failed write or fsync is cut back off, so the retry
        neither repeats the lines that made it nor leaves a torn one between batches."""
        fd = self._fd
        if fd is None:
            raise RetryableError("jsonl sink is closed")
        fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time: another instance may share the file during a reload
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.config.fsync:
                    os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    async def deliver(self, event: Event) -> None:
        [result] = await self.deliver_batch([event])
        if result is not None:
            raise result

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        async with self._lock:
            fresh: list[Event] = []
            keys: dict[str, None] = {}  # in order, and a constant-time "already in this batch?"
            recent = self._recent.members
            for e in events:
                k = e.key
                if k not in recent and k not in keys:
                    fresh.append(e)
                    keys[k] = None
            if fresh:
                data = b"".join(e.to_json() + b"\n" for e in fresh)
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self._write, data)
                except OSError as e:
                    err = RetryableError(f"cannot write {self.config.path}: {e.strerror or e}")
                    return [err] * len(events)
                self._recent.extend_new(keys)
        return [None] * len(events)
