"""Salesforce's date-time shapes: records carry ``2026-12-07T10:00:00.000+0000``, SOQL takes ``…Z`` literals."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_time(value: str) -> datetime:
    """A Salesforce date-time (``+0000``, ``+00:00`` or ``Z``; with or without milliseconds), as aware UTC."""
    s = value.strip()
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    elif len(s) > 5 and s[-5] in "+-" and s[-4:].isdigit():
        s = s[:-2] + ":" + s[-2:]
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def record_time(dt: datetime) -> str:
    """How Salesforce writes a date-time in a record (``SystemModstamp``, ``deletedDate``)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}+0000"


def soql_time(dt: datetime) -> str:
    """A SOQL date-time literal (unquoted in a WHERE clause)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_of(dt: datetime) -> str:
    """The entity version integrand compares: sortable ISO-8601 UTC with milliseconds."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
