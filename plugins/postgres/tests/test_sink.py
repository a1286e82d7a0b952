"""The postgres sink against a real server: versions never go backwards, one bad row alone is dead-lettered,
both write paths give the same table, a killed connection is retried, schema problems are named precisely."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from integrand_postgres import PostgresSink
from pg_support import Schema

from integrand.connector import Event, PermanentError, RetryableError
from integrand.errors import ConfigError
from integrand.testing import running_connector, temp_store, wait_for

INVOICES = """
CREATE TABLE invoices (
    id text PRIMARY KEY,
    customer text,
    amount numeric(12,2) CHECK (amount >= 0),
    due date,
    etl_loaded_at timestamptz NOT NULL DEFAULT now(),
    etl_source text,
    etl_version text,
    etl_event_id text,
    deleted_at timestamptz
)
"""

COLUMNS = {
    "id": "entity_id",
    "customer": "data.CustomerRef.name",
    "amount": {"path": "data.TotalAmt", "convert": "number"},
    "due": "data.DueDate",
}


def sink_table(schema: Schema, table: str = "invoices", **extra: Any) -> dict[str, Any]:
    return {"dsn": schema.dsn, "table": table, "key": "id", "columns": COLUMNS, **extra}


def invoice(n: int, version: int, amount: float = 10.0, *, typ: str = "invoice.updated", src: str = "qbo") -> Event:
    return Event(
        id=f"ev-{n}-{version}",
        source=src,
        type=typ,
        entity="Invoice",
        entity_id=str(n),
        version=f"2026-01-01T00:00:{version:02d}Z",
        data={"Id": str(n), "TotalAmt": amount, "CustomerRef": {"name": f"c{n}"}, "DueDate": "2026-02-01"},
    )


@asynccontextmanager
async def sink(tmp_path: Path, table: Mapping[str, Any], name: str = "warehouse") -> AsyncIterator[PostgresSink]:
    async with (
        temp_store(tmp_path / f"{name}.db") as store,
        running_connector(PostgresSink, table, store, base_dir=tmp_path, role="sink", name=name) as s,
    ):
        assert isinstance(s, PostgresSink)
        yield s


async def rows(schema: Schema, table: str = "invoices") -> list[dict[str, Any]]:
    recs = await schema.fetch(f"SELECT * FROM {table} ORDER BY id")
    return [dict(r) for r in recs]


async def test_rows_carry_the_mapping_and_the_metadata(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(INVOICES)
    async with sink(tmp_path, sink_table(schema)) as s:
        assert await s.deliver_batch([invoice(1, 1, 12.5), invoice(2, 1, 3)]) == [None, None]
    got = await rows(schema)
    assert [(r["id"], r["customer"], str(r["amount"]), r["due"].isoformat()) for r in got] == [
        ("1", "c1", "12.50", "2026-02-01"),
        ("2", "c2", "3.00", "2026-02-01"),
    ]
    assert got[0]["etl_source"] == "qbo"
    assert got[0]["etl_version"] == "2026-01-01T00:00:01Z"
    assert got[0]["etl_event_id"] == "ev-1-1"
    assert got[0]["etl_loaded_at"] is not None and got[0]["deleted_at"] is None


@pytest.mark.parametrize("copy_min_rows", [1, 1_000_000], ids=["copy", "executemany"])
async def test_an_older_version_never_overwrites_a_newer_one_even_racing(
    schema: Schema, tmp_path: Path, copy_min_rows: int
) -> None:
    await schema.execute(INVOICES)
    rnd = random.Random(7)
    async with sink(tmp_path, sink_table(schema, copy_min_rows=copy_min_rows, pool_max=4)) as s:
        # 30 invoices, versions 1..6 each, delivered by 6 concurrent batches in a shuffled order.
        events = [invoice(n, v, amount=v) for n in range(30) for v in range(1, 7)]
        rnd.shuffle(events)
        batches = [events[i::6] for i in range(6)]
        results = await asyncio.gather(*(s.deliver_batch(b) for b in batches))
        assert all(r is None for res in results for r in res)
        # The stale ones once more, after the newest landed: still nothing moves backwards.
        assert all(r is None for r in await s.deliver_batch([invoice(n, 2, amount=2) for n in range(30)]))
    got = await rows(schema)
    assert len(got) == 30
    assert {r["etl_version"] for r in got} == {"2026-01-01T00:00:06Z"}
    assert {str(r["amount"]) for r in got} == {"6.00"}


@pytest.mark.parametrize("copy_min_rows", [1, 1_000_000], ids=["copy", "executemany"])
async def test_one_bad_row_alone_is_dead_lettered_with_postgres_message(
    schema: Schema, tmp_path: Path, copy_min_rows: int
) -> None:
    await schema.execute(INVOICES)
    events = [invoice(n, 1, amount=5) for n in range(200)]
    events[137] = invoice(137, 1, amount=-1)  # violates CHECK (amount >= 0)
    async with sink(tmp_path, sink_table(schema, copy_min_rows=copy_min_rows)) as s:
        res = await s.deliver_batch(events)
    bad = [i for i, r in enumerate(res) if r is not None]
    assert bad == [137]
    err = res[137]
    assert isinstance(err, PermanentError)
    assert "23514" in str(err) and "constraint invoices_amount_check" in str(err) and "ev-137-1" in str(err)
    got = await rows(schema)
    assert len(got) == 199 and "137" not in {r["id"] for r in got}


async def test_not_null_violation_names_the_column(schema: Schema, tmp_path: Path) -> None:
    await schema.execute("CREATE TABLE t (id text PRIMARY KEY, name text NOT NULL, etl_version text)")
    table = {
        "dsn": schema.dsn,
        "table": "t",
        "key": "id",
        "columns": {"id": "entity_id", "name": "data.name"},
        "metadata": {"loaded_at": "", "source": "", "event_id": ""},
        "deletes": "hard",
    }
    good = Event(id="a", source="s", type="x.updated", entity_id="1", version="1", data={"name": "n"})
    nameless = Event(id="b", source="s", type="x.updated", entity_id="2", version="1", data={})
    async with sink(tmp_path, table) as s:
        res = await s.deliver_batch([good, nameless])
    assert res[0] is None
    assert isinstance(res[1], PermanentError)
    assert "23502" in str(res[1]) and "column name" in str(res[1])


async def test_a_value_the_column_cannot_hold_is_dead_lettered_before_the_database(
    schema: Schema, tmp_path: Path
) -> None:
    await schema.execute(INVOICES)
    bad = invoice(9, 1)
    bad = Event(**{**bad.to_dict(), "data": {**bad.data, "DueDate": "next tuesday"}})
    async with sink(tmp_path, sink_table(schema)) as s:
        res = await s.deliver_batch([invoice(1, 1), bad])
    assert res[0] is None and isinstance(res[1], PermanentError)
    assert "sinks.warehouse.columns.due: cannot store 'next tuesday' in column due (date)" in str(res[1])


@pytest.mark.parametrize("copy_min_rows", [1, 1_000_000], ids=["copy", "executemany"])
async def test_values_the_bulk_path_cannot_take_get_the_exact_per_row_errors(
    schema: Schema, tmp_path: Path, copy_min_rows: int
) -> None:
    """A 300-row batch converted column by column, with three bad values in different columns among good ones of
    unusual shapes (an id as a number, an amount as a string): only the three are dead-lettered, each with its
    own column's message, and the rest are stored as the per-value conversion stores them."""
    await schema.execute(INVOICES.replace("id text PRIMARY KEY", "id text PRIMARY KEY, lines int"))
    evs = [invoice(n, 1, amount=n + 0.25) for n in range(300)]

    def with_data(ev: Event, **data: Any) -> Event:
        return Event(**{**ev.to_dict(), "data": {**ev.data, **data}})

    evs[10] = with_data(evs[10], DueDate="soon")
    evs[20] = with_data(evs[20], TotalAmt="12,5x")
    evs[30] = with_data(evs[30], Lines=2**40)  # too big for int: refused here, not by the encoder
    evs[40] = with_data(evs[40], TotalAmt="1,234.5")  # the mapping's number reads thousands separators
    evs[50] = with_data(evs[50], Lines="7")
    cols = {**COLUMNS, "lines": {"path": "data.Lines", "convert": "int"}}
    async with sink(tmp_path, sink_table(schema, columns=cols, copy_min_rows=copy_min_rows)) as s:
        res = await s.deliver_batch(evs)
    bad = {i: str(r) for i, r in enumerate(res) if r is not None}
    assert sorted(bad) == [10, 20, 30], bad
    assert "columns.due: cannot store 'soon' in column due (date)" in bad[10]
    assert "columns.amount: cannot convert '12,5x' with 'number'" in bad[20]
    assert "columns.lines: cannot store 1099511627776 in column lines (integer)" in bad[30]
    stored = {r["id"]: r for r in await rows(schema)}
    assert len(stored) == 297
    assert str(stored["40"]["amount"]) == "1234.50" and stored["50"]["lines"] == 7 and stored["1"]["lines"] is None
    assert str(stored["7"]["amount"]) == "7.25" and str(stored["7"]["due"]) == "2026-02-01"


async def test_copy_and_executemany_write_identical_tables(schema: Schema, tmp_path: Path) -> None:
    for t in ("via_copy", "via_many"):
        await schema.execute(INVOICES.replace("invoices", t))
    rnd = random.Random(3)
    events = [invoice(n, rnd.randint(1, 9), amount=rnd.randint(0, 500) / 4) for n in range(300)]
    events += [invoice(n, 10, typ="invoice.deleted") for n in range(0, 300, 7)]  # soft deletes, newer
    events += [invoice(n, 0, amount=999) for n in range(0, 300, 11)]  # stale updates: must not land
    events += [invoice(n, 20, typ="invoice.deleted") for n in range(300, 305)]  # deletes of unknown rows
    async with (
        sink(tmp_path, sink_table(schema, "via_copy", copy_min_rows=1), "copy") as a,
        sink(tmp_path, sink_table(schema, "via_many", copy_min_rows=10**6), "many") as b,
    ):
        for chunk in range(0, len(events), 97):
            part = events[chunk : chunk + 97]
            assert await a.deliver_batch(part) == [None] * len(part)
            assert await b.deliver_batch(part) == [None] * len(part)

    def comparable(rs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [
            (
                r["id"],
                r["customer"],
                r["amount"],
                r["due"],
                r["etl_version"],
                r["etl_event_id"],
                r["deleted_at"] is None,
            )
            for r in rs
        ]

    copy_rows, many_rows = await rows(schema, "via_copy"), await rows(schema, "via_many")
    assert comparable(copy_rows) == comparable(many_rows)
    assert len(copy_rows) == 300
    assert sum(r["deleted_at"] is not None for r in copy_rows) == len(range(0, 300, 7))


async def test_new_keys_go_straight_in_and_existing_ones_through_the_merge(schema: Schema, tmp_path: Path) -> None:
    """A batch of new keys is one COPY into the table; one with a key already there is refused by the key and
    merged by version instead; either way the rows are the merge's (load time = the transaction's now())."""
    await schema.execute(INVOICES)
    await schema.execute(INVOICES.replace("invoices", "merged"))
    async with (
        sink(tmp_path, sink_table(schema, copy_min_rows=1)) as s,
        sink(tmp_path, sink_table(schema, "merged", copy_min_rows=1), "m") as m,
    ):
        assert s.plan.direct
        m.plan.direct = False  # the staged merge only: what the straight COPY must equal
        first = [invoice(n, 5, amount=n) for n in range(50)]
        for k in (s, m):
            assert await k.deliver_batch(first) == [None] * 50
        assert (s.direct.tried, s.direct.refusals) == (1, 0)
        loaded = {r["etl_loaded_at"] for r in await rows(schema)}
        assert len(loaded) == 1  # one transaction's now(), as the merge writes it
        # Newer versions of some, older of others, and new keys: refused by the key, merged by version.
        second = [invoice(n, 9 if n % 2 else 1, amount=100 + n) for n in range(40, 60)]
        for k in (s, m):
            assert await k.deliver_batch(second) == [None] * 20
        assert (s.direct.tried, s.direct.refusals, s.direct.skip) == (2, 1, 1)
        third = [invoice(n, 9) for n in range(60, 70)]  # new keys, but the next batch after a refusal is merged
        for k in (s, m):
            assert await k.deliver_batch(third) == [None] * 10
        assert (s.direct.tried, s.direct.skip) == (2, 0)
        for k in (s, m):
            assert await k.deliver_batch([invoice(n, 9) for n in range(70, 75)]) == [None] * 5
        assert (s.direct.tried, s.direct.refusals, s.direct.backoff) == (3, 1, 0)

    def comparable(rs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(r["id"], r["amount"], r["etl_version"], r["etl_event_id"], r["deleted_at"]) for r in rs]

    got = await rows(schema)
    assert comparable(got) == comparable(await rows(schema, "merged"))
    by_id = {r["id"]: r for r in got}
    assert str(by_id["41"]["amount"]) == "141.00" and str(by_id["42"]["amount"]) == "42.00"  # newer won, older not
    assert len(got) == 75


async def test_a_key_inserted_concurrently_makes_the_straight_copy_fall_back_to_the_version_guard(
    schema: Schema, tmp_path: Path
) -> None:
    await schema.execute(INVOICES)
    other = await schema.connect()
    try:
        async with sink(tmp_path, sink_table(schema, copy_min_rows=1)) as s:
            tx = other.transaction()
            await tx.start()
            await other.execute(
                "INSERT INTO invoices (id, amount, etl_version) VALUES ('7', 70, '2026-01-01T00:00:08Z')"
            )
            # The straight COPY of key 7 waits for the other transaction, which commits a newer version.
            delivery = asyncio.ensure_future(s.deliver_batch([invoice(n, 3) for n in range(10)]))

            async def copy_waits() -> bool:
                return bool(
                    await schema.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                        s.app_name,
                    )
                )

            await wait_for(copy_waits, timeout=10)
            assert not delivery.done()
            await tx.commit()
            assert await asyncio.wait_for(delivery, 10) == [None] * 10
            assert s.direct.refusals == 1
    finally:
        await other.close()
    by_id = {r["id"]: r for r in await rows(schema)}
    assert len(by_id) == 10
    assert by_id["7"]["etl_version"] == "2026-01-01T00:00:08Z" and str(by_id["7"]["amount"]) == "70.00"


async def test_without_a_now_default_for_the_load_time_every_batch_is_merged(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(INVOICES.replace("NOT NULL DEFAULT now()", "NOT NULL DEFAULT statement_timestamp()"))
    async with sink(tmp_path, sink_table(schema, copy_min_rows=1)) as s:
        assert not s.plan.direct
        assert await s.deliver_batch([invoice(n, 1) for n in range(5)]) == [None] * 5
        assert s.direct.tried == 0
    assert len(await rows(schema)) == 5


async def test_deletes_hard_and_soft_respect_versions(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(INVOICES)
    await schema.execute(INVOICES.replace("invoices", "hard"))
    async with (
        sink(tmp_path, sink_table(schema)) as soft,
        sink(tmp_path, sink_table(schema, "hard", deletes="hard"), "h") as hard,
    ):
        for s in (soft, hard):
            assert await s.deliver_batch([invoice(1, 5), invoice(2, 5)]) == [None, None]
            # An old delete does not remove a newer row; a newer one does.
            assert await s.deliver_batch(
                [invoice(1, 3, typ="invoice.deleted"), invoice(2, 6, typ="invoice.deleted")]
            ) == [None, None]
        # After a soft delete, an older update is refused and a newer one brings the row back.
        assert await soft.deliver_batch([invoice(2, 4)]) == [None]
        assert (await rows(schema))[1]["deleted_at"] is not None
        assert await soft.deliver_batch([invoice(2, 7)]) == [None]
    soft_rows = await rows(schema)
    assert [(r["id"], r["deleted_at"] is None, r["etl_version"][-3:]) for r in soft_rows] == [
        ("1", True, "05Z"),
        ("2", True, "07Z"),
    ]
    assert [r["id"] for r in await rows(schema, "hard")] == ["1"]


async def test_a_connection_killed_mid_batch_is_retried_and_nothing_is_doubled(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(INVOICES)
    # An audit trigger counts every write that committed; another kills the session on the Nth row of
    # the first two attempts (a sequence, because it survives the rollback the kill causes).
    await schema.execute(
        f"""
        CREATE TABLE writes (id text, version text);
        CREATE SEQUENCE kills;
        CREATE FUNCTION {schema.name}.audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO {schema.name}.writes VALUES (NEW.id, NEW.etl_version); RETURN NEW; END $$;
        CREATE FUNCTION {schema.name}.kill() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.id = '50' AND nextval('{schema.name}.kills') <= 2 THEN
            PERFORM pg_terminate_backend(pg_backend_pid());
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER audit AFTER INSERT OR UPDATE ON invoices FOR EACH ROW EXECUTE FUNCTION {schema.name}.audit();
        CREATE TRIGGER kill BEFORE INSERT OR UPDATE ON invoices FOR EACH ROW EXECUTE FUNCTION {schema.name}.kill();
        """
    )
    events = [invoice(n, 1) for n in range(100)]
    async with sink(tmp_path, sink_table(schema, copy_min_rows=10)) as s:
        first = await s.deliver_batch(events)  # killed, retried at once on a new connection, killed again
        assert all(isinstance(r, RetryableError) for r in first)
        assert await schema.fetchval("SELECT count(*) FROM invoices") == 0
        assert await s.deliver_batch(events) == [None] * 100  # the dispatcher's retry
        assert await s.deliver_batch(events) == [None] * 100  # a redelivery after a lost ack: no change
    # Row 50 was reached by all four attempts (BEFORE INSERT fires before ON CONFLICT); the test's own call is the 5th.
    assert await schema.fetchval("SELECT nextval('kills')") == 5
    assert await schema.fetchval("SELECT count(*) FROM invoices") == 100
    assert await schema.fetchval("SELECT count(*) FROM writes") == 100  # each row written once


async def test_schema_mismatch_is_reported_precisely_at_startup(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(
        "CREATE TABLE invoices (id text, customer int, etl_loaded_at text, etl_source text, etl_version text)"
    )
    with pytest.raises(ConfigError) as e:
        async with sink(tmp_path, sink_table(schema)):
            pass
    table = f"{schema.name}.invoices"
    assert e.value.problems == [
        f'sinks.warehouse.columns.amount: column "amount" does not exist in table {table}',
        f'sinks.warehouse.columns.due: column "due" does not exist in table {table}',
        f"sinks.warehouse.metadata.loaded_at: column etl_loaded_at of {table} is text; expected timestamptz or timestamp",
        f'sinks.warehouse.metadata.event_id: column "etl_event_id" does not exist in table {table}',
        f'sinks.warehouse.deleted_at: column "deleted_at" does not exist in table {table}',
        f"sinks.warehouse.key: {table} has no primary key or unique index on exactly (id); ON CONFLICT needs one",
    ]


async def test_a_missing_table_says_how_to_get_its_create_table(schema: Schema, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        async with sink(tmp_path, sink_table(schema, "nowhere")):
            pass
    assert e.value.problems == [
        "sinks.warehouse.table: table nowhere does not exist "
        "(`integrand postgres schema warehouse` prints a CREATE TABLE for it)"
    ]


async def test_the_create_table_it_prints_is_what_it_needs(schema: Schema, tmp_path: Path) -> None:
    from integrand_postgres.sink import Plan, PostgresSinkConfig

    from integrand.testing import validate_config

    cfg = validate_config(PostgresSink, sink_table(schema), base_dir=tmp_path, role="sink")
    assert isinstance(cfg, PostgresSinkConfig)
    ddl = Plan(cfg, "sinks.warehouse").create_table()
    await schema.execute(ddl)
    async with sink(tmp_path, sink_table(schema)) as s:
        assert await s.deliver_batch([invoice(1, 1, 7.25)]) == [None]
    assert str((await rows(schema))[0]["amount"]) == "7.25"


async def test_a_read_only_database_is_a_permanent_error_with_the_way_out(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(INVOICES)
    ro = schema.dsn_with(default_transaction_read_only="on")
    async with sink(tmp_path, {**sink_table(schema), "dsn": ro}) as s:
        res = await s.deliver_batch([invoice(1, 1)])
    assert isinstance(res[0], PermanentError)
    assert "read-only" in str(res[0]) and "25006" in str(res[0]) and "target_session_attrs" in str(res[0])


async def test_missing_privileges_are_named_at_startup(schema: Schema, tmp_path: Path) -> None:
    await schema.execute(INVOICES)
    role = f"{schema.name}_reader"
    await schema.execute(
        f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {schema.name} TO {role}; GRANT SELECT ON invoices TO {role}"
    )
    try:
        dsn = schema.dsn.replace("postgres@", f"{role}@", 1)
        with pytest.raises(ConfigError) as e:
            async with sink(tmp_path, {**sink_table(schema), "dsn": dsn}):
                pass
        assert e.value.problems == [f"sinks.warehouse.dsn: the role lacks INSERT, UPDATE on {schema.name}.invoices"]
    finally:
        await schema.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_an_unreachable_server_at_startup_is_an_outage_not_a_crash(tmp_path: Path) -> None:
    table = {
        "dsn": "postgresql://postgres@127.0.0.1:1/x",
        "table": "t",
        "key": "id",
        "columns": {"id": "entity_id"},
        "connect_timeout": 2,
    }
    async with sink(tmp_path, table) as s:
        res = await s.deliver_batch([invoice(1, 1)])
    assert isinstance(res[0], RetryableError) and "connection to PostgreSQL failed" in str(res[0])


def test_config_errors_name_their_keys(tmp_path: Path) -> None:
    from integrand.testing import validate_config

    with pytest.raises(ConfigError) as e:
        validate_config(
            PostgresSink,
            {"dsn": {"env": "NO_SUCH_VAR_PG"}, "table": "a.b.c", "key": ["nope"], "columns": {"id": "entity_id"}},
            base_dir=tmp_path,
            role="sink",
        )
    text = "\n".join(e.value.problems)
    assert "sinks.contract.dsn: environment variable NO_SUCH_VAR_PG is not set" in text
    assert "sinks.contract.table: expected 'table' or 'schema.table'" in text


def test_the_schema_command_prints_the_create_table(tmp_path: Path) -> None:
    from pg_support import cli

    from integrand.testing import daemon_config

    cfg = daemon_config(
        tmp_path,
        """
[sinks.warehouse]
connector = "postgres"
dsn = "postgresql://nowhere.invalid/x"
table = "sales.invoices"
key = "id"
column_types = { amount = "numeric(12,2)" }
[sinks.warehouse.columns]
id = "entity_id"
amount = { path = "data.TotalAmt", convert = "number" }
due = { path = "data.DueDate", convert = "date" }
""",
    )
    done = cli(cfg, "postgres", "schema", "warehouse")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "-- what sinks.warehouse writes",
        'CREATE TABLE "sales"."invoices" (',
        '    "id"            text NOT NULL,',
        '    "amount"        numeric(12,2),',
        '    "due"           date,',
        '    "etl_source"    text,',
        '    "etl_version"   text,',
        '    "etl_event_id"  text,',
        '    "etl_loaded_at" timestamptz NOT NULL DEFAULT now(),',
        '    "deleted_at"    timestamptz,',
        '    PRIMARY KEY ("id")',
        ");",
    ]
    wrong = cli(cfg, "postgres", "schema", "nope")
    assert wrong.returncode == 1 and wrong.stderr.strip() == f"error: no sink named 'nope' in {cfg}"


async def test_tls_required_against_a_server_without_it_is_refused_not_downgraded(
    schema: Schema, tmp_path: Path
) -> None:
    await schema.execute(INVOICES)
    async with sink(tmp_path, sink_table(schema, ssl="require")) as s:
        res = await s.deliver_batch([invoice(1, 1)])
    assert isinstance(res[0], RetryableError) and "SSL" in str(res[0])
    assert await schema.fetchval("SELECT count(*) FROM invoices") == 0
