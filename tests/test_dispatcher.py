"""The dispatcher with a scripted in-process sink: order, retries, breaker, dead letters."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from importlib.metadata import EntryPoint
from pathlib import Path

import aiohttp

from integrand.app import Daemon
from integrand.config import Settings, load_config
from integrand.errors import AuthError, PermanentError, RetryableError
from integrand.events import Event
from integrand.plugins import GROUP, Registry

from .helpers import DEMO_SECRET, hook_url, post_signed, running, wait_for, write_config
from .scripted_sink import ScriptedSink

REGISTRY = Registry(
    [
        EntryPoint("webhook", "integrand.builtin.webhook:WebhookConnector", GROUP),
        EntryPoint("scripted", "tests.scripted_sink:ScriptedSink", GROUP),
    ]
)

CONFIG = f"""
[dispatcher]
workers = 4
[dispatcher.retry]
base = "10ms"
cap = "50ms"
max_attempts = 4
[dispatcher.breaker]
failure_threshold = 3
open_for = "100ms"
max_open_for = "200ms"

[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_field = "entity"
entity_id_field = "id"
version_field = "v"

[sinks.s]
connector = "scripted"

[[routes]]
from = "demo"
to = ["s"]
"""


def settings(tmp_path: Path, extra: str = "") -> Settings:
    return load_config(write_config(tmp_path, CONFIG + extra), registry=REGISTRY)


def sink(d: Daemon) -> ScriptedSink:
    s = d.connectors["sink:s"]
    assert isinstance(s, ScriptedSink)
    return s


async def send(d: Daemon, s: aiohttp.ClientSession, n: int, entities: int) -> None:
    for i in range(n):
        payload = {"entity": "Customer", "id": f"c{i % entities}", "v": i // entities}
        status, _ = await post_signed(s, hook_url(d), payload, f"m{i}")
        assert status == 200


async def test_per_entity_order_survives_random_failures(tmp_path: Path) -> None:
    rng = random.Random(7)
    failures: dict[str, int] = {}

    def flaky(e: Event) -> BaseException | None:
        # 30% of attempts fail, but never more than twice per event (max_attempts is 4).
        if failures.get(e.id, 0) < 2 and rng.random() < 0.3:
            failures[e.id] = failures.get(e.id, 0) + 1
            return RetryableError("flaky")
        return None

    async with running(settings(tmp_path)) as d, aiohttp.ClientSession() as s:
        sk = sink(d)
        sk.fail = flaky
        await send(d, s, 60, entities=4)
        await wait_for(lambda: len({e.id for e in sk.received}) == 60, timeout=20)
    per_entity: dict[str, list[int]] = {}
    for e in sk.received:
        per_entity.setdefault(e.entity_id or "", []).append(int(e.version or 0))
    assert sorted(per_entity) == ["c0", "c1", "c2", "c3"]
    for versions in per_entity.values():
        assert versions == sorted(versions)  # an older version never follows a newer one
    assert len(sk.received) == 60  # each delivered once: a failed attempt delivered nothing
    assert sum(failures.values()) > 5  # the failures really happened


async def test_breaker_defers_without_spending_attempts(tmp_path: Path) -> None:
    async with running(settings(tmp_path)) as d, aiohttp.ClientSession() as s:
        sk = sink(d)
        down = True
        sk.fail = lambda e: RetryableError("sink down") if down else None
        await send(d, s, 5, entities=5)
        await wait_for(lambda: d.dispatcher.sinks["s"].breaker.status != "closed")
        calls_when_open = sk.calls
        # Keep it down through several probe cycles (max_open_for 200 ms): more than
        # max_attempts (4) tries in total, yet nothing may be dead-lettered.
        await wait_for(lambda: sk.calls >= calls_when_open + 6, timeout=10)
        assert await d.store.dead_letters() == []
        down = False
        await wait_for(lambda: len(sk.received) == 5, timeout=10)
        assert d.dispatcher.sinks["s"].breaker.status == "closed"

        async def all_acked() -> bool:  # the sink has it before the ack commits
            return await d.store.counts() == {("s", "done"): 5}

        await wait_for(all_acked)


async def test_permanent_error_dead_letters_at_once_and_replay_delivers(tmp_path: Path) -> None:
    async with running(settings(tmp_path)) as d, aiohttp.ClientSession() as s:
        sk = sink(d)
        sk.fail = lambda e: PermanentError("HTTP 400: bad field") if e.id == "m1" else None
        await send(d, s, 3, entities=3)

        async def one_dead() -> bool:
            return len(await d.store.dead_letters()) == 1

        await wait_for(one_dead)
        [dead] = await d.store.dead_letters()
        assert (dead.event_id, dead.attempts, dead.last_error) == ("m1", 1, "PermanentError: HTTP 400: bad field")
        await wait_for(lambda: len(sk.received) == 2)
        sk.fail = lambda e: None
        assert (await d.store.replay([dead.id])).replayed == 1
        await wait_for(lambda: len(sk.received) == 3)


async def test_unexpected_exception_retries_then_dead_letters_with_traceback(tmp_path: Path) -> None:
    async with running(settings(tmp_path)) as d, aiohttp.ClientSession() as s:
        sk = sink(d)
        sk.fail = lambda e: KeyError("oops")
        await send(d, s, 1, entities=1)

        async def dead() -> bool:
            return len(await d.store.dead_letters()) == 1

        await wait_for(dead, timeout=10)
        [entry] = await d.store.dead_letters()
        assert entry.attempts == 4  # max_attempts
        assert entry.last_error.startswith("KeyError: 'oops'")
        assert "Traceback" in entry.last_error
        detail = await d.store.delivery(entry.id)
        assert detail is not None
        assert [a.action for a in detail.audit] == ["retry", "retry", "retry", "dead"]


async def test_auth_error_pauses_the_sink(tmp_path: Path) -> None:
    async with running(settings(tmp_path)) as d, aiohttp.ClientSession() as s:
        sk = sink(d)
        sk.fail = lambda e: AuthError("token revoked")
        await send(d, s, 1, entities=1)
        await wait_for(lambda: d.dispatcher.sinks["s"].breaker.status == "open")
        [leased_or_ready] = [
            n for (k, state), n in (await d.store.counts()).items() if k == "s" and state in ("ready", "leased")
        ]
        assert leased_or_ready == 1
        sk.fail = lambda e: None
        await wait_for(lambda: len(sk.received) == 1, timeout=10)
        assert await d.store.dead_letters() == []


async def test_batch_with_wrong_result_count_is_retried_not_lost(tmp_path: Path) -> None:
    async with running(settings(tmp_path)) as d, aiohttp.ClientSession() as s:
        sk = sink(d)
        broken = True

        def batch(events: Sequence[Event]) -> list[BaseException | None]:
            if broken:
                return []
            sk.received.extend(events)
            return [None] * len(events)

        sk.batch_override = batch
        await send(d, s, 2, entities=2)

        async def retried() -> bool:
            return any(state == "ready" for (_, state) in (await d.store.counts()))

        await wait_for(retried)
        broken = False
        await wait_for(lambda: len(sk.received) == 2, timeout=10)


async def test_a_poison_delivery_cannot_keep_the_breaker_open(tmp_path: Path) -> None:
    """One delivery that always fails 'retryably' while the sink is otherwise fine is dead-lettered."""
    async with running(settings(tmp_path)) as d, aiohttp.ClientSession() as s:
        sk = sink(d)
        sk.fail = lambda e: RetryableError("HTTP 500 on this one") if e.entity_id == "c0" else None
        await send(d, s, 1, entities=1)  # the poison one first, alone: it trips the breaker
        await wait_for(lambda: d.dispatcher.sinks["s"].breaker.status != "closed", timeout=10)
        for i in range(1, 8):  # then healthy traffic
            status, _ = await post_signed(s, hook_url(d), {"entity": "Customer", "id": f"ok{i}", "v": 0}, f"ok{i}")
            assert status == 200

        async def poison_dead() -> bool:
            return len(await d.store.dead_letters()) == 1

        await wait_for(poison_dead, timeout=15)
        await wait_for(lambda: len(sk.received) == 7, timeout=10)
        assert [x.event_id for x in await d.store.dead_letters()] == ["m0"]


async def test_an_idle_dispatcher_commits_nothing_and_still_meets_a_due_retry(tmp_path: Path) -> None:
    """Idle, it sleeps until a commit wakes it or a retry falls due: no empty lease (a write) every second."""
    from .receiver import Receiver

    receiver = Receiver(per_event={"r1": [(503, {})]})
    await receiver.start()
    cfg = write_config(
        tmp_path,
        f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.crm]
connector = "http"
url = "{receiver.url}"
retry = {{base = "1500ms", cap = "1500ms"}}

[[routes]]
from = "demo"
to = ["crm"]
""",
    )
    try:
        async with running(load_config(cfg)) as d, aiohttp.ClientSession() as s:
            assert (await post_signed(s, hook_url(d), {"type": "t"}, "r1"))[0] == 200
            # The retry is due 1.5 s after the 503: the idle wakes in between find nothing due, then it goes.
            await wait_for(lambda: [r.status for r in receiver.log] == [503, 200], timeout=15)
            await wait_for(lambda: _done(d), timeout=10)
            commits = d.store.commits
            await asyncio.sleep(3.0)  # an observation window: three of the dispatcher's idle wake-ups
            assert d.store.commits == commits
            # And a commit still wakes it at once.
            assert (await post_signed(s, hook_url(d), {"type": "t"}, "r2"))[0] == 200
            await wait_for(lambda: len(receiver.log) == 3, timeout=5)
    finally:
        await receiver.stop()


async def _done(d: Daemon) -> bool:
    return (await d.store.counts()).get(("crm", "done")) == 1
