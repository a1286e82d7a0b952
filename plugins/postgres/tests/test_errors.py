"""How driver errors are sorted: outages retry, a read-only database or a missing privilege is permanent
with the way out, refused credentials pause the sink, and which errors send a batch into bisection."""

from __future__ import annotations

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
