"""The saga policy: a permanent failure at any step undoes exactly the completed steps, in reverse."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from integrand.saga import Finished, Run, SagaState, Step, Undo, next_action, on_outcome

STEPS = [
    Step("hubspot", "hubspot_contacts", compensate="hubspot_delete"),
    Step("crm", "crm_customers", compensate="crm_delete"),
    Step("confirm", "sf_confirm"),  # the confirmation write-back has nothing to undo
]


def drive(
    fail_at: int | None, retries: int = 0, undo_fails: int = 0, max_attempts: int = 10
) -> tuple[SagaState, list[str]]:
    """Run the saga to its end; the step at ``fail_at`` fails permanently after ``retries`` retryable failures."""
    state, tried, undo_tried = SagaState("sf:evt-1"), 0, 0
    log: list[str] = []
    for _ in range(100):
        action = next_action(state, STEPS)
        if isinstance(action, Finished):
            return state, log
        if isinstance(action, Run):
            i = STEPS.index(action.step)
            if i == fail_at and tried < retries:
                tried += 1
                log.append(f"retry {action.step.name}")
                state = on_outcome(state, STEPS, "retry")
            elif i == fail_at:
                log.append(f"fail {action.step.name}")
                state = on_outcome(state, STEPS, "permanent", error="422 from the sink")
            else:
                log.append(f"run {action.step.name}")
                state = on_outcome(state, STEPS, "ok", result={"id": f"{action.step.name}-1"})
        else:
            assert isinstance(action, Undo)
            if undo_tried < undo_fails:
                undo_tried += 1
                log.append(f"undo-retry {action.step.name}")
                state = on_outcome(state, STEPS, "retry", max_compensation_attempts=max_attempts)
            else:
                log.append(f"undo {action.step.name}")
                state = on_outcome(state, STEPS, "ok")
    raise AssertionError("the saga did not finish")


def test_all_steps_succeed_and_results_are_kept_for_later_steps() -> None:
    state, log = drive(None)
    assert state.status == "done" and log == ["run hubspot", "run crm", "run confirm"]
    assert state.results["hubspot"] == {"id": "hubspot-1"}


@given(st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=5))
def test_a_permanent_failure_undoes_exactly_the_completed_steps_in_reverse(fail_at: int, retries: int) -> None:
    state, log = drive(fail_at, retries)
    completed = [s.name for s in STEPS[:fail_at]]
    undoable = [n for n in completed if next(s for s in STEPS if s.name == n).compensate]
    assert [x.split()[1] for x in log if x.startswith("undo ")] == list(reversed(undoable))
    assert state.undone == tuple(reversed(undoable))
    assert state.status == "compensated" and state.failure == "422 from the sink"
    assert log.count(f"retry {STEPS[fail_at].name}") == retries, "retryable failures retry, they never compensate"


def test_a_compensation_that_keeps_failing_lands_in_manual() -> None:
    state, log = drive(2, undo_fails=10, max_attempts=3)
    assert state.status == "manual"
    assert log[-3:] == ["undo-retry crm", "undo-retry crm", "undo-retry crm"]
    assert "crm" not in state.undone


def test_keys_are_stable_per_saga_and_step() -> None:
    a = next_action(SagaState("sf:evt-1"), STEPS)
    assert isinstance(a, Run) and a.key == "sf:evt-1:hubspot"
    undoing = SagaState("sf:evt-1", status="compensating", next_step=1, results={"hubspot": {}})
    u = next_action(undoing, STEPS)
    assert isinstance(u, Undo) and u.key == "sf:evt-1:hubspot:undo"
