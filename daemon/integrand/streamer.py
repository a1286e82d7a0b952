"""The streaming side: one task per streaming source, commit-then-ack, backpressure, reconnects and resyncs.

A streaming connector (:class:`~integrand.connector.StreamingSource`) yields batches of events with
a resume position. For each batch the :class:`Streamer` commits the events and the position in one
transaction (cursor kind ``stream``) and only then calls the connector's ``ack``: a crash between
receipt and commit means redelivery, and event ids absorb it. While the store refuses, nothing new
is read and the same batch is retried; errors are sorted by what to do next (reconnect with backoff,
alert and wait for a human, resync in full after a lost position), and a stop lets the batch being
committed finish and be acknowledged first.

A connector with ``read_ahead`` (the PostgreSQL source) is read while the last batches commit, and
what arrived meanwhile is committed as one group: one transaction (its events, its rejections and
the last batch's position, so each batch's position is stored with its events), then one ack per
batch in order. A group the store refuses, or cannot hold, is taken apart and settled one batch at
a time, exactly as without read-ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from .backoff import retry_delay
from .config import Settings, SourceCore, StreamSettings
from .connector import PositionLost, StreamBatch, StreamingSource
from .errors import AuthError, PermanentError, RetryableError, StoreUnavailable
from .intake import intake
from .metrics import Metrics
from .routes import Router
from .store import Store

log = logging.getLogger("integrand.streamer")

KIND = "stream"
# How long a stop waits for the batch being committed (and its ack) before giving it up to redelivery.
STOP_GRACE = 10.0


@dataclass(frozen=True)
class StreamMetrics:
    """The streaming sources' metrics, registered once per daemon registry."""

    batches: Counter
    alerts: Counter
    reconnects: Counter
    resyncs: Counter
    up: Gauge
    lag: Gauge


_metrics: weakref.WeakKeyDictionary[CollectorRegistry, StreamMetrics] = weakref.WeakKeyDictionary()


def stream_metrics(m: Metrics) -> StreamMetrics:
    """This daemon's stream metrics (kept here so the shared metrics module needs no edit)."""
    found = _metrics.get(m.registry)
    if found is None:
        r = m.registry
        found = StreamMetrics(
            batches=Counter(
                "integrand_stream_batches",
                "Streamed batches by source and outcome (committed, refused, released)",
                ["source", "outcome"],
                registry=r,
            ),
            alerts=Counter(
                "integrand_stream_alerts",
                "Stream errors that need a human (auth, permanent, position_lost), by source",
                ["source", "reason"],
                registry=r,
            ),
            reconnects=Counter(
                "integrand_stream_reconnects", "Reconnects after a retryable stream error", ["source"], registry=r
            ),
            resyncs=Counter(
                "integrand_stream_resyncs", "Full resyncs run after a lost position", ["source", "outcome"], registry=r
            ),
            up=Gauge(
                "integrand_stream_up", "1 while a streaming source is connected and reading", ["source"], registry=r
            ),
            # From a connector's optional stream_lag() (a PostgreSQL slot: bytes of WAL not yet confirmed).
            lag=Gauge(
                "integrand_stream_lag",
                "How far behind the upstream a streaming source says it is",
                ["source"],
                registry=r,
            ),
        )
        _metrics[m.registry] = found
    return found


@dataclass(frozen=True)
class _End:
    """What the read-ahead puts after the last batch it read: the stream's error, or None if it ended."""

    error: BaseException | None


class Streamer:
    """Runs one streaming source for as long as the daemon runs."""

    def __init__(
        self,
        name: str,
        connector: StreamingSource,
        store: Store,
        router: Router,
        settings: StreamSettings,
        *,
        metrics: Metrics | None = None,
        rejections_kept: int = 1000,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ):
        self.name = name
        self.connector = connector
        self.store = store
        self.router = router
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.m = stream_metrics(self.metrics)
        self.rejections_kept = rejections_kept
        self.sleep = sleep
        self.rand = rand
        self.clock = clock
        self.state = "starting"
        self.position: Any = None
        self.batches = 0
        self.events = 0
        self.last_error: str | None = None
        self.errors_in_a_row = 0
        self._lost: PositionLost | None = None
        # Cleared while the store refuses: the read-ahead reads nothing new meanwhile.
        self._may_read = asyncio.Event()
        self._may_read.set()

    # --- the task -------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                if self._lost is not None:
                    await self._resync(self._lost)
                    self._lost = None
                else:
                    await self._stream()
                    raise RetryableError("the upstream ended the subscription")
            except PositionLost as e:
                self._lost = e
                self.m.alerts.labels(self.name, "position_lost").inc()
                log.error(
                    "source %s: position %r is no longer available upstream (%s%s); running the full resync",
                    self.name,
                    e.position if e.position is not None else self.position,
                    e,
                    f"; {e.detail}" if e.detail else "",
                )
            except (AuthError, PermanentError) as e:
                await self._alert(e)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await self._backoff(e)
            finally:
                self.m.up.labels(self.name).set(0)

    async def _stream(self) -> None:
        self.position = await self.store.cursor_get(self.name, KIND)
        self.state = "connecting"
        log.info("source %s: streaming from position %r", self.name, self.position)
        batches = self.connector.stream(self.position)
        try:
            self.state = "streaming"
            self.m.up.labels(self.name).set(1)

            def settled(_group: list[StreamBatch]) -> None:
                self.errors_in_a_row = 0
                self.last_error = None

            await self._pump(batches, settled)
        finally:
            await _aclose(batches)

    async def _resync(self, lost: PositionLost) -> None:
        self.state = "resync"
        started = self.clock()
        n_batches = n_events = 0
        try:
            batches = self.connector.resync(lost)

            def settled(group: list[StreamBatch]) -> None:
                nonlocal n_batches, n_events
                n_batches += len(group)
                n_events += sum(len(b.events) for b in group)

            try:
                await self._pump(batches, settled)
            finally:
                await _aclose(batches)
        except BaseException:
            self.m.resyncs.labels(self.name, "failed").inc()
            raise
        self.m.resyncs.labels(self.name, "done").inc()
        log.warning(
            "source %s: resync done in %.1f s: %d event(s) in %d batch(es); streaming resumes from position %r",
            self.name,
            self.clock() - started,
            n_events,
            n_batches,
            self.position,
        )

    async def _pump(self, batches: AsyncIterator[StreamBatch], settled: Callable[[list[StreamBatch]], None]) -> None:
        """Settle every batch of ``batches`` in order, telling ``settled`` of each group; returns when they end.

        Without read-ahead, one batch at a time: the next is read only once this one is acknowledged.
        With it, a reader task keeps up to ``read_ahead`` batches read beyond the ones committing, and
        each commit takes every batch read meanwhile (group commit). The stream's error, if it ends
        with one, is raised once the batches read before it are settled."""
        depth = max(0, int(getattr(self.connector, "read_ahead", 0) or 0))
        if depth == 0:
            async for batch in batches:
                await self._settle([batch])
                settled([batch])
            return
        self._may_read.set()  # a new subscription reads (a refusal that ended in an error left it cleared)
        ahead: asyncio.Queue[StreamBatch | _End] = asyncio.Queue()
        room = asyncio.Semaphore(depth + 1)  # read and not yet settled: the groups committing, plus read_ahead
        reader = asyncio.create_task(self._read_ahead(batches, ahead, room), name=f"stream-read-{self.name}")
        try:
            while True:
                item = await ahead.get()
                group: list[StreamBatch] = []
                while isinstance(item, StreamBatch):
                    group.append(item)
                    if ahead.empty():
                        break
                    item = ahead.get_nowait()
                if group:
                    await self._settle(group)
                    for _ in group:
                        room.release()
                    settled(group)
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
        finally:
            reader.cancel()
            await asyncio.wait({reader})

    async def _read_ahead(
        self, batches: AsyncIterator[StreamBatch], ahead: asyncio.Queue[StreamBatch | _End], room: asyncio.Semaphore
    ) -> None:
        """The read-ahead task: the connector's batches into ``ahead`` while there is room and the store is
        not refusing, then how the stream ended."""
        while True:
            await room.acquire()
            await self._may_read.wait()
            try:
                batch = await anext(batches)
            except StopAsyncIteration:
                ahead.put_nowait(_End(None))
                return
            except Exception as e:
                ahead.put_nowait(_End(e))
                return
            ahead.put_nowait(batch)

    async def _settle(self, group: list[StreamBatch]) -> None:
        """Commit then ack a group of batches; a stop (cancel) waits for both rather than cutting between them."""
        task = asyncio.ensure_future(self._commit_and_ack(group))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STOP_GRACE
            while not task.done() and (left := deadline - loop.time()) > 0:
                try:
                    await asyncio.wait({task}, timeout=left)
                except asyncio.CancelledError:
                    continue  # shutdown cancels again: this batch still gets its commit and ack, within the grace
            if not task.done():
                task.cancel()
                log.warning("source %s: stopped before the last batch committed; it will be redelivered", self.name)
            elif not task.cancelled() and task.exception() is not None:
                log.warning("source %s: the last batch before the stop: %s", self.name, task.exception())
            raise

    async def _commit_and_ack(self, group: list[StreamBatch]) -> None:
        if len(group) > 1:
            try:
                await self._commit(group)
            except Exception:
                # Refused (the store is full or locked) or unstorable: one batch at a time, as without
                # read-ahead, so the refusals, the backoff and a bad batch's error are each batch's own,
                # and the good batches before a bad one commit.
                for batch in group:
                    await self._commit_and_ack([batch])
                return
            await self._acked(group)
            return
        [batch] = group
        attempt = 0
        while True:
            try:
                await self._commit(group)
                break
            except StoreUnavailable as e:
                attempt += 1
                self.state = "store-refused"
                self._may_read.clear()
                self.last_error = f"{type(e).__name__}: {e}"
                released = await self.connector.refused(batch, e)
                self.m.batches.labels(self.name, "released" if released else "refused").inc()
                delay = retry_delay(attempt, base=self.settings.backoff_base, cap=self.settings.backoff_cap, rand=1.0)
                log.warning(
                    "source %s: the store refused a batch of %d (%s); %s, next try in %.1f s",
                    self.name,
                    len(batch.events),
                    e,
                    "handed back upstream" if released else "holding it and reading nothing new",
                    delay,
                )
                await self.sleep(delay)
                if released:
                    self._may_read.set()
                    return
        await self._acked(group)

    async def _acked(self, group: list[StreamBatch]) -> None:
        """After the commit: each batch acknowledged upstream, in order."""
        self.state = "streaming"
        self._may_read.set()
        for batch in group:
            await self.connector.ack(batch)
        lag = getattr(self.connector, "stream_lag", None)
        if lag is not None and (value := lag()) is not None:
            self.m.lag.labels(self.name).set(value)

    async def _commit(self, group: list[StreamBatch]) -> None:
        """One transaction: the group's rejections, events and last position (a position is stored with its events)."""
        for batch in group:
            for r in batch.rejected:
                # Queued before the enqueue below on the same writer, so it commits with or before it.
                self.store.record_rejection(self.name, r.status, r.reason, None, dict(r.headers), self.rejections_kept)
                log.warning("source %s: rejected a message: %s", self.name, r.reason)
        last = group[-1]
        events = last.events if len(group) == 1 else [ev for b in group for ev in b.events]
        if events or any(b.rejected for b in group) or last.position != self.position:
            # An event the store cannot hold (UnstorableEvent, a connector bug) is a PermanentError: an
            # alert, nothing stored or acked, the position unmoved.
            await intake(
                self.store, self.router, self.name, events, metrics=self.metrics, cursor=last.position, kind=KIND
            )
        self.position = last.position
        self.batches += len(group)
        self.events += len(events)
        self.m.batches.labels(self.name, "committed").inc(len(group))

    async def _alert(self, e: BaseException) -> None:
        reason = "auth" if isinstance(e, AuthError) else "permanent"
        self.state = f"alert:{reason}"
        self.last_error = f"{type(e).__name__}: {e}"
        self.m.alerts.labels(self.name, reason).inc()
        log.error(
            "ALERT source %s: %s needs a human (%s); the stream waits %.0f s before trying again",
            self.name,
            "re-authentication" if reason == "auth" else "this error",
            self.last_error,
            self.settings.alert_retry,
        )
        await self.sleep(self.settings.alert_retry)

    async def _backoff(self, e: BaseException) -> None:
        self.errors_in_a_row += 1
        self.state = "reconnecting"
        self.last_error = f"{type(e).__name__}: {e}"
        self.m.reconnects.labels(self.name).inc()
        delay = retry_delay(
            self.errors_in_a_row,
            base=self.settings.backoff_base,
            cap=self.settings.backoff_cap,
            rand=0.5 + 0.5 * self.rand(),
            retry_after=getattr(e, "retry_after", None),
        )
        if isinstance(e, RetryableError | StoreUnavailable):
            log.warning("source %s: stream interrupted (%s); reconnecting in %.1f s", self.name, self.last_error, delay)
        else:
            log.warning("source %s: stream failed; reconnecting in %.1f s", self.name, delay, exc_info=e)
        await self.sleep(delay)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "position": self.position,
            "batches": self.batches,
            "events": self.events,
            "errors_in_a_row": self.errors_in_a_row,
            "last_error": self.last_error,
        }


async def _aclose(batches: AsyncIterator[StreamBatch]) -> None:
    """Close a connector's generator (its ``finally`` blocks release the subscription) on any way out."""
    aclose = getattr(batches, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def streamers_for(
    settings: Settings, connectors: Mapping[str, object], store: Store, router: Router, metrics: Metrics
) -> dict[str, Streamer]:
    """A Streamer for every configured source whose connector streams (what ``app`` starts as tasks)."""
    out: dict[str, Streamer] = {}
    for name, cs in settings.sources.items():
        inst = connectors[f"source:{name}"]
        core = cs.core
        assert isinstance(core, SourceCore)
        if isinstance(inst, StreamingSource):
            out[name] = Streamer(
                name,
                inst,
                store,
                router,
                core.streaming,
                metrics=metrics,
                rejections_kept=settings.daemon.rejections_kept,
            )
    return out
