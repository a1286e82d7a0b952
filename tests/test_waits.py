"""A cancel that arrives in the same loop turn as the awaited event is not lost (Python 3.11's wait_for loses it)."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from integrand.waits import wait_event


async def _cancel_as_the_event_fires(waiter: object) -> bool:
    """Start ``waiter(event)``, then set the event and cancel the task in one loop turn; whether the cancel held."""
    ev = asyncio.Event()
    task = asyncio.create_task(waiter(ev))  # type: ignore[operator]
    await asyncio.sleep(0)  # it is waiting now
    ev.set()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return True
    return False


async def test_wait_event_keeps_a_cancel_that_comes_with_the_event() -> None:
    assert await _cancel_as_the_event_fires(lambda ev: wait_event(ev, 10))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12 rebuilt wait_for on asyncio.timeout")
async def test_asyncio_wait_for_loses_that_cancel_on_this_python() -> None:
    """Why wait_event exists: the pattern it replaces, on 3.11, returns normally instead of being cancelled."""
    assert not await _cancel_as_the_event_fires(lambda ev: asyncio.wait_for(ev.wait(), 10))


async def test_wait_event_times_out_and_sees_a_set_event() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    ev.set()
    assert await wait_event(ev, 0.01) is True


async def test_stop_tasks_ends_a_task_that_swallowed_its_first_cancel() -> None:
    """What a library's lost cancel looks like from outside: the task catches one cancel and goes on."""
    from integrand.waits import stop_tasks

    async def deaf() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # lost, as inside nats-py's next_msg on 3.11
            await asyncio.sleep(30)
        await asyncio.sleep(30)

    once = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    once.cancel()
    done, _ = await asyncio.wait({once}, timeout=1.0)
    assert not done, "a single cancel does not end it"
    assert await stop_tasks([once], timeout=5) == set()
    assert once.cancelled()


async def test_stop_tasks_gives_up_at_the_timeout_and_says_which() -> None:
    from integrand.waits import stop_tasks

    deaf = True

    async def stubborn() -> None:
        while deaf:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)

    t = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    try:
        assert await stop_tasks([t], timeout=0.3) == {t}
    finally:
        deaf = False
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
