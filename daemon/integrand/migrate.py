"""``integrand migrate --from sqlite:PATH --to postgres:DSN``: a single node's store moved to PostgreSQL.

Everything the SQLite store holds is copied, rows and ids as they are, in one PostgreSQL transaction:
events, every delivery (ready, in backoff, dead-lettered; leased ones become ready, since their node
is stopped), the audit trail, refused webhooks, cursors and resume positions, the entity ledger
(delete markers included) and connector state (encrypted tokens are copied as the ciphertext they
are, so the same ``token_key`` reads them). The copy commits only if each table's row count in
PostgreSQL then equals SQLite's; otherwise nothing is left behind. The SQLite store is held with
the daemon's own writer lock throughout, so no daemon can run on it meanwhile, and it is not
changed: it stays a backup. The DSN is given by reference (``postgres:env:NAME``…) and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from .errors import StoreUnavailable

BATCH = 5000  # rows per COPY


@dataclass(frozen=True)
class Table:
    """How one table is read from SQLite and written to PostgreSQL."""

    name: str
    select: str  # SQLite, in id (or key) order
    columns: tuple[str, ...]  # PostgreSQL's, in the order ``convert`` returns
    convert: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    serial: bool = False  # has a BIGSERIAL id whose sequence must continue after the copied rows


def _blob(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


def _flag(v: Any) -> bool | None:
    """SQLite's 1/NULL markers (``active``, ``head``) as PostgreSQL's true/NULL."""
    return True if v else None


def _event(r: tuple[Any, ...]) -> tuple[Any, ...]:
    return (r[0], r[1], r[2], r[3], r[4], float(r[5]), _blob(r[6]), r[7])


def _delivery(r: tuple[Any, ...]) -> tuple[Any, ...]:
    (
        id_,
        event,
        sink,
        key,
        state,
        attempts,
        created,
        due,
        updated,
        lease_until,
        owner,
        error,
        active,
        head,
        ordered,
    ) = r
    if state == "leased":  # its node is stopped: the delivery is ready again, its attempt not counted
        state, lease_until, owner = "ready", None, None
    return (
        id_,
        event,
        sink,
        key,
        bool(ordered),
        state,
        attempts,
        float(created),
        float(due),
        float(updated),
        _f(lease_until),
        owner,
        error,
        _flag(active),
        _flag(head),
    )


TABLES: tuple[Table, ...] = (
    Table(
        "events",
        "SELECT id, source, event_id, type, entity_key, received_at, body, request_id FROM events ORDER BY id",
        ("id", "source", "event_id", "type", "entity_key", "received_at", "body", "request_id"),
        _event,
        serial=True,
    ),
    Table(
        "deliveries",
        # `ordered` (PostgreSQL only) marks deliveries of events with an entity: what Event.entity_id says.
        "SELECT d.id, d.event, d.sink, d.entity_key, d.state, d.attempts, d.created_at, d.next_attempt_at, "
        "d.updated_at, d.lease_until, d.lease_owner, d.last_error, d.active, d.head, "
        "CASE WHEN e.id IS NULL THEN d.entity_key NOT LIKE '%/event:%' "
        "ELSE json_extract(CAST(e.body AS TEXT), '$.entity_id') IS NOT NULL END "
        "FROM deliveries d LEFT JOIN events e ON e.id = d.event ORDER BY d.id",
        (
            "id",
            "event",
            "sink",
            "entity_key",
            "ordered",
            "state",
            "attempts",
            "created_at",
            "next_attempt_at",
            "updated_at",
            "lease_until",
            "lease_owner",
            "last_error",
            "active",
            "head",
        ),
        _delivery,
        serial=True,
    ),
    Table(
        "audit",
        "SELECT id, at, event, delivery, action, detail FROM audit ORDER BY id",
        ("id", "at", "event", "delivery", "action", "detail"),
        lambda r: (r[0], float(r[1]), r[2], r[3], r[4], r[5]),
        serial=True,
    ),
    Table(
        "rejections",
        "SELECT id, at, source, status, reason, remote, headers FROM rejections ORDER BY id",
        ("id", "at", "source", "status", "reason", "remote", "headers"),
        lambda r: (r[0], float(r[1]), r[2], r[3], r[4], r[5], r[6]),
        serial=True,
    ),
    Table(
        "cursors",
        "SELECT source, kind, value, updated_at FROM cursors ORDER BY source, kind",
        ("source", "kind", "value", "updated_at"),
        lambda r: (r[0], r[1], _blob(r[2]), float(r[3])),
    ),
    Table(
        "entity_versions",
        "SELECT source, entity, entity_id, version, hash, deleted, event_id, seen_at FROM entity_versions "
        "ORDER BY source, entity, entity_id",
        ("source", "entity", "entity_id", "version", "hash", "deleted", "event_id", "seen_at"),
        lambda r: (r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], float(r[7])),
    ),
    Table(
        "state",
        "SELECT scope, key, value, updated_at FROM state ORDER BY scope, key",
        ("scope", "key", "value", "updated_at"),
        lambda r: (r[0], r[1], _blob(r[2]), float(r[3])),
    ),
)
TABLE_NAMES = tuple(t.name for t in TABLES)
# SQLite's delivery_counts (kept by triggers) has no PostgreSQL twin: PostgreSQL counts deliveries itself.


class MigrateError(Exception):
    """Why nothing was migrated (one line for the operator)."""


@dataclass
class Report:
    """Rows per table as copied (and then counted in PostgreSQL), and what was changed on the way."""

    rows: dict[str, int]
    leases_reset: int
    deliveries: dict[str, int]  # by state as stored in PostgreSQL
    target: str


# --- the command's arguments ---------------------------------------------------------------------------


def parse_from(spec: str) -> Path:
    kind, sep, rest = spec.partition(":")
    if kind != "sqlite" or not sep or not rest:
        raise MigrateError(f"--from must be sqlite:PATH (the single node's store file), got {spec!r}")
    if not Path(rest).is_file():
        raise MigrateError(f"no SQLite store at {rest}")
    return Path(rest)


def parse_to(spec: str) -> str:
    """The DSN from ``postgres:env:NAME``, ``postgres:file:PATH``, ``postgres:credential:NAME`` or
    ``postgres:postgresql://…`` (which other users on this machine can see in the process list)."""
    from pydantic_core import PydanticCustomError

    from .secrets import resolve_secret

    kind, sep, rest = spec.partition(":")
    if kind != "postgres" or not sep or not rest:
        raise MigrateError(
            "--to must be postgres:env:NAME, postgres:file:PATH, postgres:credential:NAME or postgres:postgresql://…"
        )
    if rest.startswith(("postgresql://", "postgres://")):
        return rest
    ref, _, name = rest.partition(":")
    if ref not in ("env", "file", "credential") or not name:
        raise MigrateError(
            f"--to postgres:{ref}…: give the DSN by reference (env:NAME, file:PATH, credential:NAME) or as a "
            "postgresql:// URL"
        )
    try:
        dsn = resolve_secret({ref: name}, Path.cwd()).reveal()
    except PydanticCustomError as e:
        raise MigrateError(f"--to: {e}") from None
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise MigrateError(f"--to: expected a postgresql:// URL in {ref}:{name}")
    return dsn


# --- the copy --------------------------------------------------------------------------------------------


def _batches(conn: sqlite3.Connection, table: Table) -> Iterator[list[tuple[Any, ...]]]:
    cur = conn.execute(table.select)
    while rows := cur.fetchmany(BATCH):
        yield [table.convert(tuple(r)) for r in rows]


async def _target_counts(pg: asyncpg.Connection[asyncpg.Record]) -> dict[str, int]:
    return {t: int(await pg.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLE_NAMES}  # noqa: S608 - fixed names


async def migrate(source: Path, dsn: str, *, replace: bool = False, out: Callable[[str], None] = print) -> Report:
    """Copy the SQLite store at ``source`` into the PostgreSQL store at ``dsn``; see the module docstring."""
    from .store import Store
    from .store.engine import StoreLocked
    from .store.postgres import _CONNECT_ERRORS, PgStore, _display

    target = _display(dsn)
    # The daemon's own writer lock: a running daemon (or a CLI command writing) is refused, and none can
    # start on this file until the copy is over. Opening it also brings an older file to the current schema.
    lite = Store(source, role="writer")
    try:
        await lite.open()
    except StoreLocked:
        raise MigrateError(
            f"a daemon is running on {source} (it holds {source}.lock): stop it first, so that nothing is "
            "accepted there after the copy; nothing was migrated"
        ) from None
    except StoreUnavailable as e:
        raise MigrateError(str(e)) from None
    try:
        ro = sqlite3.connect(f"file:{urllib.parse.quote(str(source))}?mode=ro", uri=True, isolation_level=None)
        try:
            ro.execute("BEGIN")  # one snapshot for every table
            return await _copy(ro, source, dsn, target, replace, out, PgStore, _CONNECT_ERRORS)
        finally:
            ro.close()
    finally:
        await lite.close()


async def _copy(
    ro: sqlite3.Connection,
    source: Path,
    dsn: str,
    target: str,
    replace: bool,
    out: Callable[[str], None],
    pg_store: Any,
    connect_errors: tuple[type[BaseException], ...],
) -> Report:
    expected = {t.name: int(ro.execute(f"SELECT count(*) FROM {t.name}").fetchone()[0]) for t in TABLES}  # noqa: S608
    leased = int(ro.execute("SELECT count(*) FROM deliveries WHERE state = 'leased'").fetchone()[0])
    try:
        schema = pg_store(dsn, role="client", pool_size=1)  # creates (or checks) the store's schema
        await schema.open()
        await schema.close()
        pg = await asyncpg.connect(dsn, timeout=10)
    except StoreUnavailable as e:
        raise MigrateError(f"{target}: {e}") from None
    except connect_errors as e:
        raise MigrateError(f"cannot reach the PostgreSQL store {target}: {type(e).__name__}: {e}") from None
    try:
        async with pg.transaction():
            # Nodes starting meanwhile wait for this transaction before they migrate or use the schema.
            await pg.execute("LOCK TABLE events, deliveries IN EXCLUSIVE MODE")
            present = await _target_counts(pg)
            if any(present.values()):
                held = ", ".join(f"{t} {n}" for t, n in present.items() if n)
                if not replace:
                    raise MigrateError(
                        f"the PostgreSQL store {target} is not empty ({held}); migrate into an empty one, or give "
                        "--replace to delete what it holds first (stop every node on it before)"
                    )
                out(f"--replace: deleting what {target} holds ({held})")
                await pg.execute(f"TRUNCATE {', '.join(TABLE_NAMES)} RESTART IDENTITY")
            out(f"copying {source} to {target}")
            for table in TABLES:
                for rows in _batches(ro, table):
                    await pg.copy_records_to_table(table.name, records=rows, columns=list(table.columns))
                if table.serial:
                    await pg.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "  # noqa: S608 - fixed names
                        f"coalesce((SELECT max(id) FROM {table.name}), 0) + 1, false)"
                    )
            copied = await _target_counts(pg)
            wrong = [f"{t}: {copied[t]} in PostgreSQL, {n} in SQLite" for t, n in expected.items() if copied[t] != n]
            if wrong:
                raise MigrateError("row counts differ after the copy, nothing was committed: " + "; ".join(wrong))
            states = {r[0]: int(r[1]) for r in await pg.fetch("SELECT state, count(*) FROM deliveries GROUP BY 1")}
        await pg.execute(f"ANALYZE {', '.join(TABLE_NAMES)}")
    except asyncpg.PostgresError as e:
        raise MigrateError(f"the copy into {target} failed and was rolled back: {type(e).__name__}: {e}") from None
    except connect_errors as e:
        raise MigrateError(f"lost the PostgreSQL store {target} during the copy (rolled back): {e}") from None
    finally:
        await pg.close()
    return Report(copied, leased, states, target)


def _print_report(r: Report, source: Path, out: Callable[[str], None]) -> None:
    width = max(len(t) for t in TABLE_NAMES)
    for t in TABLE_NAMES:
        line = f"  {t:<{width}} {r.rows[t]:>10,}"
        if t == "deliveries" and r.rows[t]:
            line += "  (" + ", ".join(f"{s} {n:,}" for s, n in sorted(r.deliveries.items())) + ")"
        out(line)
    if r.leases_reset:
        out(f"leased deliveries made ready again (their node is stopped): {r.leases_reset:,}")
    out(f"verified: every table's row count in {r.target} equals the SQLite store's; committed")
    out(
        f'next: set [store] backend = "postgres" and dsn in each node\'s config, then start them. Do not start a '
        f"daemon on {source} again: it would deliver what it holds a second time (keep it as a backup)"
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    try:
        dsn = parse_to(args.target)
        source = parse_from(args.source)
        report = asyncio.run(migrate(source, dsn, replace=args.replace))
    except MigrateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_report(report, source, print)
    return 0


def register(sub: Any, api: Any) -> None:
    """``integrand migrate`` (the core's own entry in the ``integrand.commands`` group)."""
    sp = sub.add_parser(
        "migrate",
        help="copy a stopped single node's SQLite store into an empty PostgreSQL store (nothing lost)",
        description="Copy every row of a SQLite store (events, deliveries in every state, DLQ, cursors, "
        "connector state, audit, refused webhooks) into a PostgreSQL store, in one transaction checked by "
        "row counts. The daemon on the SQLite store must be stopped; leased deliveries become ready.",
    )
    sp.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH", help="the SQLite store file")
    sp.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="postgres:DSN",
        help="postgres:env:NAME, postgres:file:PATH or postgres:credential:NAME (the DSN is never printed); "
        "postgres:postgresql://… also works but shows in the process list",
    )
    sp.add_argument(
        "--replace", action="store_true", help="delete what the PostgreSQL store holds first (every node stopped)"
    )
    sp.set_defaults(fn=cmd_migrate)
