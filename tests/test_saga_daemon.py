"""Sagas through ``integrand run`` (a real subprocess): steps in order with keys, compensation in reverse, kill -9
between steps, a failing compensation flagged in the DLQ, and ``integrand saga show``.

The three systems (``tests/saga_systems.py``) sit behind ``http`` sinks and are idempotent on the
Idempotency-Key, so "no step done twice" is checked as "no record changed twice", and "none
skipped" as every step's change being there.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from integrand.testing import fake_api_server

from .daemon_proc import DaemonProcess
from .helpers import DEMO_SECRET, post_signed, wait_for
from .saga_systems import Systems

BASE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "2s"

[admin]
enabled = false

[dispatcher]
workers = 2
lease = "10s"

[dispatcher.retry]
base = "50ms"
cap = "200ms"

[dispatcher.breaker]
failure_threshold = 50
open_for = "100ms"
max_open_for = "200ms"
"""


def config(url: str, *, step_attempts: int = 5, compensation_attempts: int = 3) -> str:
    sinks = "".join(f'\n[sinks.{s}]\nconnector = "http"\nurl = "{url}/{s}"\n' for s in "abc")
    return f"""{BASE}
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
{sinks}
[[sagas]]
name = "order"
from = "demo"
step_attempts = {step_attempts}
compensation_attempts = {compensation_attempts}

[[sagas.steps]]
name = "a"
sink = "a"
map = {{ key = {{ path = "data.key", required = true }}, name = "data.name" }}
compensate = {{ sink = "a", map = {{ id = {{ path = "step.id", required = true }} }} }}

[[sagas.steps]]
name = "b"
sink = "b"
map = {{ key = "data.key", a_id = {{ path = "steps.a.id", required = true }} }}
compensate = {{ sink = "b", map = {{ id = {{ path = "step.id", required = true }} }} }}

[[sagas.steps]]
name = "c"
sink = "c"
map = {{ key = "data.key", a_id = "steps.a.id", b_id = {{ path = "steps.b.id", required = true }} }}
"""


@pytest.fixture
async def systems() -> AsyncIterator[tuple[Systems, str]]:
    s = Systems()
    async with fake_api_server(s.app()) as url:
        yield s, url
    s.release.set()


def saga_record(db: Path, sid: str) -> dict[str, Any] | None:
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM state WHERE scope = 'saga' AND key = ?", (sid,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return orjson.loads(row[0]) if row else None


def dead_letters(db: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.execute("SELECT sink, last_error FROM deliveries WHERE state = 'dead' ORDER BY id"))
    finally:
        conn.close()


async def dead_lettered(db: Path, n: int = 1) -> list[tuple[str, str]]:
    """The dead letters once there are ``n`` (the saga's record is committed before the delivery's outcome)."""
    await wait_for(lambda: len(dead_letters(db)) >= n, timeout=20, interval=0.05)
    return dead_letters(db)


async def finished(db: Path, sid: str, status: str, timeout: float = 20.0) -> dict[str, Any]:
    def check() -> bool:
        rec = saga_record(db, sid)
        return rec is not None and rec.get("finished") == status

    await wait_for(check, timeout=timeout, interval=0.05)
    rec = saga_record(db, sid)
    assert rec is not None
    return rec


async def cli(cfg: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "integrand.cli",
        *args,
        "--config",
        str(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start(tmp_path: Path, body: str) -> tuple[DaemonProcess, Path, Path]:
    cfg = tmp_path / "config.toml"
    cfg.write_text(body)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    await daemon.start()
    return daemon, cfg, tmp_path / "var" / "integrand.db"


async def send(daemon: DaemonProcess, msg_id: str, key: str = "K-1", name: str = "Ada") -> str:
    async with aiohttp.ClientSession() as session:
        status, _ = await post_signed(
            session, daemon.url(), {"type": "order.created", "key": key, "name": name}, msg_id
        )
    assert status in (200, 202), status
    return f"demo:{msg_id}~order"


async def test_all_steps_in_order_each_result_feeds_the_next(tmp_path: Path, systems: tuple[Systems, str]) -> None:
    sys_, url = systems
    sys_.plan[("b", "run")] = ["503", "503"]  # transient: retried, never compensated
    daemon, cfg, db = await start(tmp_path, config(url))
    try:
        sid = await send(daemon, "msg_ok")
        rec = await finished(db, sid, "done")
        assert sys_.applied() == [("a", "run"), ("b", "run"), ("c", "run")]
        [a_id] = sys_.records["a"]
        [b_id] = sys_.records["b"]
        [c_rec] = sys_.records["c"].values()
        assert c_rec == {"key": "K-1", "a_id": a_id, "b_id": b_id}
        assert [s.status for s in sys_.seen("b")] == [503, 503, 200]
        assert {s.key for s in sys_.seen("b")} == {f"{sid}:b"}  # every try of a step carries its one key
        assert rec["state"]["results"] == {"a": {"id": a_id}, "b": {"id": b_id}, "c": {"id": "c-3"}}
        assert dead_letters(db) == []
        rc, out, _ = await cli(cfg, "saga", "show", "demo:msg_ok")
        assert rc == 0, out
        assert "status done" in out and "1. a" in out and "3. c" in out
        assert out.count("run b") == 3 and "retry" in out
        rc, out, _ = await cli(cfg, "events", "show", "demo:msg_ok")  # the event's story tells the saga too
        assert rc == 0 and "delivery 1 to ~saga:order: done" in out and f"saga {sid}" in out and "run c" in out
    finally:
        await daemon.kill()


@pytest.mark.parametrize("failing", ["a", "b", "c"])
async def test_a_permanent_failure_compensates_the_completed_steps_in_reverse(
    tmp_path: Path, systems: tuple[Systems, str], failing: str
) -> None:
    sys_, url = systems
    sys_.plan[(failing, "run")] = ["422"]
    daemon, cfg, db = await start(tmp_path, config(url))
    try:
        sid = await send(daemon, f"msg_{failing}")
        rec = await finished(db, sid, "compensated")
        done = {"a": [], "b": ["a"], "c": ["a", "b"]}[failing]
        # Steps before the failure ran once each, the failing step was tried once (a 422 is permanent) and
        # nothing after it ran; then the completed steps with a compensation were undone, newest first.
        assert sys_.applied("run") == [(s, "run") for s in done]
        assert [s.system for s in sys_.seen(kind="run")] == [*done, failing]
        assert sys_.applied("undo") == [(s, "undo") for s in reversed(done)]
        assert all(not sys_.records.get(s) for s in "abc")  # nothing of the change stays anywhere
        assert rec["state"]["undone"] == list(reversed(done))
        [(sink, error)] = await dead_lettered(db)
        assert sink == "~saga:order"
        assert error.startswith("SagaCompensated") and f"step {failing}" in error and "MANUAL" not in error
        rc, out, _ = await cli(cfg, "saga", "show", sid)
        assert rc == 0
        assert "status compensated" in out and f"run {failing}" in out
        for s in done:
            assert f"undo {s}" in out
    finally:
        await daemon.kill()


@pytest.mark.parametrize("when", ["hang-before", "hang-after"])
async def test_kill_9_between_steps_resumes_without_repeating_or_skipping(
    tmp_path: Path, systems: tuple[Systems, str], when: str
) -> None:
    """Killed while step b is in flight (before b's system applied it, or after but before the answer),
    once step a's outcome has committed (that commit overlaps b's call: it may land after b was sent)."""
    sys_, url = systems
    sys_.plan[("b", "run")] = [when]
    daemon, _cfg, db = await start(tmp_path, config(url))
    try:
        sid = await send(daemon, f"msg_kill_{when}")
        await asyncio.wait_for(sys_.hanging.wait(), 20)

        def a_recorded() -> bool:
            rec = saga_record(db, sid)
            return rec is not None and rec["state"]["next_step"] == 1

        await wait_for(a_recorded, timeout=20)
        await daemon.kill()  # SIGKILL with step a recorded and step b in flight
        rec = saga_record(db, sid)
        assert rec is not None and rec["state"]["next_step"] == 1 and rec["status"] == "running"
        await daemon.start()
        rec = await finished(db, sid, "done")
        assert [s.system for s in sys_.seen(kind="run")] == ["a", "b", "b", "c"]  # a not again, b again, c once
        assert sys_.applied() == [("a", "run"), ("b", "run"), ("c", "run")]  # each change made exactly once
        b_keys = [s.key for s in sys_.seen("b")]
        assert b_keys == [f"{sid}:b"] * 2
        assert len(sys_.records["b"]) == 1 and len(sys_.records["c"]) == 1
        [c_rec] = sys_.records["c"].values()
        assert c_rec["b_id"] == next(iter(sys_.records["b"]))
        assert dead_letters(db) == []
    finally:
        sys_.release.set()
        await daemon.kill()


async def test_a_failing_compensation_reaches_the_dlq_flagged_and_a_replay_finishes_it(
    tmp_path: Path, systems: tuple[Systems, str]
) -> None:
    sys_, url = systems
    sys_.plan[("c", "run")] = ["422"]
    sys_.plan[("b", "undo")] = ["503*"]  # b cannot be undone (its system keeps failing)
    daemon, cfg, db = await start(tmp_path, config(url, compensation_attempts=3))
    try:
        sid = await send(daemon, "msg_manual")
        rec = await finished(db, sid, "manual")
        assert [s.status for s in sys_.seen("b", "undo")] == [503, 503, 503]
        assert sys_.seen("a", "undo") == []  # stopped at b: a is not undone behind b's back
        assert rec["state"]["status"] == "manual"
        [(sink, error)] = await dead_lettered(db)
        assert sink == "~saga:order"
        assert error.startswith("SagaNeedsIntervention: MANUAL INTERVENTION") and "compensation of step b" in error
        assert "ALERT saga order" in daemon.output() and "MANUAL INTERVENTION NEEDED" in daemon.output()
        rc, out, _ = await cli(cfg, "dlq", "list")
        assert rc == 0 and "MANUAL INTERVENTION" in out
        rc, out, _ = await cli(cfg, "saga", "show", sid)
        assert "status manual" in out and out.count("undo b") == 3
        # A person fixes system b and replays the dead letter: the compensation goes on where it stopped.
        sys_.plan[("b", "undo")] = []
        await daemon.kill()
        rc, out, err = await cli(cfg, "dlq", "replay", "--all")
        assert rc == 0, err
        await daemon.start()
        rec = await finished(db, sid, "compensated")
        assert sys_.applied("undo") == [("b", "undo"), ("a", "undo")]
        assert all(not sys_.records.get(s) for s in "abc")
    finally:
        await daemon.kill()


async def test_the_admin_api_serves_a_saga(tmp_path: Path, systems: tuple[Systems, str]) -> None:
    from .helpers import BASE as ADMIN_BASE
    from .helpers import admin_url, hook_url, running, settings_for

    _, url = systems
    body = config(url).split("[sources.demo]", 1)[1]
    settings = settings_for(tmp_path, "[sources.demo]" + body, ADMIN_BASE + '\n[dispatcher.retry]\nbase = "50ms"\n')
    async with running(settings) as d, aiohttp.ClientSession() as session:
        status, _ = await post_signed(session, hook_url(d), {"type": "order.created", "key": "K-9"}, "msg_api")
        assert status in (200, 202)
        sid = "demo:msg_api~order"

        async def done() -> bool:
            rec = await d.store.state_get("saga", sid)
            return isinstance(rec, dict) and rec.get("finished") == "done"

        await wait_for(done, timeout=20)
        async with session.get(admin_url(d, "/api/sagas/demo:msg_api")) as r:
            assert r.status == 200
            [rec] = await r.json()
        assert rec["id"] == sid and rec["status"] == "done" and set(rec["state"]["results"]) == {"a", "b", "c"}
        async with session.get(admin_url(d, "/api/sagas/demo:nope")) as r:
            assert r.status == 404 and "no saga" in (await r.json())["error"]


def delivery_states(db: Path) -> dict[str, str]:
    """event id → state of its delivery to the saga."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT e.event_id, d.state FROM deliveries d JOIN events e ON e.id = d.event")
        return {str(r[0]): str(r[1]) for r in rows}
    finally:
        conn.close()


async def test_a_saga_completes_without_waiting_for_the_slow_sagas_of_its_batch(
    tmp_path: Path, systems: tuple[Systems, str]
) -> None:
    """Two sagas leased in one batch: the fast one's delivery is done while the other's step still hangs."""
    from integrand.events import Event

    from .helpers import BASE as ADMIN_BASE
    from .helpers import running, settings_for

    sys_, url = systems
    sys_.hold.add("K-slow")
    body = config(url).split("[sources.demo]", 1)[1]
    settings = settings_for(tmp_path, "[sources.demo]" + body, ADMIN_BASE + '\n[dispatcher.retry]\nbase = "50ms"\n')
    async with running(settings) as d:
        events = [
            Event(id=f"ev_{k}", source="demo", type="order.created", data={"key": k}, entity="order", entity_id=k)
            for k in ("K-slow", "K-fast")
        ]
        await d.store.enqueue([(e, ["~saga:order"]) for e in events])  # one commit: one lease takes both
        await asyncio.wait_for(sys_.hanging.wait(), 20)
        # Well before the slow step's http sink gives up on it (15 s), which would end the whole batch.
        await wait_for(lambda: delivery_states(d.store.path).get("ev_K-fast") == "done", timeout=8, interval=0.05)
        assert delivery_states(d.store.path)["ev_K-slow"] == "leased"  # still in flight, in the same batch
        rec = await d.store.state_get("saga", "demo:ev_K-fast~order")
        assert rec["finished"] == "done"
        sys_.release.set()
        sys_.hold.clear()


async def test_a_compensation_respects_its_sinks_breaker(tmp_path: Path, systems: tuple[Systems, str]) -> None:
    """An undo whose sink is down opens that sink's breaker; while it is open the undo waits without spending
    compensation attempts (so an outage does not turn into MANUAL INTERVENTION), and it goes out when b is back."""
    sys_, url = systems
    sys_.plan[("c", "run")] = ["422"]
    sys_.plan[("b", "undo")] = ["503*"]
    body = config(url, compensation_attempts=3).replace("failure_threshold = 50", "failure_threshold = 2")
    body = body.replace('open_for = "100ms"', 'open_for = "300ms"').replace(
        'max_open_for = "200ms"', 'max_open_for = "300ms"'
    )
    daemon, _cfg, db = await start(tmp_path, body)
    try:
        sid = await send(daemon, "msg_breaker")
        # More undo requests than compensation_attempts, and still not given up on: the ones made while b's
        # breaker was open (or as its probe) spent no attempt.
        await wait_for(
            lambda: len(sys_.seen("b", "undo")) >= 5 or (saga_record(db, sid) or {}).get("finished") == "manual",
            timeout=30,
            interval=0.05,
        )
        rec = saga_record(db, sid)
        assert rec is not None and rec["status"] == "compensating", rec and rec["status"]
        assert any(h["outcome"] == "paused" and h["step"] == "b" for h in rec["history"])
        sys_.plan[("b", "undo")] = []  # b is back: its breaker's next probe is the undo, and a follows
        rec = await finished(db, sid, "compensated")
        assert sys_.applied("undo") == [("b", "undo"), ("a", "undo")]
        assert "sink b: circuit open" in daemon.output()
    finally:
        await daemon.kill()


async def test_a_step_that_would_write_what_it_last_wrote_is_not_sent_again(
    tmp_path: Path, systems: tuple[Systems, str]
) -> None:
    """The sagas' loop guard: a later saga of the same record (e.g. polling or reconciliation seeing integrand's
    own write-back as a new version) sends only the steps whose payload changed since the record's last saga."""
    sys_, url = systems
    body = config(url).replace('secret = "', 'entity_field = "type"\nentity_id_field = "key"\nsecret = "', 1)
    body = body.replace(
        'b_id = { path = "steps.b.id", required = true } }', 'b_id = "steps.b.id", name = "data.name" }'
    )
    assert 'name = "data.name" }' in body.rsplit("[[sagas.steps]]", 1)[1]
    daemon, cfg, db = await start(tmp_path, body)
    try:
        first = await finished(db, await send(daemon, "msg_g1"), "done")
        assert len(sys_.log) == 3
        again = await finished(db, await send(daemon, "msg_g2"), "done")  # the same record, nothing changed
        assert len(sys_.log) == 3  # nothing sent
        assert [(h["step"], h["outcome"]) for h in again["history"]] == [(s, "unchanged") for s in "abc"]
        assert again["state"]["results"] == first["state"]["results"]
        rc, out, _ = await cli(cfg, "saga", "show", "demo:msg_g2")
        assert rc == 0 and "unchanged" in out
        # A real change: only the steps whose payload it changes are sent (b maps nothing from the name).
        await finished(db, await send(daemon, "msg_g3", name="Grace"), "done")
        assert [(s.system, s.kind) for s in sys_.log[3:]] == [("a", "run"), ("c", "run")]
        # A saga whose later step fails undoes only what it wrote itself: not b, which it left unchanged.
        sys_.plan[("c", "run")] = ["422"]
        failed = await finished(db, await send(daemon, "msg_g4", name="Linus"), "compensated")
        assert [(s.system, s.kind) for s in sys_.log[5:]] == [("a", "run"), ("c", "run"), ("a", "undo")]
        assert any(h["step"] == "b" and h["action"] == "undo" and h["outcome"] == "skipped" for h in failed["history"])
        # After a compensation nothing is taken as written: the next saga of the record sends every step.
        await finished(db, await send(daemon, "msg_g5", name="Linus"), "done")
        assert [(s.system, s.kind) for s in sys_.log[8:]] == [("a", "run"), ("b", "run"), ("c", "run")]
    finally:
        await daemon.kill()
