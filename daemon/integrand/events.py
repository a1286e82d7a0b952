"""The Event envelope every source produces and every sink receives, and its stable ids."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

_second: tuple[int, str] = (0, "")


def utcnow_iso() -> str:
    """Now as ISO-8601 UTC with microseconds: sortable and unambiguous (the date part is formatted once a second)."""
    global _second
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((now - whole) * 1_000_000):06d}Z"


def content_id(*parts: str | bytes) -> str:
    """A stable id from content, for deliveries whose provider gives none."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\x00")
    return "h_" + h.hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class Event:
    """One change in a source system; ``id`` is unique within ``source`` and is the idempotency key."""

    id: str
    source: str
    type: str
    data: Any
    received_at: str = field(default_factory=utcnow_iso)
    entity: str | None = None
    entity_id: str | None = None
    version: str | None = None
    occurred_at: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Globally unique idempotency key handed to sinks (``source:id``)."""
        return f"{self.source}:{self.id}"

    @property
    def entity_key(self) -> str:
        """What per-entity ordering groups by (within a source); events without an entity are unordered."""
        if self.entity_id is None:
            return f"{self.source}/event:{self.id}"
        return f"{self.source}/{self.entity or ''}:{self.entity_id}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        """The same bytes as ``orjson.dumps(self.to_dict())``, without asdict's deep copy (hot path: every enqueue)."""
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        return cls(**orjson.loads(raw))
