"""``integrand migrate``: a SQLite store with rows in every state moved to PostgreSQL, then run there.

The store is built through the store's own operations (as a daemon would have left it), migrated by
the real command in a subprocess, compared row by row through both backends' public reads, and then
an ``integrand run`` node on the PostgreSQL store delivers what was pending and replays the DLQ.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import asyncpg
import orjson
import pytest
from cryptography.fernet import Fernet

from integrand.events import Event
from integrand.store import Outcome, Store
from integrand.store.postgres import PgStore

from .daemon_proc import DaemonProcess, jsonl_ids
from .helpers import DEMO, wait_for, write_config
from .pgdb import fresh_schema

SECRET_WORD = "pw-migrate-secret"  # in the DSN's password: must never be printed
PG_NODE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:0"

[store]
backend = "postgres"
dsn = {env = "INTEGRAND_TEST_STORE_DSN"}
"""
TOKEN_KEY = Fernet.generate_key()
TOKENS = {"access_token": "at-123", "refresh_token": "rt-456", "expires_at": 2e9}


def ev(i: str, **kw: object) -> Event:
    return Event(id=i, source="demo", type=str(kw.pop("type", "thing.updated")), data={"n": i}, **kw)  # type: ignore[arg-type]


async def build_store(path: Path) -> dict[str, str]:
    """A single node's store with a row in every state; returns the expected final state per event id."""
    s = Store(path)
    await s.open()
    try:
        await s.enqueue([(ev("done-1"), ["out"])])
        (d,) = await s.lease(10, 60)
        await s.complete([Outcome(d, "done")])
        await s.enqueue([(ev("dead-1"), ["out"]), (ev("dead-2"), ["out"])])
        await s.complete([Outcome(d, "dead", error="HTTP 400 from the sink") for d in await s.lease(10, 60)])
        await s.enqueue([(ev("backoff-1"), ["out"])])
        (d,) = await s.lease(10, 60)
        await s.complete([Outcome(d, "retry", error="HTTP 503", next_attempt_at=time.time() + 2)])
        await s.enqueue([(ev("leased-1"), ["out"])])
        (leased,) = await s.lease(10, 3600)  # its node dies holding it
        assert leased.event.id == "leased-1"
        await s.enqueue(
            [(ev(f"ready-{i}"), ["out"]) for i in range(5)]
            + [
                (ev("cust-v1", entity="customer", entity_id="1", version="1"), ["out"]),
                (ev("cust-v2", entity="customer", entity_id="1", version="2"), ["out"]),
                (ev("gone", type="customer.deleted", entity="customer", entity_id="9", version="3"), ["out"]),
            ],
            request_id="req-7f3a",
        )
        assert (await s.enqueue([(ev("ready-0"), ["out"])])).duplicates == 1  # audited as deduplicated
        await s.enqueue_with_cursor([], "demo", {"page": "p7", "since": "2026-12-01T00:00:00Z"})
        await s.enqueue_with_cursor([], "stream-src", {"replay_id": "AAAB"}, kind="stream")
        enc = Fernet(TOKEN_KEY).encrypt(orjson.dumps(TOKENS)).decode()
        await s.state_set("source:qbo", "oauth_tokens", {"v": 1, "enc": enc, "saved_at": 1.0})
        await s.state_set("loop-guard:out", "echo:demo:x", "fp-1")
        s.record_rejection("demo", 401, "bad signature", "10.0.0.9", {"User-Agent": "curl"}, keep=100)
    finally:
        await s.close()
    expect = {f"ready-{i}": "delivered" for i in range(5)}
    expect |= dict.fromkeys(("cust-v1", "cust-v2", "gone", "leased-1", "backoff-1"), "delivered")
    expect |= {"dead-1": "replayed", "dead-2": "replayed", "done-1": "already"}
    return expect


def migrate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "integrand.cli", "migrate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def with_password(dsn: str) -> str:
    return dsn.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET_WORD}@")


async def snapshot(store: Store | PgStore, delivery_ids: range) -> dict[str, object]:
    """What an operator and the daemon can read of a store, through the backend's public operations."""
    states: Counter[tuple[str, str]] = Counter()
    for (sink, state), n in (await store.counts()).items():
        states[(sink, "ready" if state == "leased" else state)] += n
    details = {}
    for i in delivery_ids:
        d = await store.delivery(i)
        if d is not None:
            state = "ready" if d.state == "leased" else d.state  # a migration releases leases
            audit = [(a.action, a.detail) for a in d.audit]
            details[i] = (d.sink, state, d.attempts, d.next_attempt_at, d.last_error, d.event.id, audit)
    return {
        "events": await store.event_count(),
        "counts": states,
        "deliveries": details,
        "dead": [(x.id, x.event_id, x.attempts, x.last_error) for x in await store.dead_letters()],
        "cursors": [(c.source, c.kind, c.value, c.updated_at) for c in await store.cursors()],
        "entities": await store.entity_versions("demo", [("customer", "1"), ("customer", "9")]),
        "tokens": await store.state_get("source:qbo", "oauth_tokens"),
        "guard": await store.state_get("loop-guard:out", "echo:demo:x"),
        "rejections": [(r.source, r.status, r.reason, r.remote, r.headers) for r in await store.rejections()],
    }


async def test_a_store_in_every_state_moves_to_postgres_and_runs_there(
    tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "var" / "integrand.db"
    expect = await build_store(db)
    schema = await fresh_schema(pg_database)
    dsn = with_password(f"{pg_database}?search_path={schema}")
    env = {"INTEGRAND_TEST_STORE_DSN": dsn}

    done = migrate("--from", f"sqlite:{db}", "--to", "postgres:env:INTEGRAND_TEST_STORE_DSN", env=env)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert SECRET_WORD not in out and "search_path" not in out
    rows = {m[0]: m[1] for m in re.findall(r"^  (\w+) +([\d,]+)", out, re.M)}
    assert rows == {
        "events": "13",
        "deliveries": "13",
        "audit": "4",
        "rejections": "1",
        "cursors": "2",
        "entity_versions": "2",
        "state": "2",
    }
    assert "(dead 2, done 1, ready 10)" in out
    assert "leased deliveries made ready again (their node is stopped): 1" in out
    assert "verified: every table's row count" in out

    lite = Store(db, role="reader")
    await lite.open()
    pg = PgStore(dsn, role="reader")
    await pg.open()
    try:
        before, after = await snapshot(lite, range(1, 20)), await snapshot(pg, range(1, 20))
    finally:
        await lite.close()
        await pg.close()
    assert after == before
    assert before["deliveries"] and before["dead"] and before["rejections"] and len(before["cursors"]) == 2  # type: ignore[arg-type]
    tokens = after["tokens"]
    assert isinstance(tokens, dict) and "rt-456" not in str(tokens)  # still ciphertext in the new store
    assert orjson.loads(Fernet(TOKEN_KEY).decrypt(tokens["enc"].encode())) == TOKENS  # and readable with the key
    conn = await asyncpg.connect(dsn)
    try:
        leftover = await conn.fetchval("SELECT count(*) FROM deliveries WHERE lease_owner IS NOT NULL")
        requests = await conn.fetch("SELECT DISTINCT request_id FROM events WHERE event_id LIKE 'ready-%'")
        next_id = await conn.fetchval("SELECT nextval(pg_get_serial_sequence('events', 'id'))")
    finally:
        await conn.close()
    assert [r[0] for r in requests] == ["req-7f3a"]  # the webhook request each event arrived in
    assert leftover == 0 and next_id == 14  # new events continue after the copied ids

    # A node on the PostgreSQL store delivers what was pending (in entity order), then replays the DLQ.
    monkeypatch.setenv("INTEGRAND_TEST_STORE_DSN", dsn)
    (tmp_path / "node").mkdir()
    node = DaemonProcess(write_config(tmp_path / "node", DEMO, PG_NODE), tmp_path / "node.log")
    sink = tmp_path / "node" / "var" / "out.jsonl"
    pending = {i for i, what in expect.items() if what == "delivered"}
    try:
        await node.start()
        await wait_for(lambda: set(jsonl_ids(sink)) >= pending, timeout=30, interval=0.1)
        replay = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "integrand.cli", "dlq", "replay", "--all", "-c", str(node.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert replay.returncode == 0, replay.stderr
        await wait_for(lambda: {"dead-1", "dead-2"} <= set(jsonl_ids(sink)), timeout=30, interval=0.1)
    finally:
        await node.kill()
    got = jsonl_ids(sink)
    assert Counter(got) == Counter(i for i, what in expect.items() if what != "already")  # each once, none lost
    assert got.index("cust-v1") < got.index("cust-v2")


async def test_migrate_refuses_a_store_a_daemon_holds(tmp_path: Path, pg_database: str) -> None:
    db = tmp_path / "integrand.db"
    running = Store(db)  # the daemon's role: it holds the writer lock
    await running.open()
    try:
        await running.enqueue([(ev("a"), ["out"])])
        schema = await fresh_schema(pg_database)
        env = {"INTEGRAND_TEST_STORE_DSN": f"{pg_database}?search_path={schema}"}
        r = await asyncio.to_thread(
            migrate, "--from", f"sqlite:{db}", "--to", "postgres:env:INTEGRAND_TEST_STORE_DSN", env=env
        )
    finally:
        await running.close()
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: a daemon is running on {db} (it holds {db}.lock): stop it first, so that nothing is accepted "
        "there after the copy; nothing was migrated"
    ]
    conn = await asyncpg.connect(pg_database, server_settings={"search_path": schema})
    try:
        assert await conn.fetchval("SELECT to_regclass('events')") is None  # the target was not touched
    finally:
        await conn.close()


async def test_migrate_refuses_a_non_empty_target_unless_told(tmp_path: Path, pg_database: str) -> None:
    db = tmp_path / "integrand.db"
    s = Store(db)
    await s.open()
    await s.enqueue([(ev("a"), ["out"]), (ev("b"), ["out"])])
    await s.close()
    schema = await fresh_schema(pg_database)
    dsn = f"{pg_database}?search_path={schema}"
    other = PgStore(dsn, server_settings={"search_path": schema})
    await other.open()
    await other.enqueue([(ev("already-there"), ["out"])])
    await other.close()
    env = {"INTEGRAND_TEST_STORE_DSN": dsn}
    args = ("--from", f"sqlite:{db}", "--to", "postgres:env:INTEGRAND_TEST_STORE_DSN")

    refused = migrate(*args, env=env)
    assert refused.returncode == 1
    assert "is not empty (events 1, deliveries 1); migrate into an empty one, or give --replace" in refused.stderr
    replaced = migrate(*args, "--replace", env=env)
    assert replaced.returncode == 0, replaced.stderr
    assert "--replace: deleting what" in replaced.stdout
    pg = PgStore(dsn, role="reader")
    await pg.open()
    try:
        assert await pg.event_count() == 2
        assert [e.id for _, e in await pg.events_since(0)] == ["a", "b"]
    finally:
        await pg.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--from", "x.db", "--to", "postgres:postgresql://h/db"), "error: --from must be sqlite:PATH"),
        (("--from", "sqlite:x.db", "--to", "mysql://h/db"), "error: --to must be postgres:env:NAME"),
        (("--from", "sqlite:x.db", "--to", "postgres:env:INTEGRAND_NOT_SET"), "INTEGRAND_NOT_SET is not set"),
        (("--from", "sqlite:nowhere.db", "--to", "postgres:postgresql://h/db"), "error: no SQLite store at nowhere.db"),
    ],
)
def test_migrate_says_what_is_wrong_with_its_arguments(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "integrand.cli", "migrate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback
