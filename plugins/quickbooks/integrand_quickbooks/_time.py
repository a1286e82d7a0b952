"""QuickBooks time formats: reading every form Intuit sends, writing versions and API bodies."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_time(value: str) -> datetime:
    """QuickBooks timestamps come as ``2015-10-05T14:42:19-0700``, ``…-08:00`` or CloudEvents' nanosecond ``…Z``."""
    v = value.strip()
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    # Python's parser takes at most microseconds; CloudEvents times carry nanoseconds.
    if "." in v:
        head, _, rest = v.partition(".")
        digits = ""
        for ch in rest:
            if not ch.isdigit():
                break
            digits += ch
        v = head + "." + digits[:6].ljust(6, "0") + rest[len(digits) :]
    dt = datetime.fromisoformat(v)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def utc_version(value: str) -> str:
    """A sortable UTC version string (``2015-10-05T21:42:19Z``) from any QuickBooks timestamp."""
    # Whole seconds, always: QuickBooks keeps LastUpdatedTime to the second, and one format keeps
    # versions comparable as strings (integrand's entity table compares them that way).
    return parse_time(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def qbo_time(dt: datetime, offset_hours: int = -8) -> str:
    """Format as QuickBooks does in API bodies: seconds and the company's UTC offset (``-08:00``)."""
    from datetime import timedelta, timezone

    tz = timezone(timedelta(hours=offset_hours))
    return dt.astimezone(tz).isoformat(timespec="seconds")
