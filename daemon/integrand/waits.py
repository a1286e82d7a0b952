"""Waiting for an ``asyncio.Event`` with a timeout without losing a cancel.

``asyncio.wait_for(event.wait(), timeout)`` on Python 3.11 (what integrand runs on) returns normally when a
cancel arrives in the same loop turn as the event is set: it sees the inner wait done and hands back its
result, and the cancel is gone (python/cpython#86296, fixed in 3.12 by rewriting ``wait_for`` on
``asyncio.timeout``). For a loop that waits on an event set at every message or commit, that is not rare:
a reload's cancel of a stream task was lost that way and the old AMQP consumer went on beside its
replacement, each taking every other message, so the store's stale-version guard dropped the older of each
entity's versions (found by ``plugins/amqp/tests/test_amqp_reload.py``: 274 of 12,000 confirmed messages).
``asyncio.timeout`` counts cancels (``Task.uncancel``) and lets an outside one through."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:  # noqa: ASYNC109 - the point of it
    """Wait until ``event`` is set or ``timeout`` seconds pass; whether it was set. A cancel is never lost."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
