"""What the store's operations take and give back: plain records, the same for every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from ..errors import PermanentError
from ..events import Event


class EnqueueResult(NamedTuple):
    """What an enqueue stored; ``stale`` counts changes the entity table shows as older or already seen.

    A NamedTuple rather than a frozen dataclass: one is built per webhook, and a tuple is built in C."""

    accepted: int
    duplicates: int
    stale: int = 0


@dataclass(frozen=True, slots=True)
class CursorRow:
    source: str
    kind: str
    value: Any
    updated_at: float


class Leased(NamedTuple):
    """A delivery leased to this process: deliver it, then report an Outcome.

    A NamedTuple, like ``Outcome``: a lease builds one per delivery (thousands per batch), and a
    tuple is built in C, a frozen dataclass field by field."""

    id: int
    event_row: int
    sink: str
    attempts: int
    created_at: float
    event: Event
    token: str = ""  # the lease's fencing token: complete() ignores an outcome whose lease is no longer held


class Outcome(NamedTuple):
    """What became of a leased delivery.

    ``done`` delivered; ``retry`` try again at ``next_attempt_at`` (``count_attempt``
    False when the failure was not the delivery's fault, e.g. a breaker probe);
    ``dead`` dead-lettered; ``release`` handed back untouched (shutdown).
    """

    delivery: Leased
    kind: Literal["done", "retry", "dead", "release"]
    error: str | None = None
    next_attempt_at: float | None = None
    count_attempt: bool = True


class UnstorableEvent(PermanentError):
    """An event the store cannot hold (its data is not JSON-serialisable): a connector bug, refused alone."""


@dataclass(frozen=True, slots=True)
class EntityVersion:
    """The last change integrand stored for one entity of a source."""

    version: str | None
    hash: str
    deleted: bool
    event_id: str
    seen_at: float


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """How many dead deliveries were made ready, and which were left dead as superseded."""

    replayed: int
    superseded: list[int]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    event_id: str
    source: str
    sink: str
    attempts: int
    updated_at: float
    last_error: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float
    delivery: int | None
    action: str
    detail: str | None


@dataclass(frozen=True, slots=True)
class DeliveryDetail:
    id: int
    sink: str
    state: str
    attempts: int
    created_at: float
    updated_at: float
    next_attempt_at: float
    last_error: str | None
    event: Event
    audit: list[AuditEntry]


@dataclass(frozen=True, slots=True)
class Rejection:
    at: float
    source: str
    status: int
    reason: str
    remote: str | None
    headers: dict[str, str]
