"""Retry timing as pure functions, so tests drive them with fixed numbers instead of clocks."""

from __future__ import annotations


def retry_delay(attempt: int, *, base: float, cap: float, rand: float, retry_after: float | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Full jitter (uniform in [0, min(cap, base·2^(attempt-1))]) spreads a crowd of
    retries out; a provider's ``Retry-After`` is a floor we never undercut.
    """
    exp = min(max(attempt - 1, 0), 62)
    delay = rand * min(cap, base * float(2**exp))
    if retry_after is not None and retry_after > delay:
        return retry_after
    return delay


def should_give_up(attempts: int, age: float, *, max_attempts: int, max_age: float) -> bool:
    """Dead-letter once the attempts are spent or the delivery has been failing for too long."""
    return attempts >= max_attempts or age >= max_age


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)
