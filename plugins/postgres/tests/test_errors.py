"""How driver errors are sorted: outages retry, a read-only database or a missing privilege is permanent
with the way out, refused credentials pause the sink, and which errors send a batch into bisection."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from integrand_postgres.pg import classify, is_connection_error, is_row_error

from integrand.connector import AuthError, PermanentError, RetryableError


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
    ],
)
def test_outages_and_failover_are_retryable(error: Exception) -> None:
    assert isinstance(classify(error, "writing"), RetryableError)
    assert is_connection_error(error) and not is_row_error(error)


def test_a_read_only_database_is_permanent_and_says_what_to_do() -> None:
    e = classify(asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"), "writing")
    assert isinstance(e, PermanentError)
    assert "read-only" in str(e) and "target_session_attrs=read-write" in str(e)


def test_permission_denied_is_permanent_and_names_the_grant() -> None:
    e = classify(asyncpg.InsufficientPrivilegeError("permission denied for table invoices"), "writing")
    assert isinstance(e, PermanentError) and "GRANT" in str(e)


def test_refused_credentials_are_an_auth_error() -> None:
    assert isinstance(classify(asyncpg.InvalidPasswordError("password authentication failed"), "connecting"), AuthError)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.CheckViolationError("violates check constraint"),
        asyncpg.NotNullViolationError("null value in column"),
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.InvalidTextRepresentationError("invalid input syntax"),
        asyncpg.NumericValueOutOfRangeError("numeric field overflow"),
    ],
)
def test_a_refused_row_is_found_by_bisection(error: Exception) -> None:
    assert is_row_error(error) and not is_connection_error(error)


def test_tls_options_reach_the_driver(tmp_path: Path) -> None:
    import ssl
    import subprocess

    from integrand_postgres.pg import ConnectionConfig, connect_kwargs

    def kw(**table: object) -> dict[str, object]:
        cfg = ConnectionConfig.model_validate({"dsn": "postgresql://db.example/x", **table})
        return connect_kwargs(cfg, tmp_path, "t")

    assert "ssl" not in kw()  # the DSN's sslmode decides
    assert kw(ssl="require")["ssl"] == "require"
    req = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=test-ca", "-days", "1"]
    subprocess.run(
        [*req, "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.pem")],
        check=True,
        capture_output=True,
    )
    ctx = kw(ssl="verify-full", ssl_root_cert="ca.pem")["ssl"]  # relative to the config's folder
    assert isinstance(ctx, ssl.SSLContext) and ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    ctx = kw(ssl="verify-ca", ssl_root_cert="ca.pem")["ssl"]
    assert isinstance(ctx, ssl.SSLContext) and not ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert kw(statement_timeout="5s")["server_settings"] == {"application_name": "t", "statement_timeout": "5000"}
