"""Running multi-step routes (sagas): steps in order, each a keyed sink delivery, state in the store, undo in reverse.

A ``[[sagas]]`` entry names a source, a filter and a list of steps, each a sink with its own mapping
(and optionally a compensation: a sink action that undoes the step). Its events are routed to a
virtual sink ``~saga:NAME`` (as aggregated routes' events go to ``~agg`` sinks), so each saga is one
delivery of the queue: leased, retried with backoff, per-entity ordered, dead-lettered. The
dispatcher hands it to :class:`SagaRunner`, which walks the steps with the pure policy of
:mod:`integrand.saga` and commits the saga's state (``scope = "saga"``, key = the saga id) after
every step outcome; that commit overlaps the next step's call (it is waited for before the outcome
after it is written, and before the delivery ends), so no disk flush sits between two steps. So a crash
at any point resumes the saga where it was: steps whose outcome is recorded are not run again, and the
step in flight (with the one before it, if its commit had not landed) is sent again with the same
idempotency key (``SOURCE:EVENT~SAGA:STEP``, the step event's ``key``), which an idempotent sink
absorbs.

- A step that fails retryably returns the error to the dispatcher (the saga delivery is retried on
  its backoff; nothing is undone); after ``step_attempts`` tries it counts as failed for good.
- A step that fails permanently (a 4xx, a mapping or schema error, or ``step_attempts`` used up)
  starts compensation: the completed steps that declare one are undone in reverse order, each with
  its own key (``…:STEP:undo``) and ``compensation_attempts`` tries. Then the delivery is
  dead-lettered as ``SagaCompensated`` (nothing of the change stays anywhere).
- A compensation that keeps failing leaves the saga in ``manual``: dead-lettered as
  ``SagaNeedsIntervention`` (the DLQ row says MANUAL INTERVENTION), an ALERT log line, and the
  ``integrand_sagas_total{status="manual"}`` counter. Replaying that dead letter retries the
  compensation where it stopped.

- A step or undo goes to its sink only while that sink's breaker (the dispatcher's runtime) lets it, and
  its outages count there; while it is open (or as its probe) an outage spends no attempt (``SinkPaused``).
- The loop guard: a saga that finishes ``done`` keeps, per record, what each step sent (a fingerprint) and
  got back (scope ``loop-guard:~saga:NAME``); a later saga of the record does not send a step whose
  payload is the same (``unchanged``: integrand's own write-back seen again by polling or reconciliation).
- Each saga's delivery is recorded when it ends (``completes_each``), not with the rest of its lease.

Each step sees ``steps.<name>.<field>``: what earlier steps' sinks returned (``Sink.deliver_result``,
e.g. the id the HubSpot contact or the CRM customer got). ``integrand saga show ID`` prints the
saga's record: every step and compensation attempt with its outcome and time.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import Field, ValidationError, field_validator, model_validator

from . import breaker as br
from . import saga as policy
from .connector import Enricher, Sink
from .errors import AuthError, PermanentError, RetryableError
from .events import Event
from .keypaths import format_errors
from .routes import FieldMapping, FieldSpecIn, FilterSettings, LoopGuardSettings, dig, envelope, load_mapping
from .types import RelPath, StrictModel
from .validate import RouteValidator, ValidateSettings, compile_validator

if TYPE_CHECKING:
    from .config import ConnectorSettings, Settings
    from .dispatcher import SinkRuntime
    from .metrics import Metrics

log = logging.getLogger("integrand.saga")

VIRTUAL = "~saga:"
SCOPE = "saga"  # the store's connector-state scope that holds every saga's record
# Per saga, per record: the fingerprint and result of each step the record's last finished saga wrote. A
# "loop-guard:" scope, so retention forgets entries not written for its window (store.retention).
GUARD_SCOPE = "loop-guard:~saga:"
HISTORY_KEPT = 200  # attempts kept in a saga's record (a step retried for days stays readable)
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_RUNS = itertools.count(1)  # delivery attempts of sagas in this process, for the history


# --- config ----------------------------------------------------------------------------------------


class _Mapped(StrictModel):
    """A field mapping given inline (``map``) or as a file (``mapping``), like a route's."""

    map: dict[str, FieldSpecIn] | None = None
    mapping: RelPath | None = None
    lookups: dict[str, dict[str, Any]] = {}

    @property
    def loop_guard(self) -> LoopGuardSettings | None:
        return None  # a step's writes are the saga's; the loop guard is a plain route's

    @model_validator(mode="after")
    def _one_mapping(self) -> _Mapped:
        if self.map is not None and self.mapping is not None:
            raise ValueError("give the mapping inline (map) or as a file (mapping), not both")
        return self


class CompensateSettings(_Mapped):
    """``compensate``: the sink action that undoes a step (idempotent, keyed ``…:STEP:undo``)."""

    sink: str
    type: str = "saga.compensate"  # the event type the sink receives (e.g. "contact.deleted" deletes)
    # A dotted path that must hold a true value for the undo to be sent, e.g. "step.created": a step that
    # updated an existing record is not deleted by the undo of a create. Unset: always undo.
    only_if: str | None = None

    @field_validator("only_if")
    @classmethod
    def _only_if(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[^.\s]+(\.[^.\s]+)*$", v):
            raise ValueError(f"{v!r} is not a dotted path such as 'step.created'")
        return v


class StepSettings(_Mapped):
    """One ``[[sagas.steps]]``: a sink, what it receives, and how the step is undone."""

    name: str
    sink: str
    type: str | None = None  # the event type the sink receives; default: the source event's
    validate_: ValidateSettings | None = Field(default=None, alias="validate")
    compensate: CompensateSettings | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("a step name is letters, digits, - and _ (later steps map from steps.NAME.field)")
        return v


class SagaSettings(StrictModel):
    """One ``[[sagas]]`` entry."""

    name: str
    from_: str = Field(alias="from")
    filter: FilterSettings = FilterSettings()
    enrich: bool = False
    steps: list[StepSettings] = Field(min_length=1)
    step_attempts: int = Field(default=10, ge=1)
    compensation_attempts: int = Field(default=10, ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("a saga name is letters, digits, - and _")
        return v

    @model_validator(mode="after")
    def _unique_steps(self) -> SagaSettings:
        names = [s.name for s in self.steps]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"step names must be unique within a saga: {', '.join(dup)}")
        return self

    @property
    def virtual_sink(self) -> str:
        return VIRTUAL + self.name

    def policy_steps(self) -> list[policy.Step]:
        return [policy.Step(s.name, s.sink, s.compensate.sink if s.compensate else None) for s in self.steps]


def parse_sagas(
    raw: Any,
    ctx: dict[str, Any],
    sources: Mapping[str, ConnectorSettings],
    source_names: set[str],
    sink_names: set[str],
    problems: list[str],
) -> tuple[SagaSettings, ...]:
    """The ``[[sagas]]`` entries, every problem appended as ``sagas[i].key: message``."""
    if not isinstance(raw, list):
        problems.append("sagas: expected [[sagas]] entries")
        return ()
    out: list[SagaSettings] = []
    seen: set[str] = set()
    for i, r in enumerate(raw):
        where = f"sagas[{i}]"
        try:
            sg = SagaSettings.model_validate(r, context=ctx)
        except ValidationError as e:
            problems.extend(format_errors(e, where, SagaSettings))
            continue
        if sg.name in seen:
            problems.append(f"{where}.name: another saga is named {sg.name!r}")
        seen.add(sg.name)
        if sg.from_ not in source_names:
            problems.append(f"{where}.from: no source named {sg.from_!r}")
        if sg.enrich and sg.from_ in sources and "fetch" not in sources[sg.from_].cls.capabilities():
            problems.append(f"{where}.enrich: source {sg.from_!r} cannot fetch records")
        for j, st in enumerate(sg.steps):
            w = f"{where}.steps[{j}]"
            if st.sink not in sink_names:
                problems.append(f"{w}.sink: no sink named {st.sink!r}")
            problems.extend(load_mapping(st, w)[1])  # type: ignore[arg-type]  # map / mapping / lookups alike
            problems.extend(compile_validator(st.validate_, w)[1])
            if st.compensate is not None:
                if st.compensate.sink not in sink_names:
                    problems.append(f"{w}.compensate.sink: no sink named {st.compensate.sink!r}")
                problems.extend(load_mapping(st.compensate, f"{w}.compensate")[1])  # type: ignore[arg-type]
        out.append(sg)
    return tuple(out)


# --- the runner ------------------------------------------------------------------------------------


class SagaCompensated(PermanentError):
    """A step failed for good and every completed step was undone: nothing of this change stays anywhere."""


class SagaNeedsIntervention(PermanentError):
    """A compensation kept failing: the systems disagree until a person fixes it (then replay the dead letter)."""


class SinkPaused(RetryableError):
    """A step's or undo's sink has its breaker open (it is down): not sent now, and no attempt is spent."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


def saga_id(name: str, event: Event) -> str:
    """``SOURCE:EVENT_ID~SAGA``: its steps' idempotency keys are this plus ``:STEP`` (``:STEP:undo``)."""
    return f"{event.key}~{name}"


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class _Compiled:
    settings: StepSettings
    mapping: FieldMapping | None
    validator: RouteValidator | None
    undo: FieldMapping | None


class StateAccess:
    """The two store calls a runner makes (``Store.state_get`` / ``state_set``)."""

    def __init__(self, store: Any):
        self.store = store

    async def get(self, key: str) -> Any:
        return await self.store.state_get(SCOPE, key)

    async def set(self, key: str, value: Any) -> None:
        await self.store.state_set(SCOPE, key, value)

    async def written(self, saga: str, entity: str) -> Any:
        """What the last saga of ``entity`` that finished ``done`` wrote, step by step (the loop guard)."""
        return await self.store.state_get(GUARD_SCOPE + saga, entity)

    async def remember(self, saga: str, entity: str, value: Any) -> None:
        await self.store.state_set(GUARD_SCOPE + saga, entity, value)


class _Writes:
    """One saga's state write in flight: started after an outcome, waited for before the next is written."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: asyncio.Future[None] | None = None

    def start(self, write: Coroutine[Any, Any, None]) -> None:
        self.pending = asyncio.ensure_future(write)

    async def landed(self, rec: dict[str, Any]) -> None:
        """Wait for the write started before (usually long done: it committed during the provider call);
        how long that wait was is told by the next history entry (``commit_ms``), so integrand's time
        between two steps splits into the commit it still waited for and the rest."""
        if (pending := self.pending) is None:
            return
        self.pending = None
        t0 = time.perf_counter()
        await pending
        rec["commit_s"] = time.perf_counter() - t0


def _snapshot(rec: dict[str, Any]) -> Any:
    """A copy of the record as it is now, for a write that lands while the saga goes on changing it."""
    return orjson.loads(orjson.dumps(rec))


class SagaRunner(Sink):
    """The virtual sink of one saga: runs each event's saga as far as it can go now."""

    batch_size = 32  # sagas of one lease run concurrently (different entities; one entity's are in order)
    # Each saga's delivery is recorded as soon as it ends (Dispatcher._deliver_each), not with its batch:
    # one saga waiting out a 429 or a slow provider must not hold the others' completion or their retries.
    completes_each = True

    def __init__(
        self,
        settings: SagaSettings,
        sinks: Callable[[str], Sink | None],
        sources: Mapping[str, object],
        state: StateAccess,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        runtimes: Callable[[str], SinkRuntime | None] | None = None,
    ):
        self.settings = settings
        self.name = settings.name
        self._sink = sinks
        # The dispatcher's runtime of a step's sink, for its breaker: steps and undos respect it and feed it.
        self._runtime = runtimes or (lambda name: None)
        self.sources = sources
        self.state = state
        self.metrics = metrics
        self.clock = clock
        self.steps = settings.policy_steps()
        self.compiled: list[_Compiled] = []
        for j, st in enumerate(settings.steps):
            where = f"sagas[{settings.name}].steps[{j}]"
            m, problems = load_mapping(st, where)  # type: ignore[arg-type]
            v, vproblems = compile_validator(st.validate_, where)
            u, uproblems = (
                load_mapping(st.compensate, f"{where}.compensate")  # type: ignore[arg-type]
                if st.compensate is not None
                else (None, [])
            )
            if problems or vproblems or uproblems:  # config validation reported these; a file changed since
                from .errors import ConfigError

                raise ConfigError(problems + vproblems + uproblems)
            self.compiled.append(_Compiled(st, m, v, u))

    async def deliver(self, event: Event) -> None:
        await self.run(event)

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        done = await asyncio.gather(*(self.run(e) for e in events), return_exceptions=True)
        return [d if isinstance(d, BaseException) else None for d in done]

    # --- one saga ----------------------------------------------------------------------------------

    async def run(self, event: Event) -> None:
        """Advance the saga of ``event``: return when it is done; raise to retry it or dead-letter it."""
        sid = saga_id(self.name, event)
        rec = await self.state.get(sid)
        writes = _Writes()  # this saga's (sagas of one batch run concurrently)
        if rec is None:
            rec = await self._begin(sid, event, writes)
        rec["run"] = next(_RUNS)  # this delivery attempt, named in the history entries it adds
        try:
            await self._advance(sid, rec, writes)
        finally:
            if (left := writes.pending) is not None:  # raised or cancelled meanwhile: let the write land quietly
                writes.pending = None
                await asyncio.wait({left})
                if not left.cancelled():
                    left.exception()

    async def _advance(self, sid: str, rec: dict[str, Any], writes: _Writes) -> None:
        st = _state(rec)
        if st.status == "manual":
            # A redelivery (a replay of its dead letter, or a crash before the dead letter was recorded):
            # try the compensation again from where it stopped.
            st = replace(st, status="compensating", compensation_attempts=0)
            rec["finished"] = None
            self._note(rec, None, "resume", "ok", "compensation resumed")
        source_event = Event(**rec["input"])
        while True:
            action = policy.next_action(st, self.steps)
            if isinstance(action, policy.Finished):
                await writes.landed(rec)
                return await self._finish(sid, rec, st)
            if isinstance(action, policy.Run):
                st, stop = await self._run_step(rec, st, action, source_event)
            else:
                st, stop = await self._undo_step(rec, st, action, source_event)
            _store_state(rec, st)
            await writes.landed(rec)  # outcomes are written in order: the previous one first
            if st.status in ("done", "compensated", "manual"):
                self._announce(rec, st)  # in the same write as the last outcome
                await self._save_finished(sid, rec, st)
            elif stop is not None:
                await self._save(sid, rec)  # the delivery ends here: its outcome is stored before it is retried
            else:
                # Not waited for: the next step's call starts while this commit is fsynced. Steps are keyed,
                # so a crash before it lands sends this step (and the next) again, absorbed by the sink.
                writes.start(self._save(sid, _snapshot(rec)))
            if stop is not None:
                raise stop

    async def _begin(self, sid: str, event: Event, writes: _Writes) -> dict[str, Any]:
        """A new saga's record: the source event as every step will see it (enriched once, kept)."""
        if self.settings.enrich:
            src = self.sources.get(event.source)
            if isinstance(src, Enricher):
                try:
                    event = await src.fetch(event)
                except AuthError as e:  # the source's credentials, not the saga's sinks
                    raise RetryableError(f"enrichment by source {event.source!r} failed: {e}") from None
        now = self.clock()
        rec: dict[str, Any] = {
            "id": sid,
            "saga": self.name,
            "source": event.source,
            "event_id": event.id,
            "type": event.type,
            "entity": event.entity,
            "entity_id": event.entity_id,
            "started_at": _now_iso(now),
            "updated_at": _now_iso(now),
            "steps": [s.name for s in self.steps],
            "attempts": {},
            "history": [],
            "input": event.to_dict(),
        }
        guard = _guard_key(event)
        if guard is not None:
            rec["guard"] = guard
            rec["last_written"] = await self.state.written(self.name, guard)
        _store_state(rec, policy.SagaState(sid))
        # Committed while the first step's call runs (a crash before it lands starts the saga afresh).
        writes.start(self._save(sid, _snapshot(rec)))
        log.info("saga %s: started for %s (%s)", self.name, event.key, event.type)
        return rec

    def _root(self, source_event: Event, st: policy.SagaState, step: str) -> dict[str, Any]:
        root = envelope(source_event)
        root["steps"] = dict(st.results)
        root["step"] = st.results.get(step)  # a compensation's own step result
        root["saga"] = {"id": st.saga_id, "name": self.name}
        return root

    def _step_event(
        self, source_event: Event, st: policy.SagaState, key: str, type_: str, data: Any, step: str, undo: bool
    ) -> Event:
        suffix = key[len(source_event.key) :]  # "~SAGA:STEP" (":undo"): the step event's key is the saga key
        meta = {**source_event.meta, "saga": {"id": st.saga_id, "name": self.name, "step": step, "undo": undo}}
        return replace(source_event, id=source_event.id + suffix, type=type_, data=data, meta=meta)

    async def _call(self, rec: dict[str, Any], sink_name: str, event: Event) -> tuple[Any, BaseException | None, float]:
        """Deliver a step's event: (result, error, seconds spent in the sink); notes when the call started."""
        sink = self._sink(sink_name)
        if sink is None:
            return None, RetryableError(f"sink {sink_name!r} is not configured now (removed by a reload?)"), 0.0
        rt = self._runtime(sink_name)
        probing = False
        if rt is not None:
            permit, new = br.permit(rt.breaker, self.clock())
            if permit == "no":
                return None, self._paused(rt, "is down (circuit open): not sent"), 0.0
            probing = permit == "probe"
            rt.breaker = new
        rec["call_started"] = time.time()
        t0 = time.perf_counter()
        try:
            result = await sink.deliver_result(event)
        except Exception as e:
            took = time.perf_counter() - t0
            if rt is not None and _is_outage(e):
                self._failed(rt)
                if probing or rt.breaker.status != "closed":  # the sink is down, not this step: no attempt spent
                    return None, self._paused(rt, f"is down (circuit open): {_describe(e)}"), took
            elif rt is not None and isinstance(e, PermanentError):
                self._answered(rt)  # it answered, so it is up (the data is wrong)
            elif rt is not None and rt.breaker.status == "half_open":
                rt.breaker = replace(rt.breaker, status="open")  # an inconclusive probe: probe again later
            return None, e, took
        took = time.perf_counter() - t0
        if rt is not None:
            self._answered(rt)
        return (dict(result) if isinstance(result, Mapping) else None), None, took

    def _paused(self, rt: SinkRuntime, why: str) -> SinkPaused:
        wait = max(0.0, rt.breaker.reopens_at - self.clock())
        return SinkPaused(f"sink {rt.name} {why}; the saga waits {wait:.1f} s", retry_after=wait)

    def _failed(self, rt: SinkRuntime) -> None:
        """An outage of a step's sink counts on its breaker, as the dispatcher's own deliveries do."""
        before = rt.breaker.status
        rt.breaker = br.on_failure(rt.breaker, self.clock())
        if rt.breaker.status == "open" and before != "open":
            log.warning(
                "sink %s: circuit open after %d failures (saga %s); its steps and undos wait %g s without spending attempts",
                rt.name,
                rt.breaker.failures,
                self.name,
                rt.breaker.current_open_for,
            )
            if self.metrics is not None:
                self.metrics.breaker_open.labels(rt.name).set(1)

    def _answered(self, rt: SinkRuntime) -> None:
        if rt.breaker.status != "closed":
            log.warning("sink %s: circuit closed, the sink is back (saga %s)", rt.name, self.name)
            if self.metrics is not None:
                self.metrics.breaker_open.labels(rt.name).set(0)
        rt.breaker = br.on_success(rt.breaker)

    async def _run_step(
        self, rec: dict[str, Any], st: policy.SagaState, action: policy.Run, source_event: Event
    ) -> tuple[policy.SagaState, BaseException | None]:
        c = self.compiled[st.next_step]
        name = action.step.name
        attempt = rec["attempts"].get(name, 0) + 1
        try:
            root = self._root(source_event, st, name)
            data = c.mapping.apply_root(root, source_event.id) if c.mapping is not None else source_event.data
            ev = self._step_event(source_event, st, action.key, c.settings.type or source_event.type, data, name, False)
            if c.validator is not None:
                c.validator.check(ev)
        except PermanentError as e:  # the mapping or the schema: this step can never be sent
            result, err, took = None, e, 0.0  # type: tuple[Any, BaseException | None, float]
        else:
            fp = _step_fingerprint(ev)
            last = (rec.get("last_written") or {}).get(name)
            if isinstance(last, dict) and last.get("fp") == fp:
                # The record's last saga wrote exactly this: integrand's own write-back seen again (polling and
                # reconciliation have no changeOrigin), or a change to fields this step does not map.
                rec.setdefault("written", {})[name] = last
                rec["unchanged"] = [*rec.get("unchanged", []), name]
                self._note(rec, name, "run", "unchanged", "the record's last saga wrote the same: not sent")
                return policy.on_outcome(st, self.steps, "ok", result=last.get("result")), None
            result, err, took = await self._call(rec, action.step.sink, ev)
            if err is None:
                rec.setdefault("written", {})[name] = {"fp": fp, "result": result}
        if err is None:
            rec["attempts"][name] = attempt
            self._note(rec, name, "run", "ok", _brief(result), attempt, took)
            return policy.on_outcome(st, self.steps, "ok", result=result), None
        if isinstance(err, AuthError):  # the sink is paused by the dispatcher; no attempt is spent
            self._note(rec, name, "run", "auth", str(err), attempt, took)
            return st, err
        if isinstance(err, SinkPaused):  # the step's sink is down (its breaker): no attempt is spent
            self._note(rec, name, "run", "paused", str(err), attempt, took)
            return st, err
        permanent = isinstance(err, PermanentError)
        rec["attempts"][name] = attempt
        if not permanent and attempt < self.settings.step_attempts:
            self._note(rec, name, "run", "retry", _describe(err), attempt, took)
            return st, err
        why = _describe(err) if permanent else f"gave up after {attempt} attempts: {_describe(err)}"
        self._note(rec, name, "run", "failed", why, attempt, took)
        log.warning("saga %s %s: step %s failed for good, compensating: %s", self.name, st.saga_id, name, why)
        nxt = policy.on_outcome(st, self.steps, "permanent", error=f"step {name}: {why}")
        return nxt, None

    async def _undo_step(
        self, rec: dict[str, Any], st: policy.SagaState, action: policy.Undo, source_event: Event
    ) -> tuple[policy.SagaState, BaseException | None]:
        i = next(k for k, s in enumerate(self.steps) if s.name == action.step.name)
        c = self.compiled[i]
        comp = c.settings.compensate
        assert comp is not None
        name = action.step.name
        attempt = st.compensation_attempts + 1
        root = self._root(source_event, st, name)
        if name in rec.get("unchanged", ()):
            self._note(
                rec, name, "undo", "skipped", "this saga wrote nothing there (unchanged): nothing to undo", attempt
            )
            return policy.on_outcome(st, self.steps, "ok"), None
        if comp.only_if is not None and not dig(root, comp.only_if):
            self._note(rec, name, "undo", "skipped", f"{comp.only_if} is not set: nothing to undo", attempt)
            return policy.on_outcome(st, self.steps, "ok"), None
        try:
            data = c.undo.apply_root(root, source_event.id) if c.undo is not None else source_event.data
            ev = self._step_event(source_event, st, action.key, comp.type, data, name, True)
        except PermanentError as e:
            result, err, took = None, e, 0.0  # type: tuple[Any, BaseException | None, float]
        else:
            result, err, took = await self._call(rec, comp.sink, ev)
        if err is None:
            self._note(rec, name, "undo", "ok", _brief(result), attempt, took)
            return policy.on_outcome(st, self.steps, "ok", result=result), None
        if isinstance(err, AuthError):
            self._note(rec, name, "undo", "auth", str(err), attempt, took)
            return st, err
        if isinstance(err, SinkPaused):  # the undo's sink is down (its breaker): no compensation attempt is spent
            self._note(rec, name, "undo", "paused", str(err), attempt, took)
            return st, err
        outcome: policy.Outcome = "permanent" if isinstance(err, PermanentError) else "retry"
        nxt = policy.on_outcome(
            st,
            self.steps,
            outcome,
            error=f"compensation of step {name}: {_describe(err)}",
            max_compensation_attempts=self.settings.compensation_attempts,
        )
        self._note(rec, name, "undo", "failed" if nxt.status == "manual" else "retry", _describe(err), attempt, took)
        return nxt, (None if nxt.status == "manual" else err)

    async def _finish(self, sid: str, rec: dict[str, Any], st: policy.SagaState) -> None:
        if rec.get("finished") != st.status:  # finished by a step outcome recorded before a crash
            self._announce(rec, st)
            await self._save_finished(sid, rec, st)
        if st.status == "done":
            return None
        undone = ", ".join(st.undone) or "nothing to undo"
        if st.status == "compensated":
            raise SagaCompensated(f"saga {sid} compensated ({undone}): {st.failure}")
        raise SagaNeedsIntervention(
            f"MANUAL INTERVENTION: saga {sid}: {st.failure} (undone so far: {undone}); see `integrand saga show {sid}`"
        )

    def _announce(self, rec: dict[str, Any], st: policy.SagaState) -> None:
        """The saga has just finished: its log line (an ALERT for ``manual``) and its counter, once."""
        rec["finished"] = st.status
        if self.metrics is not None:
            self.metrics.sagas.inc(self.name, st.status)
        sid = st.saga_id
        if st.status == "done":
            log.info("saga %s %s: all %d steps done", self.name, sid, len(self.steps))
        elif st.status == "compensated":
            log.warning(
                "saga %s %s: compensated (undone: %s): %s",
                self.name,
                sid,
                ", ".join(st.undone) or "nothing",
                st.failure,
            )
        else:
            log.critical(
                "ALERT saga %s %s: MANUAL INTERVENTION NEEDED: %s; the systems may disagree until a person fixes it "
                "(integrand saga show %s; then replay its dead letter)",
                self.name,
                sid,
                st.failure,
                sid,
            )

    def _note(
        self,
        rec: dict[str, Any],
        step: str | None,
        action: str,
        outcome: str,
        detail: str,
        attempt: int = 0,
        took: float = 0.0,
    ) -> None:
        now = self.clock()
        entry: dict[str, Any] = {"at": _now_iso(now), "step": step, "action": action, "outcome": outcome}
        entry["attempt"] = attempt
        # When the call started and returned (µs) and which delivery attempt ran it: integrand's own time
        # between steps is a step's start minus the previous step's return, within one attempt.
        entry["t"] = round(time.time(), 6)
        entry["t0"] = round(rec.pop("call_started", entry["t"]), 6)
        entry["run"] = rec.get("run")
        entry["sink_ms"] = round(took * 1000, 3)
        commit = rec.pop("commit_s", None)
        if commit is not None:
            entry["commit_ms"] = round(commit * 1000, 3)  # the previous outcome's commit, waited for before this
        if detail:
            entry["detail"] = detail[:2000]
        rec["history"] = [*rec["history"], entry][-HISTORY_KEPT:]
        rec["updated_at"] = _now_iso(now)

    async def _save(self, sid: str, rec: dict[str, Any]) -> None:
        await self.state.set(sid, rec)

    async def _save_finished(self, sid: str, rec: dict[str, Any], st: policy.SagaState) -> None:
        """The last write of a saga, and beside it (same group commit) what it leaves written for its record's
        loop guard: every step's payload if done; nothing if it was undone (the systems changed under it)."""
        guard = rec.get("guard")
        if guard is None:
            return await self._save(sid, rec)
        written = rec.get("written") if st.status == "done" else None
        await asyncio.gather(self._save(sid, rec), self.state.remember(self.name, guard, written))
        return None


def _state(rec: Mapping[str, Any]) -> policy.SagaState:
    s = rec["state"]
    return policy.SagaState(
        saga_id=s["saga_id"],
        status=s["status"],
        next_step=s["next_step"],
        results=s["results"],
        failure=s["failure"],
        compensation_attempts=s["compensation_attempts"],
        undone=tuple(s["undone"]),
    )


def _store_state(rec: dict[str, Any], st: policy.SagaState) -> None:
    rec["state"] = {**asdict(st), "results": dict(st.results), "undone": list(st.undone)}
    rec["status"] = st.status


def _guard_key(event: Event) -> str | None:
    """The record a saga's loop guard is kept for: ``SOURCE:ENTITY:ID`` (none for an event without an entity id)."""
    if not event.entity_id:
        return None
    return f"{event.source}:{event.entity or ''}:{event.entity_id}"


def _step_fingerprint(ev: Event) -> str:
    """What a step sends that decides what it writes: the mapped data, and whether it is a delete."""
    deleted = bool(ev.meta.get("deleted")) or ev.type.endswith(".deleted")
    blob = orjson.dumps([deleted, ev.data], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()[:32]


def _is_outage(e: BaseException) -> bool:
    """As the dispatcher judges it: the other side is unavailable (not that this step's data is wrong)."""
    return isinstance(e, RetryableError | TimeoutError | ConnectionError)


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    rid = getattr(e, "request_id", None)
    return f"{text} (request id {rid})" if rid else text


def _brief(result: Any) -> str:
    if not result:
        return ""
    return orjson.dumps(result).decode()[:500]


# --- wiring ----------------------------------------------------------------------------------------


def saga_runtimes(
    settings: Settings,
    store: Any,
    sinks: Callable[[str], Sink | None],
    sources: Mapping[str, object],
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    runtimes: Callable[[str], SinkRuntime | None] | None = None,
) -> dict[str, SinkRuntime]:
    """The virtual sink of every saga, ready for the dispatcher; ``sinks`` finds a step's sink at call time,
    ``runtimes`` its dispatcher runtime (whose breaker the saga's calls respect and update)."""
    from .breaker import Breaker
    from .dispatcher import SinkRuntime

    out: dict[str, SinkRuntime] = {}
    for sg in settings.sagas:
        runner = SagaRunner(sg, sinks, sources, StateAccess(store), metrics=metrics, clock=clock, runtimes=runtimes)
        b = settings.dispatcher.breaker
        out[sg.virtual_sink] = SinkRuntime(
            name=sg.virtual_sink,
            connector=runner,
            batch_size=min(SagaRunner.batch_size, settings.dispatcher.batch_size),
            # The runner counts its own attempts (step_attempts, compensation_attempts) and compensates when
            # they run out; the dispatcher's attempt budget must not dead-letter a saga half-way before that.
            retry=settings.dispatcher.retry.model_copy(update={"max_attempts": 1_000_000}),
            breaker=Breaker(b.failure_threshold, b.open_for, b.max_open_for),
        )
    return out


async def find_sagas(
    state_get: Callable[[str, str], Awaitable[Any]], ident: str, names: Sequence[str]
) -> list[dict[str, Any]]:
    """The records for ``ident``: a saga id (``…~NAME``), or an event's ``SOURCE:EVENT_ID`` (each saga in ``names``)."""
    keys = [ident] if "~" in ident else [f"{ident}~{n}" for n in names] or [ident]
    found = [await state_get(SCOPE, k) for k in keys]
    return [rec for rec in found if isinstance(rec, dict)]


def describe(rec: Mapping[str, Any]) -> list[str]:
    """A saga's record as lines for ``integrand saga show``."""
    st = rec["state"]
    lines = [
        f"saga {rec['id']}",
        f"  {rec['saga']}: {rec['source']} event {rec['event_id']} ({rec['type']})"
        + (f", entity {rec['entity']}:{rec['entity_id']}" if rec.get("entity_id") else ""),
        f"  status {st['status']}" + (f": {st['failure']}" if st.get("failure") else ""),
        f"  started {rec['started_at']}, updated {rec['updated_at']}",
        "  steps:",
    ]
    for i, name in enumerate(rec["steps"]):
        if name in st["undone"]:
            mark = "done, then undone"
        elif name in rec.get("unchanged", ()):
            mark = "unchanged, not sent"
        elif name in st["results"]:
            mark = "done"
        elif i == st["next_step"] and st["status"] in ("running",):
            mark = "next"
        elif i == st["next_step"] and st["status"] != "done":
            mark = "failed"
        else:
            mark = "not run"
        result = st["results"].get(name)
        lines.append(f"    {i + 1}. {name:<16} {mark}" + (f"  result {_brief(result)}" if result else ""))
    lines.append("  history:")
    for h in rec["history"]:
        what = f"{h['action']} {h['step']}" if h.get("step") else h["action"]
        extra = f" (attempt {h['attempt']}, sink {h['sink_ms']:.1f} ms)" if h.get("attempt") else ""
        detail = f"  {h['detail'].splitlines()[0]}" if h.get("detail") else ""
        lines.append(f"    {h['at']}  {what:<24} {h['outcome']:<8}{extra}{detail}")
    return lines
