"""Workers that lease ready deliveries, call sinks, and record ack / retry / dead-letter.

Each worker leases one batch for one sink at a time, so what a worker holds is
bounded by the sink's batch size and never outlives its lease. Per-entity order
comes from the store (only the head of each (sink, entity) line is leasable);
per-sink circuit breakers keep a sink that is down from burning attempts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from . import breaker as br
from .backoff import retry_delay, should_give_up
from .config import RetrySettings
from .connector import Enricher, Sink
from .errors import AuthError, PermanentError, RetryableError
from .events import Event
from .metrics import Metrics
from .routes import RouteRuntime
from .store import Leased, Outcome, Store
from .waits import wait_event

log = logging.getLogger("integrand.dispatcher")


class _Skipped:
    """A delivery the route decided not to send (an echo of integrand's own write, or no change)."""


SKIPPED = _Skipped()


@dataclass(frozen=True)
class _RouteFailure:
    """A delivery that failed before reaching the sink (enrichment, mapping): no evidence about the sink."""

    error: BaseException


MIN_IDLE = 0.005  # floor on an idle wait, so a race can never become a busy loop


@dataclass
class SinkRuntime:
    """A configured sink as the dispatcher sees it; ``breaker`` is replaced on every transition."""

    name: str
    connector: Sink
    batch_size: int
    retry: RetrySettings
    breaker: br.Breaker
    auth_error: str | None = None  # set while the sink is paused because its credentials were refused


def _about(row: Leased, e: BaseException) -> dict[str, str]:
    """The event a log line is about and the provider's request id, as JSON-log fields (integrand.logs)."""
    out = {"event_id": row.event.id, "source": row.event.source}
    rid = getattr(e, "request_id", None)
    if rid:
        out["request_id"] = str(rid)
    return out


def describe_error(e: BaseException) -> str:
    """One string for the DLQ and the audit: the class, the message, the provider's request id."""
    text = f"{type(e).__name__}: {e}"
    rid = getattr(e, "request_id", None)
    if rid:
        text += f" (request id {rid})"
    if not isinstance(e, RetryableError | PermanentError | AuthError):
        text += "\n" + "".join(traceback.format_exception(e))[-4000:]
    return text


class Dispatcher:
    def __init__(
        self,
        store: Store,
        sinks: dict[str, SinkRuntime],
        *,
        workers: int = 8,
        lease_seconds: float = 60.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        idle_poll: float = 1.0,
        linger: float = 0.0,
        routes: RouteRuntime | None = None,
    ):
        self.store = store
        self.routes = routes
        self.sinks = sinks
        self.workers = workers
        self.lease_seconds = lease_seconds
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.rand = rand
        self.idle_poll = idle_poll
        self.linger = linger
        self._hold: dict[str, float] = {}  # sink → loop time before which it is not leased again (linger)
        self._stopping = False
        self._gen = 0
        self._empty: dict[str, int] = {}
        # Sinks a worker is leasing for right now: the others leave them alone until that lease returns,
        # or every commit would wake all workers into leases that find nothing (each one a store write).
        self._leasing: set[str] = set()
        # The next_due query in flight, shared by the workers that go idle while it runs.
        self._due_query: tuple[tuple[str, ...], asyncio.Future[float | None]] | None = None
        self._order = itertools.cycle(sorted(sinks)) if sinks else None
        self._tasks: list[asyncio.Task[None]] = []
        # One idle worker watches for commits and due times; the other idle workers wait here until a
        # worker that found work wakes one of them, so a commit wakes one worker, not all of them.
        self._watching = False
        self._parked: collections.deque[asyncio.Future[None]] = collections.deque()
        # Sinks with deliveries in the store that are not configured (removed): never waited for.
        self.absent: set[str] = set()
        # Breakers of sources that enrich deliveries (``enrich = true`` routes): a source that is down
        # pauses those deliveries the way a sink outage pauses a sink's.
        self.source_breakers: dict[str, br.Breaker] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until ``stop()``; in-flight batches finish before this returns."""
        while not self.sinks:  # until a config reload adds one
            await self._wait_stopping(until_sinks=True)
            if self._stopping:
                return
        self._tasks = [asyncio.create_task(self._worker(i), name=f"dispatch-{i}") for i in range(self.workers)]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> None:
        self._stopping = True
        self.store.deliveries_ready.set()
        while self._parked:
            self._unpark()

    def _unpark(self) -> None:
        """Wake one parked worker, if any: there may be work for another sink, or the next batch."""
        while self._parked:
            fut = self._parked.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _wait_for_work(self) -> None:
        if self._watching:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._parked.append(fut)
            await fut
            return
        self._watching = True
        try:
            await self._idle()
        finally:
            self._watching = False

    async def _wait_stopping(self, until_sinks: bool = False) -> None:
        while not self._stopping and not (until_sinks and self.sinks):
            await self.store.deliveries_ready.wait()
            self.store.deliveries_ready.clear()

    def replace_sinks(self, sinks: dict[str, SinkRuntime], absent: set[str]) -> None:
        """A config reload: from now on lease for these sinks. A worker in the middle of a batch for a
        removed or replaced sink finishes it with the runtime it holds; nothing leased is dropped."""
        self.sinks = sinks
        self.absent = absent - set(sinks)
        self._order = itertools.cycle(sorted(sinks)) if sinks else None
        self._empty.clear()
        self.store.deliveries_ready.set()
        while self._parked:
            self._unpark()

    # --- workers -------------------------------------------------------------------------------

    async def _worker(self, n: int) -> None:
        while not self._stopping:
            picked = self._pick()
            if picked is None:
                await self._wait_for_work()
                continue
            self._unpark()
            sink, limit, probing = picked
            gen = self._gen
            self._leasing.add(sink.name)
            try:
                rows = await self.store.lease(limit, self.lease_seconds, only=sink.name, due_only=not probing)
            except Exception as e:
                self._leasing.discard(sink.name)  # before idling, not after
                if probing:
                    sink.breaker = br.on_failure(sink.breaker, self.clock())
                log.error("cannot lease deliveries for sink %s: %s", sink.name, e)
                await self._idle()
                continue
            finally:
                self._leasing.discard(sink.name)
            if len(rows) < limit:
                self._empty[sink.name] = gen
                if rows and self.linger > 0 and limit > 1:
                    # Under a steady trickle every lease would take a handful; letting deliveries gather
                    # for a few ms makes batches (one lease, one write, one ack for many) at little latency.
                    self._hold[sink.name] = asyncio.get_running_loop().time() + self.linger
            else:  # a full batch: there may be more, so wake the workers that skipped this sink meanwhile
                self.store.deliveries_ready.set()
            if not rows:
                if probing:  # nothing to probe with: stay open, probe again when work arrives
                    sink.breaker = replace(sink.breaker, status="open")
                continue
            if getattr(sink.connector, "completes_each", False):
                await self._deliver_each(sink, rows, probing)
            else:
                await self._deliver(sink, rows, probing)

    async def _deliver_each(self, sink: SinkRuntime, rows: Sequence[Leased], probing: bool) -> None:
        """A batch whose deliveries each take their own time (a saga runs several provider calls, retry
        pauses included): each is recorded when it ends, so none waits for the slowest of its batch (its
        retry falls due later, its entity's next delivery waits for it). The outcomes that end together
        still share a group commit."""
        await asyncio.gather(*(self._deliver(sink, [row], probing) for row in rows))

    def _pick(self) -> tuple[SinkRuntime, int, bool] | None:
        """The next sink (round robin) that has work and whose breaker lets a batch through."""
        if self._order is None:  # every sink removed by a reload
            return None
        now = self.clock()
        for _ in range(len(self.sinks)):
            sink = self.sinks[next(self._order)]
            if self._empty.get(sink.name) == self._gen or sink.name in self._leasing:
                continue
            if self._hold and self._hold.get(sink.name, 0.0) > asyncio.get_running_loop().time():
                continue
            permit, new = br.permit(sink.breaker, now)
            if permit == "no":
                continue
            if permit == "probe":
                sink.breaker = new
                log.info("sink %s: circuit half-open, sending one probe delivery", sink.name)
                return sink, 1, True
            return sink, sink.batch_size, False
        return None

    async def _idle(self) -> None:
        """Sleep until new deliveries are committed, a retry falls due, or a breaker may probe.

        Waking every ``idle_poll`` (a clock that tests speed up is read again), it leases again only
        if something is due then: an idle daemon reads ``next_due`` once a second but commits nothing."""
        while True:
            timeout = self.idle_poll
            now = self.clock()
            paused = [s.name for s in self.sinks.values() if s.breaker.status != "closed"] + sorted(self.absent)
            due: float | None = None
            known = False
            with contextlib.suppress(Exception):
                due = await self._next_due(paused)
                known = True
                if due is not None:
                    timeout = min(timeout, max(MIN_IDLE, due - now))
            if known and (due is None or due > now) and self._quiet():
                # Only the store's next due time can end this wait (or a commit, which wakes it).
                woke = False
                if not self._stopping:
                    woke = await wait_event(self.store.deliveries_ready, timeout)
                if self._stopping or woke:
                    break
                if due is None or due > self.clock():
                    continue  # nothing fell due meanwhile: no lease (an empty write) this time
                break
            for s in self.sinks.values():
                if s.breaker.status == "open":
                    timeout = min(timeout, max(MIN_IDLE, s.breaker.reopens_at - now))
            if self._hold:
                loop_now = asyncio.get_running_loop().time()
                for until in self._hold.values():
                    if until > loop_now:
                        timeout = min(timeout, max(MIN_IDLE, until - loop_now))
            if timeout > 0 and not self._stopping:
                await wait_event(self.store.deliveries_ready, timeout)
            break
        if not self._stopping:
            self.store.deliveries_ready.clear()
        self._gen += 1

    def _quiet(self) -> bool:
        """No breaker waiting to probe and no sink lingering for a batch to gather: only due times matter."""
        loop_now = asyncio.get_running_loop().time()
        return all(until <= loop_now for until in self._hold.values()) and all(
            s.breaker.status == "closed" for s in self.sinks.values()
        )

    def _next_due(self, paused: list[str]) -> asyncio.Future[float | None]:
        """One next_due query for all the workers that wake on the same commit, not one each."""
        key = tuple(paused)
        if self._due_query is None or self._due_query[0] != key or self._due_query[1].done():
            query = asyncio.ensure_future(self.store.next_due(exclude=paused))
            query.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if all waiters left
            self._due_query = (key, query)
        return asyncio.shield(self._due_query[1])

    async def _send(
        self, sink: SinkRuntime, rows: Sequence[Leased]
    ) -> list[BaseException | _Skipped | _RouteFailure | None]:
        """Run each event through its route (enrich, map, loop guard), deliver what remains, one result per row."""
        prepared: list[Event | BaseException | None] = [r.event for r in rows]
        if self.routes is not None:
            prepared = await self.routes.prepare_batch(sink.name, [r.event for r in rows])
        send = [p for p in prepared if isinstance(p, Event)]
        sent: Sequence[BaseException | None] = await sink.connector.deliver_batch(send) if send else []
        if len(sent) != len(send):
            raise RuntimeError(f"deliver_batch returned {len(sent)} results for {len(send)} events")
        results = iter(sent)
        out: list[BaseException | _Skipped | _RouteFailure | None] = []
        written: list[Event] = []
        for p in prepared:
            if isinstance(p, Event):
                res = next(results)
                out.append(res)
                if res is None:
                    written.append(p)
            else:
                out.append(SKIPPED if p is None else _RouteFailure(p))
        routes = self.routes
        if routes is not None:
            written = [p for p in written if routes.guards(p.source, sink.name)]
        if written and routes is not None:
            # Together, so the loop guard's records of a batch share one group commit, not one each
            # (and only for guarded routes: a task per delivery costs a fifth of the throughput).
            done = await asyncio.gather(*(routes.delivered(sink.name, p) for p in written), return_exceptions=True)
            for e in done:
                if isinstance(e, Exception):  # only costs a redundant write later
                    log.warning("sink %s: cannot record what was written for the loop guard: %s", sink.name, e)
        return out

    def _enriches(self, sink: str, event: Event) -> bool:
        """Whether delivering ``event`` to ``sink`` fetches from its source first (a route with ``enrich``)."""
        return self._source_enriches(sink, event.source)

    def _source_enriches(self, sink: str, source: str) -> bool:
        if self.routes is None:
            return False
        cr = self.routes.pairs.get((source, sink))
        return cr is not None and cr.enrich and isinstance(self.routes.sources.get(source), Enricher)

    def _enriching(self, sink: SinkRuntime, rows: Sequence[Leased]) -> set[str]:
        """The sources of these rows whose deliveries to ``sink`` are enriched (asked once per source, not per row)."""
        if self.routes is None:
            return set()
        return {s for s in {r.event.source for r in rows} if self._source_enriches(sink.name, s)}

    def _source_breaker(self, source: str, like: br.Breaker) -> br.Breaker:
        b = self.source_breakers.get(source)
        if b is None:
            b = self.source_breakers[source] = br.Breaker(like.threshold, like.open_for, like.max_open_for)
        return b

    def _paused_sources(self, sink: SinkRuntime, rows: Sequence[Leased]) -> set[str]:
        """The enriching sources of these rows whose breaker is open: their rows wait, nothing is fetched."""
        paused: set[str] = set()
        now = self.clock()
        for source in self._enriching(sink, rows):
            permit, new = br.permit(self._source_breaker(source, sink.breaker), now)
            if permit == "no":
                paused.add(source)
            elif permit == "probe":
                self.source_breakers[source] = new
                log.info("source %s: enrichment circuit half-open, trying it again", source)
        return paused

    async def _deliver(self, sink: SinkRuntime, rows: Sequence[Leased], probing: bool) -> None:
        now = self.clock()
        paused = self._paused_sources(sink, rows) if self.routes is not None else set()
        waiting = [r for r in rows if r.event.source in paused]
        if waiting:
            rows = [r for r in rows if r.event.source not in paused]
        started = time.perf_counter()
        results: Sequence[BaseException | _Skipped | _RouteFailure | None] = []
        if rows:
            try:
                results = await asyncio.wait_for(self._send(sink, rows), timeout=self.lease_seconds * 0.9)
            except Exception as e:
                results = [e] * len(rows)
            self.metrics.delivery_seconds.labels(sink.name).observe(time.perf_counter() - started)
        now = self.clock()
        if probing and all(isinstance(r, _Skipped | _RouteFailure) for r in results):
            sink.breaker = replace(sink.breaker, status="open")  # nothing reached the sink: probe again later
        # The breakers first, then the outcomes: a batch sent as one request that failed is one failure
        # (its rows share the error), and rows that fail while a breaker is open spend no attempt, even
        # if they were already in flight when it opened.
        self._judge_sink(sink, rows, results, now)
        self._judge_sources(sink, rows, results, now)
        outcomes = [self._waiting_source(sink, r, now) for r in waiting]
        delivered = skipped = 0  # counted once per batch, not once per delivery
        for row, res in zip(rows, results, strict=True):
            if res is None:
                delivered += 1
                outcomes.append(Outcome(row, "done"))
            elif isinstance(res, _Skipped):
                skipped += 1
                outcomes.append(Outcome(row, "done"))
            elif isinstance(res, _RouteFailure):
                outcomes.append(self._route_failed(sink, row, res.error, now))
            else:
                outcomes.append(self._outcome(sink, row, res, probing, now))
        if delivered:
            self.metrics.deliveries.inc(sink.name, "done", amount=delivered)
        if skipped:
            self.metrics.deliveries.inc(sink.name, "skipped", amount=skipped)
        try:
            await self.store.complete(outcomes)
        except Exception as e:
            # The leases will expire and the deliveries will be retried: at-least-once.
            log.error("cannot record outcomes for sink %s (they will be redelivered): %s", sink.name, e)

    def _judge_sink(
        self,
        sink: SinkRuntime,
        rows: Sequence[Leased],
        results: Sequence[BaseException | _Skipped | _RouteFailure | None],
        now: float,
    ) -> None:
        """Update the sink's breaker from a batch's results, once per distinct error (once per request)."""
        if all(res is None for res in results):  # the common batch: the sink answered every row
            self._reachable(sink, sink.breaker.status)
            return
        counted: set[int] = set()
        for row, res in zip(rows, results, strict=True):
            before = sink.breaker.status
            if isinstance(res, _Skipped | _RouteFailure):
                continue
            if res is None or isinstance(res, PermanentError):
                self._reachable(sink, before)  # it answered, so it is up (a PermanentError: the data is wrong)
            elif isinstance(res, AuthError):
                sink.breaker = br.trip(sink.breaker, now)
                if sink.auth_error is None:
                    # The alert: once per pause, not once per delivery or probe.
                    log.critical(
                        "ALERT sink %s: authentication refused, sink paused until its credentials work again "
                        "(re-authorize it; deliveries wait without spending attempts): %s",
                        sink.name,
                        describe_error(res),
                    )
                sink.auth_error = describe_error(res)
                self.metrics.breaker_open.labels(sink.name).set(1)
            elif _is_outage(res):
                if id(res) in counted:
                    continue
                counted.add(id(res))
                sink.breaker = br.on_failure(sink.breaker, now)
                if sink.breaker.status == "open" and before != "open":
                    log.warning(
                        "sink %s: circuit open after %d failures; deliveries wait %g s without spending attempts",
                        sink.name,
                        sink.breaker.failures,
                        sink.breaker.current_open_for,
                    )
                    self.metrics.breaker_open.labels(sink.name).set(1)
            else:
                # A connector bug, not an outage: it spends attempts but does not pause the sink.
                log.error("sink %s: unexpected error delivering %d", sink.name, row.id, exc_info=res)
                if sink.breaker.status == "half_open":
                    sink.breaker = replace(sink.breaker, status="open")  # inconclusive probe: probe again

    def _judge_sources(
        self,
        sink: SinkRuntime,
        rows: Sequence[Leased],
        results: Sequence[BaseException | _Skipped | _RouteFailure | None],
        now: float,
    ) -> None:
        """Update the enriching sources' breakers: a source that cannot be fetched from is an outage too."""
        enriching = self._enriching(sink, rows)
        if not enriching:
            return
        counted: set[int] = set()
        for row, res in zip(rows, results, strict=True):
            source = row.event.source
            if source not in enriching:
                continue
            b = self._source_breaker(source, sink.breaker)
            if isinstance(res, _RouteFailure):
                if not _is_outage(res.error) or id(res.error) in counted:
                    continue
                counted.add(id(res.error))
                self.source_breakers[source] = nb = br.on_failure(b, now)
                if nb.status == "open" and b.status != "open":
                    log.warning(
                        "source %s: enrichment circuit open after %d failures; deliveries from it to %s wait "
                        "%g s without spending attempts",
                        source,
                        nb.failures,
                        sink.name,
                        nb.current_open_for,
                    )
            else:  # enrichment worked (whatever the sink then did)
                if b.status != "closed":
                    log.warning("source %s: enrichment works again, circuit closed", source)
                self.source_breakers[source] = br.on_success(b)

    def _waiting_source(self, sink: SinkRuntime, row: Leased, now: float) -> Outcome:
        """A delivery held back, unsent, because its enriching source's breaker is open: no attempt spent."""
        b = self.source_breakers[row.event.source]
        self.metrics.deliveries.inc(sink.name, "deferred")
        return Outcome(
            row,
            "retry",
            error=f"source {row.event.source!r} is unavailable for enrichment (circuit open)",
            next_attempt_at=max(now, b.reopens_at),
            count_attempt=False,
        )

    def _route_failed(self, sink: SinkRuntime, row: Leased, res: BaseException, now: float) -> Outcome:
        """Enrichment or mapping failed: dead-letter, wait out the source's open breaker, or retry on the
        delivery's own budget; the sink's breaker is untouched (nothing reached the sink)."""
        error = describe_error(res)
        if isinstance(res, PermanentError):
            self.metrics.deliveries.inc(sink.name, "dead")
            log.error(
                "sink %s: delivery %d cannot be prepared, dead-lettered: %s",
                sink.name,
                row.id,
                res,
                extra=_about(row, res),
            )
            return Outcome(row, "dead", error=error)
        policy = sink.retry
        source = self.source_breakers.get(row.event.source)
        if _is_outage(res) and source is not None and source.status == "open" and self._enriches(sink.name, row.event):
            if now - row.created_at >= policy.max_age:
                return self._dead(sink, row, error, res, row.attempts)
            self.metrics.deliveries.inc(sink.name, "deferred")
            return Outcome(row, "retry", error=error, next_attempt_at=max(now, source.reopens_at), count_attempt=False)
        if not isinstance(res, RetryableError):
            log.error("sink %s: unexpected error preparing delivery %d", sink.name, row.id, exc_info=res)
        self.metrics.deliveries.inc(sink.name, "retry")
        attempts = row.attempts + 1
        if should_give_up(attempts, now - row.created_at, max_attempts=policy.max_attempts, max_age=policy.max_age):
            return self._dead(sink, row, error, res, attempts)
        retry_after = getattr(res, "retry_after", None)
        delay = retry_delay(attempts, base=policy.base, cap=policy.cap, rand=self.rand(), retry_after=retry_after)
        return Outcome(row, "retry", error=error, next_attempt_at=now + delay)

    def _reachable(self, sink: SinkRuntime, before: str) -> None:
        """The sink answered: close its breaker and, if it was open, send its waiting retries now."""
        sink.breaker = br.on_success(sink.breaker)
        if sink.auth_error is not None:
            log.warning("sink %s: credentials accepted again, sink resumed", sink.name)
            sink.auth_error = None
        if before != "closed":
            log.warning("sink %s: circuit closed, the sink is back; waiting deliveries go out now", sink.name)
            self.metrics.breaker_open.labels(sink.name).set(0)
            task = asyncio.get_running_loop().create_task(self.store.expedite(sink.name))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _dead(self, sink: SinkRuntime, row: Leased, error: str, res: BaseException, attempts: int) -> Outcome:
        self.metrics.deliveries.inc(sink.name, "dead")
        log.error(
            "sink %s: delivery %d dead-lettered after %d attempts: %s",
            sink.name,
            row.id,
            attempts,
            res,
            extra=_about(row, res),
        )
        return Outcome(row, "dead", error=error)

    def _outcome(self, sink: SinkRuntime, row: Leased, res: BaseException, probing: bool, now: float) -> Outcome:
        """A failed delivery's outcome; the breaker has already been updated from the whole batch (``_judge_sink``)."""
        error = describe_error(res)
        if isinstance(res, PermanentError):
            self.metrics.deliveries.inc(sink.name, "dead")
            log.error(
                "sink %s: delivery %d failed permanently, dead-lettered: %s",
                sink.name,
                row.id,
                res,
                extra=_about(row, res),
            )
            return Outcome(row, "dead", error=error)
        if isinstance(res, AuthError):
            self.metrics.deliveries.inc(sink.name, "auth")
            return Outcome(row, "retry", error=error, next_attempt_at=sink.breaker.reopens_at, count_attempt=False)
        outage = _is_outage(res)
        retry_after = getattr(res, "retry_after", None)
        policy = sink.retry
        age = now - row.created_at
        if outage and (probing or sink.breaker.status != "closed"):
            if age >= policy.max_age:
                return self._dead(sink, row, error, res, row.attempts)
            self.metrics.deliveries.inc(sink.name, "deferred")
            # Not counted (the sink is down, not this delivery). A probe's delivery is also pushed back by
            # backoff, so the next probe (which takes the head falling due soonest, due or not) tries
            # another delivery: one poison delivery cannot keep the breaker open forever.
            nxt = max(sink.breaker.reopens_at, now + (retry_after or 0.0))
            if probing:
                nxt = max(nxt, now + retry_delay(row.attempts + 1, base=policy.base, cap=policy.cap, rand=self.rand()))
            return Outcome(row, "retry", error=error, next_attempt_at=nxt, count_attempt=False)
        self.metrics.deliveries.inc(sink.name, "retry")
        attempts = row.attempts + 1
        if should_give_up(attempts, age, max_attempts=policy.max_attempts, max_age=policy.max_age):
            return self._dead(sink, row, error, res, attempts)
        delay = retry_delay(attempts, base=policy.base, cap=policy.cap, rand=self.rand(), retry_after=retry_after)
        return Outcome(row, "retry", error=error, next_attempt_at=now + delay)


def _is_outage(e: BaseException) -> bool:
    """Whether an error says the other side is unavailable (not that this delivery is wrong)."""
    return isinstance(e, RetryableError | TimeoutError | ConnectionError)
