"""Multi-step routes with confirmation and compensation (the saga pattern): the pure policy.

A saga route is a sequence of steps across sinks, e.g. upsert the HubSpot contact → upsert the CRM
customer with the HubSpot id → write both ids back to Salesforce (the confirmation). Each step's
result (the ids a sink returned) is kept and visible to later steps' mappings as
``steps.<name>.<field>``. A step may declare a compensation (a sink action such as a delete or a
revert, idempotent, keyed by the saga and step). If a step fails *permanently*, the completed
steps are compensated in reverse order, each with retries; a compensation that still fails after
``max_compensation_attempts`` leaves the saga in ``manual`` (dead-lettered, flagged for a person,
an ALERT line and a metric). A retryable failure never compensates: the step is retried on the
delivery's own backoff, like any delivery.

This module is the state machine only, pure and property-tested (``tests/test_saga.py``): given a
saga's state and the outcome of what was last attempted, what happens next. It is run by
:mod:`integrand.sagarunner`: a saga's events go to a virtual sink ``~saga:NAME``, one delivery per
saga, and the runner commits this state to the store (connector state, scope ``saga``) after every
outcome, so a crash at any point resumes where the saga was; the step in flight is sent again with
its key (``saga_id:step``), which an idempotent sink absorbs. See docs/sagas.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Status = Literal["running", "compensating", "done", "compensated", "manual"]


@dataclass(frozen=True)
class Step:
    """One step of a saga route: a sink to write, and optionally the sink action that undoes it."""

    name: str
    sink: str
    compensate: str | None = None  # the sink (action) that undoes this step; None = nothing to undo


@dataclass(frozen=True)
class SagaState:
    """Everything that must survive a crash, as the store would keep it (JSON-able)."""

    saga_id: str
    status: Status = "running"
    next_step: int = 0  # while running: the step to run; while compensating: the step being undone
    results: Mapping[str, Any] = field(default_factory=dict)  # step name → what its sink returned
    failure: str | None = None  # the permanent error that started compensation
    compensation_attempts: int = 0
    undone: tuple[str, ...] = ()  # steps compensated so far, in the order they were undone


@dataclass(frozen=True)
class Run:
    step: Step
    key: str  # the idempotency key for the sink: saga id + step


@dataclass(frozen=True)
class Undo:
    step: Step
    key: str


@dataclass(frozen=True)
class Finished:
    status: Status


Action = Run | Undo | Finished

Outcome = Literal["ok", "retry", "permanent"]


def next_action(state: SagaState, steps: Sequence[Step]) -> Action:
    """What to do now for ``state``: run a step, undo one, or nothing (finished)."""
    if state.status == "running":
        if state.next_step >= len(steps):
            return Finished("done")
        s = steps[state.next_step]
        return Run(s, f"{state.saga_id}:{s.name}")
    if state.status == "compensating":
        i = _next_to_undo(state, steps)
        if i is None:
            return Finished("compensated")
        s = steps[i]
        return Undo(s, f"{state.saga_id}:{s.name}:undo")
    return Finished(state.status)


def _next_to_undo(state: SagaState, steps: Sequence[Step]) -> int | None:
    """The latest completed step that has a compensation and is not undone yet (reverse order)."""
    for i in range(min(state.next_step, len(steps)) - 1, -1, -1):
        s = steps[i]
        if s.name in state.results and s.compensate is not None and s.name not in state.undone:
            return i
    return None


def on_outcome(
    state: SagaState,
    steps: Sequence[Step],
    outcome: Outcome,
    *,
    result: Any = None,
    error: str | None = None,
    max_compensation_attempts: int = 10,
) -> SagaState:
    """The state after what ``next_action`` asked for came back with ``outcome``."""
    action = next_action(state, steps)
    if isinstance(action, Finished):
        return state
    if isinstance(action, Run):
        if outcome == "ok":
            nxt = state.next_step + 1
            status: Status = "done" if nxt >= len(steps) else "running"
            return replace(state, status=status, next_step=nxt, results={**state.results, action.step.name: result})
        if outcome == "retry":
            return state  # the delivery's own backoff retries the same step; nothing is undone
        started = replace(state, status="compensating", failure=error or f"step {action.step.name} failed")
        return _settle(started, steps)
    # Undo
    if outcome == "ok":
        return _settle(replace(state, undone=(*state.undone, action.step.name), compensation_attempts=0), steps)
    attempts = state.compensation_attempts + 1
    if outcome == "permanent" or attempts >= max_compensation_attempts:
        return replace(state, status="manual", compensation_attempts=attempts, failure=error or state.failure)
    return replace(state, compensation_attempts=attempts)


def _settle(state: SagaState, steps: Sequence[Step]) -> SagaState:
    """A compensating saga with nothing left to undo is compensated."""
    if state.status == "compensating" and _next_to_undo(state, steps) is None:
        return replace(state, status="compensated")
    return state
