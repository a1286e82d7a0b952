"""Connecting to PostgreSQL (DSN by secret reference, pool, TLS, timeouts) and sorting its errors by what to do next."""

from __future__ import annotations

import ssl as ssl_module
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import asyncpg
import orjson
from pydantic import Field, model_validator

from integrand.connector import AuthError, ConnectorConfig, Duration, PermanentError, RetryableError, SecretValue

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class ConnectionConfig(ConnectorConfig):
    """Keys shared by the sink and the source: where the server is and how to talk to it."""

    # A libpq URI or key=value string; by reference ({env = "…"}, {file = "…"}) since it may hold a password.
    dsn: SecretValue
    pool_min: int = Field(default=1, ge=0, le=100)
    pool_max: int = Field(default=4, ge=1, le=100)
    connect_timeout: Duration = 10.0
    # Server-side limit on any one statement (SET statement_timeout for every session); 0 = none.
    statement_timeout: Duration = 30.0
    # Overrides sslmode in the DSN; verify-ca / verify-full check the server against ssl_root_cert.
    ssl: SslMode | None = None
    ssl_root_cert: Path | None = None
    ssl_cert: Path | None = None
    ssl_key: Path | None = None

    @model_validator(mode="after")
    def _pool(self) -> ConnectionConfig:
        if self.pool_min > self.pool_max:
            raise ValueError("pool_min must not exceed pool_max")
        if (self.ssl_cert is None) != (self.ssl_key is None):
            raise ValueError("ssl_cert and ssl_key go together")
        return self


def _ssl_arg(cfg: ConnectionConfig, base_dir: Path) -> Any:
    """What asyncpg's ``ssl=`` takes: None (the DSN decides), a mode name, or a context for verification."""
    if cfg.ssl is None and cfg.ssl_root_cert is None and cfg.ssl_cert is None:
        return None

    def at(p: Path) -> str:
        return str(p if p.is_absolute() else base_dir / p)

    mode = cfg.ssl or "verify-full"
    if mode in ("disable", "allow", "prefer", "require") and cfg.ssl_cert is None:
        return mode
    ctx = ssl_module.create_default_context(cafile=at(cfg.ssl_root_cert) if cfg.ssl_root_cert else None)
    if mode != "verify-full":
        ctx.check_hostname = False
    if mode in ("disable", "allow", "prefer", "require"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl_module.CERT_NONE
    if cfg.ssl_cert is not None and cfg.ssl_key is not None:
        ctx.load_cert_chain(at(cfg.ssl_cert), at(cfg.ssl_key))
    return ctx


def connect_kwargs(cfg: ConnectionConfig, base_dir: Path, application_name: str) -> dict[str, Any]:
    settings = {"application_name": application_name[:63]}
    if cfg.statement_timeout > 0:
        settings["statement_timeout"] = str(int(cfg.statement_timeout * 1000))
    kw: dict[str, Any] = {
        "dsn": cfg.dsn.reveal(),
        "timeout": cfg.connect_timeout,
        "server_settings": settings,
        # The sink's statements differ per configured table, not per call: a small cache is enough.
        "statement_cache_size": 256,
    }
    ssl_arg = _ssl_arg(cfg, base_dir)
    if ssl_arg is not None:
        kw["ssl"] = ssl_arg
    return kw


async def init_connection(con: asyncpg.Connection) -> None:
    """JSON columns take and give Python values, encoded with orjson (asyncpg's default wants strings)."""
    for typ in ("json", "jsonb"):
        await con.set_type_codec(
            typ,
            schema="pg_catalog",
            encoder=lambda v: v if isinstance(v, str) else orjson.dumps(v).decode(),
            decoder=orjson.loads,
            format="text",
        )


async def connect(cfg: ConnectionConfig, base_dir: Path, application_name: str) -> asyncpg.Connection:
    try:
        con: asyncpg.Connection = await asyncpg.connect(**connect_kwargs(cfg, base_dir, application_name))
    except Exception as e:
        raise classify(e, "connecting") from e
    await init_connection(con)
    return con


async def _no_reset(con: asyncpg.Connection) -> None:
    """Nothing to undo between uses: integrand's code leaves no LISTEN, cursor, lock or SET behind (asyncpg still
    ends an open transaction itself), so the default reset's round trip per release (RESET ALL, …) is saved."""


async def create_pool(
    cfg: ConnectionConfig,
    base_dir: Path,
    application_name: str,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    connection_class: type[asyncpg.Connection] = asyncpg.Connection,
) -> asyncpg.Pool:
    async def setup(con: asyncpg.Connection) -> None:
        await init_connection(con)
        if init is not None:
            await init(con)

    kw = connect_kwargs(cfg, base_dir, application_name)
    try:
        pool = await asyncpg.create_pool(
            min_size=cfg.pool_min,
            max_size=cfg.pool_max,
            init=setup,
            reset=_no_reset,
            connection_class=connection_class,
            **kw,
        )
    except Exception as e:
        raise classify(e, "connecting") from e
    assert pool is not None
    return pool


# --- errors ----------------------------------------------------------------------------------------

# SQLSTATE classes: 08 connection exception, 53 insufficient resources (too many connections, disk
# full, out of memory), 57 operator intervention (admin shutdown = pg_terminate_backend, crash
# shutdown, cannot connect now = a server starting or failing over, query canceled = statement
# timeout), 40 transaction rollback (serialization failure, deadlock), 58 system error (I/O).
_RETRYABLE_CLASSES = ("08", "53", "57", "40", "58", "XX")
# A row whose data or constraints the database refuses: 22 data exception, 23 integrity constraint.
ROW_CLASSES = ("22", "23")
READ_ONLY = "25006"
NO_PRIVILEGE = "42501"


def describe(e: asyncpg.PostgresError) -> str:
    """PostgreSQL's own message with what it names: constraint, column, table, detail."""
    parts = [f"{e.sqlstate}: {e}"]
    for label, attr in (
        ("constraint", "constraint_name"),
        ("column", "column_name"),
        ("table", "table_name"),
        ("detail", "detail"),
        ("hint", "hint"),
    ):
        v = getattr(e, attr, None)
        if v:
            parts.append(f"{label} {v}")
    return "; ".join(parts)


def is_row_error(e: BaseException) -> bool:
    """The database refused one row's data (a bad value, a constraint): bisect to find it."""
    return isinstance(e, asyncpg.PostgresError) and str(e.sqlstate or "")[:2] in ROW_CLASSES


def is_connection_error(e: BaseException) -> bool:
    if isinstance(e, asyncpg.PostgresError):
        return str(e.sqlstate or "")[:2] in _RETRYABLE_CLASSES
    return isinstance(e, OSError | ConnectionError | TimeoutError | asyncpg.InterfaceError)


def classify(e: BaseException, doing: str) -> Exception:
    """The integrand error for a driver error: retry (outage), or give up with a message a human can act on."""
    if isinstance(e, RetryableError | PermanentError | AuthError):
        return e
    if isinstance(e, asyncpg.PostgresError):
        state = str(e.sqlstate or "")
        if state == READ_ONLY:
            return PermanentError(
                f"{doing}: the database is read-only ({describe(e)}); point the DSN at the primary "
                "(target_session_attrs=read-write) or lift default_transaction_read_only"
            )
        if state == NO_PRIVILEGE:
            return PermanentError(f"{doing}: permission denied ({describe(e)}); GRANT the privilege to the DSN's role")
        if state == "28P01" or state == "28000":
            return AuthError(f"{doing}: the server refused the credentials ({describe(e)})")
        if state[:2] in _RETRYABLE_CLASSES:
            return RetryableError(f"{doing}: {describe(e)}")
        return PermanentError(f"{doing}: {describe(e)}")
    if isinstance(e, OSError | ConnectionError | TimeoutError | asyncpg.InterfaceError):
        return RetryableError(f"{doing}: connection to PostgreSQL failed: {type(e).__name__}: {e}")
    return RetryableError(f"{doing}: {type(e).__name__}: {e}")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def split_table(name: str) -> tuple[str | None, str]:
    """``schema.table``, or ``table`` (found on the search_path) — as written, case kept (quoted identifiers)."""
    schema, _, table = name.rpartition(".")
    return (schema or None, table)


def qualified(name: str) -> str:
    schema, table = split_table(name)
    return f"{quote_ident(schema)}.{quote_ident(table)}" if schema else quote_ident(table)
