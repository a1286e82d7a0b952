"""The streaming-source capability: commit then ack, backpressure, alerts, lost positions, crashes and stops."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from integrand.builtin.jsonl import JsonlSink
from integrand.config import Settings, load_config
from integrand.connector import AuthError, PositionLost, RetryableError, StreamBatch
from integrand.errors import StoreUnavailable
from integrand.plugins import Registry
from integrand.testing import running_daemon, wait_for

from .daemon_proc import DaemonProcess
from .helpers import BASE, read_jsonl
from .streamlog import LogSource, ReadAheadLogSource, Upstream, install_entry_point

FEED = """
[sources.feed]
connector = "streamlog"
dir = "upstream"
batch = {batch}

[sources.feed.streaming]
backoff_base = "10ms"
backoff_cap = "100ms"
alert_retry = "100ms"
"""

ROUTED = """
[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "feed"
to = ["out"]
"""


def write(tmp_path: Path, body: str, base: str = BASE) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(base + body)
    return cfg


def settings(tmp_path: Path, body: str, cls: type[Any] = LogSource, **extra: str) -> Settings:
    reg = Registry.of({"streamlog": cls, "jsonl": JsonlSink})
    return load_config(write(tmp_path, body + "".join(extra.values())), registry=reg)


def messages(start: int, n: int, entities: int = 7, pad: str = "") -> list[dict[str, Any]]:
    return [
        {"id": f"m{i}", "entity_id": f"e{i % entities}", "v": i, "data": {"n": i, "pad": pad}}
        for i in range(start, start + n)
    ]


def stream_cursor(db: Path) -> Any:
    with sqlite3.connect(db) as c:
        row = c.execute("SELECT value FROM cursors WHERE source = 'feed' AND kind = 'stream'").fetchone()
    return orjson.loads(row[0]) if row else None


def stored_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT event_id FROM events WHERE source = 'feed' ORDER BY id")]


def sample(d: Any, name: str, **labels: str) -> float:
    return float(d.metrics.registry.get_sample_value(name, labels) or 0.0)


class CheckingLogSource(LogSource):
    """Records, at every ack, whether the batch's position was already committed (read from the file)."""

    violations: list[tuple[int, Any]] = []

    async def ack(self, batch: StreamBatch) -> None:
        db = self.ctx.base_dir / "var" / "integrand.db"
        committed = stream_cursor(db)
        if committed is None or committed < batch.position:
            CheckingLogSource.violations.append((batch.position, committed))
        await super().ack(batch)


async def test_events_and_position_commit_together_and_ack_follows(tmp_path: Path) -> None:
    up = Upstream(tmp_path / "upstream")
    up.publish(messages(0, 130))
    CheckingLogSource.violations = []
    s = settings(tmp_path, FEED.format(batch=20) + ROUTED, CheckingLogSource)
    out = tmp_path / "var" / "out.jsonl"
    db = tmp_path / "var" / "integrand.db"
    async with running_daemon(s) as d:
        await wait_for(lambda: up.acked == 130, timeout=20)
        up.publish(messages(130, 25))
        await wait_for(lambda: len(read_jsonl(out)) == 155, timeout=20)
        assert d.streamers["feed"].status()["state"] == "streaming"
        assert sample(d, "integrand_stream_up", source="feed") == 1
    assert CheckingLogSource.violations == []
    assert stream_cursor(db) == 155 == up.acked
    assert stored_ids(db) == [f"m{i}" for i in range(155)]
    # Batches as the connector cut them, each acknowledged once, in order, without gaps.
    acks = up.acks()
    assert acks[0][0] == 1 and acks[-1][1] == 155
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(acks))
    # Per-entity order at the sink.
    by_entity: dict[str, list[int]] = {}
    for line in read_jsonl(out):
        by_entity.setdefault(line["entity_id"], []).append(int(line["version"]))
    assert all(v == sorted(v) for v in by_entity.values())


class CheckingReadAhead(ReadAheadLogSource, CheckingLogSource):
    """Read ahead, and checked at every ack as above."""


def commits_of(db: Path) -> list[float]:
    """The store's commit times of the feed's events (``received_at`` is one per commit), in order, distinct."""
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT DISTINCT received_at FROM events WHERE source = 'feed' ORDER BY id")]


async def test_read_ahead_commits_what_arrived_meanwhile_in_one_transaction(tmp_path: Path) -> None:
    """Group commit: batches read while earlier ones commit share a transaction; each is acked once, in
    order, only after the commit that holds its events and its position."""
    up = Upstream(tmp_path / "upstream")
    up.publish(messages(0, 300))
    CheckingLogSource.violations = []
    s = settings(tmp_path, FEED.format(batch=10) + ROUTED, CheckingReadAhead)
    out = tmp_path / "var" / "out.jsonl"
    db = tmp_path / "var" / "integrand.db"
    async with running_daemon(s) as d:
        await wait_for(lambda: up.acked == 300, timeout=20)
        up.publish(messages(300, 7))
        await wait_for(lambda: len(read_jsonl(out)) == 307, timeout=20)
        st = d.streamers["feed"]
        assert (st.batches, st.events) == (31, 307)
        assert sample(d, "integrand_stream_batches_total", source="feed", outcome="committed") == 31
    assert CheckingLogSource.violations == []
    assert stream_cursor(db) == 307 == up.acked
    assert stored_ids(db) == [f"m{i}" for i in range(307)]
    assert len(commits_of(db)) < 31  # some transactions held several batches
    acks = up.acks()
    assert len(acks) == 31 and acks[0][0] == 1 and acks[-1][1] == 307
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(acks))
    by_entity: dict[str, list[int]] = {}
    for line in read_jsonl(out):
        by_entity.setdefault(line["entity_id"], []).append(int(line["version"]))
    assert all(v == sorted(v) for v in by_entity.values())


async def test_a_bad_batch_read_ahead_fails_alone_after_the_good_ones_commit(tmp_path: Path) -> None:
    """A group holding a batch the store cannot hold is settled one batch at a time: the batches before
    it commit and are acked, it raises an alert, and nothing after it is committed."""

    class Poisoned(ReadAheadLogSource):
        def _event(self, msg: dict[str, Any]) -> Any:
            ev = super()._event(msg)
            if msg["id"] == "m25":
                return dataclasses.replace(ev, data={1: "a key that is not text"})  # not JSON: unstorable
            return ev

    up = Upstream(tmp_path / "upstream")
    up.publish(messages(0, 60))
    db = tmp_path / "var" / "integrand.db"
    async with running_daemon(settings(tmp_path, FEED.format(batch=10), Poisoned)) as d:
        await wait_for(lambda: sample(d, "integrand_stream_alerts_total", source="feed", reason="permanent") >= 2)
    assert stream_cursor(db) == 20 == up.acked
    assert stored_ids(db) == [f"m{i}" for i in range(20)]
    assert up.acks() == [(1, 10), (11, 20)]


async def test_a_refusal_that_ends_in_an_error_does_not_stall_the_read_ahead(tmp_path: Path) -> None:
    """The store refuses, the connector's ``refused`` fails (the upstream dropped us meanwhile): the stream
    reconnects and the new subscription reads again (the refusal's hold on reading does not outlive it)."""

    class RefusedThenDropped(ReadAheadLogSource):
        async def refused(self, batch: StreamBatch, error: BaseException) -> bool:
            raise RetryableError("the upstream dropped the subscription while the store refused")

    up = Upstream(tmp_path / "upstream")
    async with running_daemon(settings(tmp_path, FEED.format(batch=5) + ROUTED, RefusedThenDropped)) as d:
        real = d.store.enqueue_with_cursor
        refusals: list[int] = []

        async def refuse_twice(*args: Any, **kw: Any) -> Any:
            if len(refusals) < 2:  # a group, then its first batch alone (or a lone batch, then its retry)
                refusals.append(1)
                raise StoreUnavailable("store cannot commit: database or disk is full (test)")
            return await real(*args, **kw)

        d.store.enqueue_with_cursor = refuse_twice
        up.publish(messages(0, 20))
        await wait_for(lambda: up.acked == 20, timeout=20)
        assert len(refusals) == 2
        assert sample(d, "integrand_stream_reconnects_total", source="feed") >= 1


async def test_poison_message_is_a_stored_rejection_and_acked(tmp_path: Path) -> None:
    up = Upstream(tmp_path / "upstream")
    up.publish([*messages(0, 3), b"{not json", b'{"no": "id"}', *messages(3, 2)])
    out = tmp_path / "var" / "out.jsonl"
    async with running_daemon(settings(tmp_path, FEED.format(batch=10) + ROUTED)) as d:
        await wait_for(lambda: up.acked == 7, timeout=20)
        await wait_for(lambda: len(read_jsonl(out)) == 5, timeout=20)
        rejections = await d.store.rejections(source="feed")
    assert sorted(r.reason for r in rejections) == [
        "message 4: not a JSON object with an id (JSONDecodeError)",
        "message 5: not a JSON object with an id (KeyError)",
    ]
    assert {r.headers["seq"] for r in rejections} == {"4", "5"}
    assert [ln["id"] for ln in read_jsonl(out)] == ["m0", "m1", "m2", "m3", "m4"]


@pytest.mark.parametrize("cls", [LogSource, ReadAheadLogSource], ids=["one-at-a-time", "read-ahead"])
async def test_backpressure_holds_the_batch_and_reads_nothing_new(tmp_path: Path, cls: type[LogSource]) -> None:
    """A full store refuses: the pending batch is retried (not dropped), nothing new is read, and it resumes.

    Read ahead, what was read before the refusal waits behind it, and nothing more is read."""
    up = Upstream(tmp_path / "upstream")
    pad = "p" * 40_000  # about 25 of these fill a 1 MB store
    full = "\n[store]\nmax_size_mb = 1\n"
    # No route: events have no deliveries, so pruning them is what makes room again.
    s = settings(tmp_path, FEED.format(batch=1), cls, full=full)
    ReadAheadLogSource.yielded = 0
    async with running_daemon(s) as d:
        st = d.streamers["feed"]
        n = 0
        while sample(d, "integrand_stream_batches_total", source="feed", outcome="refused") == 0:
            assert n < 200, "a 1 MB store never filled up"
            up.publish(messages(n, 5, pad=pad))
            n += 5

            def caught_up_or_refused(n: int = n) -> bool:
                return bool(st.batches == n or st.state == "store-refused")

            await wait_for(caught_up_or_refused, timeout=20)
        held_at = st.batches
        acked_at = up.acked
        read_at = ReadAheadLogSource.yielded
        up.publish(messages(n, 10))  # small ones that would fit: they must wait behind the held batch
        await wait_for(lambda: sample(d, "integrand_stream_batches_total", source="feed", outcome="refused") >= 3)
        assert (st.batches, up.acked) == (held_at, acked_at)
        if cls is ReadAheadLogSource:
            # At most read_ahead batches beyond the one refused (and the group it came in), read before
            # the refusal; none while it lasts.
            assert ReadAheadLogSource.yielded <= read_at + ReadAheadLogSource.read_ahead + 1
            assert ReadAheadLogSource.yielded < n + 10
        assert st.status()["state"] == "store-refused"
        assert "full" in (st.last_error or "")
        while await d.store.prune(time.time() + 1) > 0:
            pass
        await wait_for(lambda: up.acked == n + 10, timeout=20)
        accepted = sample(d, "integrand_events_enqueued_total", source="feed", outcome="accepted")
    assert accepted == n + 10  # every message stored once, the held one included
    acks = up.acks()
    assert [a for a, _ in acks] == list(range(1, n + 11))  # acknowledged in order, none skipped


async def test_lost_position_runs_the_resync_and_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    up = Upstream(tmp_path / "upstream")
    up.publish(messages(0, 10))
    s = settings(tmp_path, FEED.format(batch=5) + ROUTED)
    out = tmp_path / "var" / "out.jsonl"
    db = tmp_path / "var" / "integrand.db"
    async with running_daemon(s):
        await wait_for(lambda: up.acked == 10, timeout=20)
    # While integrand was down the log moved on and dropped what integrand had not seen (11..49).
    up.publish(messages(10, 60))
    up.set("retained_from", 50)
    snapshot = [{"id": f"snap-e{k}", "entity_id": f"e{k}", "v": 60 + k, "data": {"state": k}} for k in range(3)]
    (up.dir / "snapshot.jsonl").write_bytes(b"".join(orjson.dumps(m) + b"\n" for m in snapshot))
    caplog.set_level(logging.INFO, logger="integrand.streamer")
    async with running_daemon(s) as d:
        await wait_for(lambda: stream_cursor(db) == 70, timeout=20)
        up.publish(messages(70, 4))
        await wait_for(lambda: stream_cursor(db) == 74 and up.acked == 74, timeout=20)
        assert sample(d, "integrand_stream_alerts_total", source="feed", reason="position_lost") == 1
        assert sample(d, "integrand_stream_resyncs_total", source="feed", outcome="done") == 1
        await wait_for(lambda: len(read_jsonl(out)) == 10 + 3 + 4, timeout=20)
    text = caplog.text
    assert "position 10 is no longer available upstream (the log starts at 50; messages 11..49 expired)" in text
    assert "resync done" in text and "3 event(s) in 1 batch(es)" in text
    ids = stored_ids(db)
    assert ids[:10] == [f"m{i}" for i in range(10)]
    assert ids[10:13] == ["snap-e0", "snap-e1", "snap-e2"]
    assert ids[13:] == [f"m{i}" for i in range(70, 74)]


class Flaky(LogSource):
    """Fails its first subscriptions as an upstream might: revoked credentials, then a dropped connection."""

    script: list[BaseException] = []

    async def stream(self, position: Any) -> AsyncIterator[StreamBatch]:
        if Flaky.script:
            raise Flaky.script.pop(0)
        async for b in super().stream(position):
            yield b


async def test_auth_error_alerts_and_waits_retryable_reconnects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = Upstream(tmp_path / "upstream")
    up.publish(messages(0, 4))
    Flaky.script = [AuthError("token revoked"), RetryableError("connection reset"), RetryableError("again")]
    caplog.set_level(logging.INFO, logger="integrand.streamer")
    async with running_daemon(settings(tmp_path, FEED.format(batch=10) + ROUTED, Flaky)) as d:
        await wait_for(lambda: up.acked == 4, timeout=20)
        assert sample(d, "integrand_stream_alerts_total", source="feed", reason="auth") == 1
        assert sample(d, "integrand_stream_reconnects_total", source="feed") == 2
        assert d.streamers["feed"].errors_in_a_row == 0
    assert "ALERT source feed: re-authentication needs a human (AuthError: token revoked)" in caplog.text
    assert "stream interrupted (RetryableError: connection reset); reconnecting in" in caplog.text


async def test_connector_without_resync_alerts_and_keeps_position(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class NoResync(LogSource):
        def resync(self, lost: PositionLost) -> AsyncIterator[StreamBatch]:
            return super(LogSource, self).resync(lost)  # the base class's: no resync path

    up = Upstream(tmp_path / "upstream")
    up.publish(messages(0, 3))
    up.set("acked", 0)
    db = tmp_path / "var" / "integrand.db"
    s = settings(tmp_path, FEED.format(batch=5), NoResync)
    async with running_daemon(s):
        await wait_for(lambda: stream_cursor(db) == 3, timeout=20)
    up.set("retained_from", 10)
    caplog.set_level(logging.INFO, logger="integrand.streamer")
    async with running_daemon(s) as d:
        await wait_for(lambda: sample(d, "integrand_stream_alerts_total", source="feed", reason="permanent") >= 1)
        assert sample(d, "integrand_stream_resyncs_total", source="feed", outcome="failed") >= 1
    assert "this connector has no resync path" in caplog.text
    assert stream_cursor(db) == 3  # never moved past the gap silently


# --- a real daemon, killed -------------------------------------------------------------------------

QUIET = BASE.replace('log_level = "debug"', 'log_level = "info"')


# The same log connector, settled one batch at a time and read ahead (group commit).
CONNECTORS = pytest.mark.parametrize("connector", ["streamlog", "streamlog-ahead"])


def proc_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connector: str = "streamlog") -> Path:
    for k, v in install_entry_point(tmp_path / "ep").items():
        monkeypatch.setenv(k, v)
    feed = FEED.replace('connector = "streamlog"', f'connector = "{connector}"')
    return write(tmp_path, feed.format(batch=25) + ROUTED, base=QUIET)


def check_once_in_order(out: Path, n: int) -> None:
    """Every message reached the sink; repeats only where a kill -9 cut a delivery (first copies in order)."""
    first: dict[str, dict[str, Any]] = {}
    for line in read_jsonl(out):
        first.setdefault(line["id"], line)
    assert set(first) == {f"m{i}" for i in range(n)}
    by_entity: dict[str, list[int]] = {}
    for line in first.values():
        by_entity.setdefault(line["entity_id"], []).append(int(line["version"]))
    assert all(v == sorted(v) for v in by_entity.values())


@CONNECTORS
async def test_kill9_between_receipt_and_commit_redelivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connector: str
) -> None:
    cfg = proc_config(tmp_path, monkeypatch, connector)
    up = Upstream(tmp_path / "upstream")
    db = tmp_path / "var" / "integrand.db"
    up.publish(messages(0, 200))
    up.set("stall_receive", 130)  # the batch 126..150 is received and never committed
    d = DaemonProcess(cfg, tmp_path / "daemon.log")
    await d.start()
    try:
        await wait_for(lambda: (up.dir / "stalled_receive").exists(), timeout=30)
        if connector == "streamlog":
            assert stream_cursor(db) == 125 == up.acked
        else:  # read ahead: the batches before it may still be committing when it stalls
            await wait_for(lambda: stream_cursor(db) == 125 == up.acked, timeout=30)
        await d.kill()
        assert stream_cursor(db) == 125
        up.clear("stall_receive")
        up.publish(messages(200, 50))
        await d.start()
        await wait_for(lambda: up.acked == 250, timeout=30)
        await wait_for(lambda: len({ln["id"] for ln in read_jsonl(tmp_path / "var" / "out.jsonl")}) == 250, timeout=30)
    finally:
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
    assert stored_ids(db) == [f"m{i}" for i in range(250)]
    check_once_in_order(tmp_path / "var" / "out.jsonl", 250)


@CONNECTORS
async def test_kill9_between_commit_and_ack_is_absorbed_by_dedup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connector: str
) -> None:
    cfg = proc_config(tmp_path, monkeypatch, connector)
    up = Upstream(tmp_path / "upstream")
    db = tmp_path / "var" / "integrand.db"
    up.publish(messages(0, 200))
    up.set("stall_ack", 130)  # the batch 126..150 is committed and never acknowledged
    d = DaemonProcess(cfg, tmp_path / "daemon.log")
    await d.start()
    try:
        await wait_for(lambda: (up.dir / "stalled_ack").exists(), timeout=30)
        await d.kill()
        # Committed ahead of the upstream's ack floor (read ahead, the batches after it may have committed too).
        assert up.acked == 125
        if connector == "streamlog":
            assert stream_cursor(db) == 150
        else:
            assert stream_cursor(db) >= 150
        up.clear("stall_ack")
        await d.start()
        await wait_for(lambda: up.acked == 200, timeout=30)
        await wait_for(lambda: len({ln["id"] for ln in read_jsonl(tmp_path / "var" / "out.jsonl")}) == 200, timeout=30)
    finally:
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
    # 126..150 came again and was absorbed: each message is stored once.
    assert stored_ids(db) == [f"m{i}" for i in range(200)]
    assert (126, 150) in up.acks()
    check_once_in_order(tmp_path / "var" / "out.jsonl", 200)


@CONNECTORS
async def test_sigterm_stops_after_the_last_commit_and_its_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connector: str
) -> None:
    cfg = proc_config(tmp_path, monkeypatch, connector)
    up = Upstream(tmp_path / "upstream")
    db = tmp_path / "var" / "integrand.db"
    d = DaemonProcess(cfg, tmp_path / "daemon.log")
    await d.start()
    try:
        for k in range(20):  # a steady stream, stopped in the middle of it
            up.publish(messages(k * 30, 30))
            if k == 10:
                await wait_for(lambda: (up.acked or 0) > 0, timeout=30)
    finally:
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0, d.output()
    # Stopped cleanly: what was committed was acknowledged, nothing half-way.
    assert stream_cursor(db) == up.acked
    assert len(stored_ids(db)) == up.acked
    assert "stopped" in d.output()
