"""``integrand sync`` and ``integrand replay`` with real tables: a full sync merges at the end (an interrupted or
failed run leaves the target as it was), re-running is idempotent, deletes reach the target, replay resends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from integrand_postgres import PostgresSink, PostgresSinkConfig, PostgresSource, PostgresSourceConfig
from pg_support import Schema, cli

from integrand.config import load_config
from integrand.connector import ReconcilePage, RetryableError
from integrand.sync import SyncRun, build_run, sync_once
from integrand.testing import daemon_config, temp_store

APP = """
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text);
INSERT INTO customers SELECT g, 'c' || g, 'c' || g || '@example.com' FROM generate_series(1, 2500) g;
CREATE TABLE warehouse_customers (
    id int PRIMARY KEY, name text, email text,
    etl_loaded_at timestamptz NOT NULL DEFAULT now(), etl_source text, etl_version text, etl_event_id text,
    deleted_at timestamptz
);
"""


def config(tmp_path: Path, schema: Schema) -> Path:
    return daemon_config(
        tmp_path,
        f"""
[sources.app]
connector = "postgres-cdc"
dsn = "{schema.dsn}"
tables = ["customers"]

[sinks.warehouse]
connector = "postgres"
dsn = "{schema.dsn}"
table = "warehouse_customers"
key = "id"
columns = {{ id = {{ path = "data.after.id", convert = "int" }}, name = "data.after.name", email = "data.after.email" }}

[[routes]]
from = "app"
to = ["warehouse"]
""",
    )


async def target(schema: Schema) -> list[tuple[Any, ...]]:
    rows = await schema.fetch("SELECT id, name, email, deleted_at IS NOT NULL FROM warehouse_customers ORDER BY id")
    return [tuple(r) for r in rows]


def summary(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("sync "))


async def test_full_sync_merges_deletes_and_is_idempotent(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(APP)
    cfg = config(tmp_path, schema)
    done = cli(cfg, "sync", "app", "--to", "warehouse", "--full")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "read 2,500, written 2,500, unchanged 0, deleted 0, failed 0" in summary(done.stdout)
    assert len(await target(schema)) == 2500

    await schema.execute(
        "DELETE FROM customers WHERE id <= 5; UPDATE customers SET name = 'new' WHERE id IN (10, 11, 12)"
    )
    done = cli(cfg, "sync", "app", "--to", "warehouse", "--full")
    assert done.returncode == 0, done.stderr
    assert "read 2,495, written 3, unchanged 2,492, deleted 5, failed 0" in summary(done.stdout)
    rows = await target(schema)
    assert [r[3] for r in rows[:5]] == [True] * 5  # soft-deleted
    assert rows[9][1] == "new" and rows[12][1] == "c13"

    done = cli(cfg, "sync", "app", "--to", "warehouse", "--full")  # nothing changed: nothing written
    assert "read 2,495, written 0, unchanged 2,495, deleted 0, failed 0" in summary(done.stdout)
    assert await target(schema) == rows


class FailingSource(PostgresSource):
    """The real source, whose listing breaks on its third page (an outage half-way through)."""

    pages = 0

    async def reconcile(self, since: float | None, cursor: Any) -> ReconcilePage:
        FailingSource.pages += 1
        if FailingSource.pages == 3:
            raise RetryableError("connection lost half-way")
        return await super().reconcile(since, cursor)


async def test_a_full_sync_interrupted_half_way_leaves_the_target_as_it_was(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(APP)
    cfg = config(tmp_path, schema)
    assert cli(cfg, "sync", "app", "--to", "warehouse", "--full").returncode == 0
    before = await target(schema)
    await schema.execute("UPDATE customers SET name = 'changed'; DELETE FROM customers WHERE id > 2000")
    settings = load_config(cfg)
    from integrand.testing import connector_context

    async with temp_store(tmp_path / "x.db") as store:
        src_cfg, sink_cfg = settings.sources["app"].options, settings.sinks["warehouse"].options
        assert isinstance(src_cfg, PostgresSourceConfig) and isinstance(sink_cfg, PostgresSinkConfig)
        src = FailingSource(src_cfg, connector_context(store, name="app", base_dir=tmp_path))
        sink = PostgresSink(
            sink_cfg,
            connector_context(store, name="warehouse", role="sink", base_dir=tmp_path),
        )
        await sink.start()
        try:
            run: SyncRun = build_run(settings, {"source:app": src, "sink:warehouse": sink}, store, "app", "warehouse")
            with pytest.raises(RetryableError, match="half-way"):
                await sync_once(run, full=True, since=None)
            assert FailingSource.pages == 3
            assert await target(schema) == before  # two pages were staged, none of it merged, nothing deleted
            # Run again once the source is back: the whole change lands at once.
            report = await sync_once(run, full=True, since=None)
        finally:
            await sink.close()
    assert (report.read, report.written, report.deleted) == (2000, 2000, 500)
    after = await target(schema)
    assert {r[1] for r in after[:2000]} == {"changed"} and all(r[3] for r in after[2000:])


async def test_a_merge_the_database_refuses_leaves_the_old_data(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(APP)
    cfg = config(tmp_path, schema)
    assert cli(cfg, "sync", "app", "--to", "warehouse", "--full").returncode == 0
    before = await target(schema)
    await schema.execute("UPDATE customers SET name = 'x' WHERE id > 100")
    await schema.execute("ALTER TABLE warehouse_customers ADD CONSTRAINT no_x CHECK (name <> 'x' OR id < 2400)")
    done = cli(cfg, "sync", "app", "--to", "warehouse", "--full")
    assert done.returncode == 1
    assert "the final merge failed, the table is unchanged" in done.stderr and "no_x" in done.stderr
    assert await target(schema) == before


async def test_sync_and_replay_say_what_is_wrong_in_one_line(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(APP)
    cfg = config(tmp_path, schema)
    done = cli(cfg, "sync", "app", "--to", "nowhere", "--full")
    assert done.returncode == 1 and done.stderr.strip() == f"error: no sink named 'nowhere' in {cfg}"
    done = cli(cfg, "sync", "app", "--to", "warehouse")
    assert done.returncode == 2 and "give exactly one of --full or --since T" in done.stderr
    done = cli(cfg, "replay", "--since", "yesterday-ish", "--to", "warehouse")
    assert done.returncode == 2 and "neither an ISO-8601 time" in done.stderr


async def test_a_scheduled_sync_runs_inside_the_daemon(schema: Schema, tmp_path: Path) -> None:
    from integrand.testing import running_daemon, wait_for

    await schema.execute(APP)
    cfg = config(tmp_path, schema)
    cfg.write_text(
        cfg.read_text() + '\n[[syncs]]\nfrom = "app"\nto = "warehouse"\nschedule = "300ms"\nmode = "incremental"\n'
    )

    async def count() -> bool:
        return len(await target(schema)) == 2500

    async with running_daemon(cfg):
        await wait_for(count, timeout=30)
        await schema.execute("UPDATE customers SET name = 'later' WHERE id = 7")

        async def updated() -> bool:
            return bool((await target(schema))[6][1] == "later")

        await wait_for(updated, timeout=30)


def test_syncs_config_errors_name_the_key(tmp_path: Path) -> None:
    from integrand.errors import ConfigError

    cfg = daemon_config(
        tmp_path,
        '[sinks.out]\nconnector = "jsonl"\npath = "o.jsonl"\n[sources.hook]\nconnector = "webhook"\nsignature = "github"\nsecret = "s"\n'
        '[[syncs]]\nfrom = "hook"\nto = "out"\nschedule = "every day"\n'
        '[[syncs]]\nfrom = "hook"\nto = "outt"\nschedule = "1h"\n',
    )
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert any(
        p.startswith("syncs[0].schedule: reconcile: 'every day' is neither cron syntax") for p in e.value.problems
    )
    assert "syncs[1].from: connector 'webhook' cannot list its records (reconcile)" in e.value.problems
    assert "syncs[1].to: no sink named 'outt' (did you mean 'out'?)" in e.value.problems
