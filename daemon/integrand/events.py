"""The Event envelope every source produces and every sink receives, and its stable ids."""

from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

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


# --- versions ------------------------------------------------------------------------------------
#
# A version says which of two changes to one entity is newer. integrand orders two forms, and only
# within one form: a number (a counter, an epoch in any unit: "42", "1700000000123", "3.5") or an
# ISO-8601 time ("2026-01-02T03:04:05Z", "…05.5+01:00"; no offset means UTC). Each is compared in
# its canonical form (``canonical_version``): numbers by value, times as UTC instants to the
# microsecond, so "…00.5Z" is newer than "…00Z" and "+01:00" offsets order correctly. Anything
# else, or a version whose form differs from the entity's last one, is refused (``VersionError``)
# rather than misordered.

VersionForm = Literal["number", "time"]
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


class VersionError(ValueError):
    """A version integrand cannot order: neither a number nor an ISO-8601 time, or of another form."""


@functools.lru_cache(maxsize=4096)
def version_key(v: str) -> tuple[VersionForm, Decimal | str]:
    """The form of a version and what orders it (a Decimal, or a fixed-width UTC time string)."""
    s = v.strip()
    if _NUMBER.fullmatch(s):
        try:
            d = Decimal(s)
        except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
            raise VersionError(f"version {v!r} is not a number") from None
        if d.is_finite():
            return "number", d
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        raise VersionError(
            f"version {v!r} is neither a number nor an ISO-8601 time (see writing-connectors.md, Versions)"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return "time", t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_version(v: str) -> str:
    """A version in the one form integrand compares: a plain decimal number, or a UTC time with microseconds."""
    form, key = version_key(v)
    if form == "time":
        assert isinstance(key, str)
        return key
    assert isinstance(key, Decimal)
    if key == key.to_integral_value():
        return str(int(key))
    return format(key.normalize(), "f")


def version_newer(a: str, b: str) -> bool:
    """Whether version ``a`` is newer than ``b``; ``VersionError`` if either cannot be ordered or their forms differ."""
    fa, ka = version_key(a)
    fb, kb = version_key(b)
    if fa != fb:
        raise VersionError(f"version {a!r} is a {fa} but {b!r} is a {fb}: a source must give one form of version")
    return ka > kb  # type: ignore[operator]  # the same form: both Decimal or both str


def storage_problem(ev: Event) -> str | None:
    """Why the store would refuse ``ev`` (the checks it makes before queueing), or None: a streaming source
    rejects such a message itself, since a batch holding one can never commit (a poison batch)."""
    for name in ("id", "source", "type", "entity", "entity_id", "version"):
        text = getattr(ev, name)
        if text is not None and not isinstance(text, str):
            return f"its {name} is a {type(text).__name__}, not text"
        if text is not None and not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError:
                return f"its {name} is not valid UTF-8"
    if ev.entity_id is not None and ev.version is not None:
        try:
            version_key(ev.version)
        except VersionError as e:
            return str(e)
    try:
        ev.to_json()
    except TypeError as e:  # orjson.JSONEncodeError: nested deeper than orjson writes (254), integers past 64 bits
        return f"it is not JSON-serialisable ({e})"
    return None
