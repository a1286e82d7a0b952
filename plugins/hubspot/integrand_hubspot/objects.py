"""HubSpot CRM object conventions shared by the connector and the fake: timestamps and property names."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def to_ms(value: Any) -> int:
    """Filter values come as epoch milliseconds or ISO-8601 strings."""
    s = str(value)
    if s.isdigit():
        return int(s)
    return int(datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000)


def modified_property(object_type: str) -> str:
    """Contacts keep ``lastmodifieddate``; every other object ``hs_lastmodifieddate``."""
    return "lastmodifieddate" if object_type == "contacts" else "hs_lastmodifieddate"
