"""The plugin interface: the one module a connector author needs to read.

A connector is a class registered under the entry-point group
``integrand.connectors``. It subclasses :class:`Connector` and one or more
capability mixins:

* :class:`WebhookSource` — ``verify`` then ``parse`` an inbound HTTP request;
* :class:`PollingSource` — ``poll(cursor)`` for changes since a cursor;
* :class:`ReconcilingSource` — ``reconcile(since, cursor)``: the remote state changed
  since a time (or in full), a bounded page at a time, so missed changes can be found;
* :class:`Enricher` — ``fetch(event)``: turn a thin event ("customer 58 changed")
  into one carrying the record's current data, just before delivery;
* :class:`StreamingSource` — ``stream(position)``: a long-lived subscription (a broker queue,
  a replication slot, a replay log) that yields :class:`StreamBatch` es; integrand commits each
  batch's events with its resume position, then calls ``ack(batch)``;
* :class:`Sink` — ``deliver`` (and optionally ``deliver_batch``) events.

Every capability is optional; a connector has the ones whose class it subclasses.

Its configuration is a pydantic model (:class:`ConnectorConfig`) named
``Config`` on the class; integrand validates the connector's table against it at
startup and reports errors with their key paths. Connectors raise the errors in
:mod:`integrand.errors` (re-exported here): ``RetryableError(retry_after=…)``,
``PermanentError``, ``AuthError``; anything else is treated as retryable and logged
with its traceback.

The :class:`ConnectorContext` gives each instance its services: ``state`` (durable
key/value state in the store, for OAuth tokens and cursors — never files of its
own), ``http`` (the shared HTTP helper with per-account rate limits and redacted
logs, :class:`Http`), ``clock`` and a logger.
"""

from __future__ import annotations

import logging
import re
import string
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

import orjson

from .errors import (
    AuthError,
    PayloadError,
    PermanentError,
    PositionLost,
    RetryableError,
    SignatureError,
    UnsupportedMediaType,
    WebhookRejected,
)
from .events import Event, content_id, storage_problem, utcnow_iso
from .httpclient import Http, HttpPool, RateLimiter, Response, error_for_status
from .secrets import SecretList, SecretValue
from .types import Duration, ListenAddress, RelPath, StrictModel
from .waits import wait_event

__all__ = [
    "AuthError",
    "Connector",
    "ConnectorConfig",
    "ConnectorContext",
    "Duration",
    "Enricher",
    "Event",
    "EventTemplate",
    "Http",
    "HttpPool",
    "ListenAddress",
    "PayloadError",
    "PermanentError",
    "PollResult",
    "PollingSource",
    "PositionLost",
    "RateLimiter",
    "ReconcilePage",
    "ReconcilingSource",
    "Rejected",
    "RelPath",
    "Response",
    "RetryableError",
    "SecretList",
    "SecretValue",
    "SignatureError",
    "Sink",
    "StateStore",
    "StreamBatch",
    "StreamingSource",
    "UnsupportedMediaType",
    "WebhookOutcome",
    "WebhookRejected",
    "WebhookReply",
    "WebhookRequest",
    "WebhookSource",
    "content_id",
    "envelope_event",
    "error_for_status",
    "message_event",
    "storage_problem",
    "utcnow_iso",
    "wait_event",
]

Role = Literal["source", "sink"]


class ConnectorConfig(StrictModel):
    """Base for a connector's own config table (frozen; unknown keys are errors)."""


class StateStore(Protocol):
    """Durable key/value state owned by one configured connector (tokens, cursors), kept in the store."""

    async def get(self, key: str) -> Any:
        """The JSON value last set under ``key``, or None."""

    async def set(self, key: str, value: Any) -> None:
        """Store a JSON value durably (committed before this returns)."""


@dataclass(frozen=True)
class ConnectorContext:
    """What integrand hands a connector instance: who it is and the services it may use."""

    name: str
    role: Role
    base_dir: Path
    state: StateStore
    public_url: str | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("integrand.connector"))
    http: Http = field(default=None)  # type: ignore[assignment]  # filled in by __post_init__
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if self.http is None:
            # Outside the daemon (``integrand send``, a quick script) a private pool; the daemon passes its shared one.
            object.__setattr__(self, "http", HttpPool().for_connector(self.logger))


C = TypeVar("C", bound=ConnectorConfig)


class Connector(Generic[C]):
    """Base class of every connector; ``Config`` is its config model."""

    Config: ClassVar[type[ConnectorConfig]] = ConnectorConfig
    # Config keys holding paths the connector writes: `integrand check` refuses those the service cannot write.
    writes_paths: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: C, ctx: ConnectorContext):
        self.config = config
        self.ctx = ctx
        self.log = ctx.logger

    async def start(self) -> None:
        """Open sessions or files; called once before any other coroutine."""

    async def close(self) -> None:
        """Release what ``start`` opened; called once at shutdown."""

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        """What the class can do, from the capability classes it subclasses (shown by ``integrand plugins``)."""
        caps = set()
        if issubclass(cls, WebhookSource):
            caps.add("webhook")
        if issubclass(cls, PollingSource):
            caps.add("poll")
        if issubclass(cls, ReconcilingSource):
            caps.add("reconcile")
        if issubclass(cls, Enricher):
            caps.add("fetch")
        if issubclass(cls, StreamingSource):
            caps.add("stream")
        if issubclass(cls, Sink):
            caps.add("sink")
            if cls.deliver_batch is not Sink.deliver_batch:
                caps.add("batch")
        return frozenset(caps)

    @classmethod
    def roles(cls) -> frozenset[Role]:
        caps = cls.capabilities()
        roles: set[Role] = set()
        if caps & {"webhook", "poll", "reconcile", "stream"}:
            roles.add("source")
        if "sink" in caps:
            roles.add("sink")
        return frozenset(roles)


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """An inbound webhook as received: the raw body, before anything is parsed."""

    source: str
    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    received_at: str
    content_type: str = ""
    remote: str | None = None


class WebhookSource(ABC):
    """Capability: receive pushed changes at ``POST /hooks/{name}``."""

    @abstractmethod
    def verify(self, request: WebhookRequest, now: float) -> None:
        """Raise SignatureError unless the request is authentic and fresh; nothing is parsed before this."""

    @abstractmethod
    def parse(self, request: WebhookRequest) -> list[Event]:
        """Turn a verified request into events; raise PayloadError/UnsupportedMediaType on bad input."""

    def sign(self, body: bytes, now: float, delivery_id: str) -> dict[str, str] | None:
        """Headers a provider would send with ``body`` (for ``integrand send`` and tests); None if unsupported."""
        return None

    def reply(self, outcome: WebhookOutcome) -> WebhookReply | None:
        """The HTTP answer for ``outcome`` when the provider expects its own shape (a SOAP ack); None: integrand's JSON.

        Called for every answer on this source's path — success only after the commit, and every
        refusal — so a provider that retries until it sees its acknowledgement gets it exactly then.
        """
        return None


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """What integrand decided about one inbound webhook, for a source that shapes its own answer."""

    status: int  # integrand's own answer: 200 once committed, else the 4xx/5xx it would send
    reason: str | None = None  # why, when it is not a success
    accepted: int = 0
    duplicates: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)  # integrand's headers (Retry-After, Allow)

    @property
    def committed(self) -> bool:
        """The events are durable (new or already stored): the provider may forget them."""
        return 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class WebhookReply:
    """A connector's answer to a webhook: status, body and media type (headers such as Retry-After are kept)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PollResult:
    """One poll's outcome; ``cursor`` is committed in the same transaction as ``events``.

    ``more`` says another page is waiting (integrand polls again at once). The rest are
    hints for the interval policy: ``retry_after`` seconds the provider asked for, and
    the provider's rate budget (``budget_remaining`` of ``budget_limit`` requests, the
    window resetting in ``budget_reset`` seconds), shared with this account's sink writes.
    """

    events: Sequence[Event]
    cursor: Any
    more: bool = False
    retry_after: float | None = None
    budget_remaining: int | None = None
    budget_limit: int | None = None
    budget_reset: float | None = None


@dataclass(frozen=True)
class ReconcilePage:
    """One bounded page of the remote state, for reconciliation.

    ``events`` describe entities as they are now (``entity``, ``entity_id`` and
    ``version`` set, stable ids); integrand enqueues those its entity table shows as
    missed or older. ``deleted`` lists (entity, entity_id) the provider reports as
    deleted. ``cursor`` is where the next page starts (kept in the store, so a
    crashed pass resumes); ``more`` says whether there is one.
    """

    events: Sequence[Event]
    cursor: Any = None
    more: bool = False
    deleted: Sequence[tuple[str, str]] = ()


class PollingSource(ABC):
    """Capability: pull changes since an opaque JSON cursor that the connector owns."""

    @abstractmethod
    async def poll(self, cursor: Any) -> PollResult:
        """Fetch one page of changes after ``cursor`` (None on the first poll)."""


class ReconcilingSource(ABC):
    """Capability: list the remote records so that changes missed by webhooks and polls are found.

    Each record comes back as the Event a change to it would have produced, with
    ``entity``, ``entity_id`` and ``version`` set; integrand compares versions with
    its entity table and enqueues only what was missed or is newer. A separate
    capability from polling: a webhook-only source with a list endpoint can reconcile.
    """

    page_size: ClassVar[int] = 1000

    @abstractmethod
    async def reconcile(self, since: float | None, cursor: Any) -> ReconcilePage:
        """One page (at most ``page_size``) of records changed since ``since`` (epoch s; None = all), from ``cursor``."""


class Enricher(ABC):
    """Capability: fetch a record's current data for a thin event (webhooks that say only *what* changed)."""

    @abstractmethod
    async def fetch(self, event: Event) -> Event:
        """Return ``event`` carrying the record's current data; raise PermanentError if it is gone for good."""

    async def fetch_many(self, events: Sequence[Event]) -> list[Event | BaseException]:
        """Fetch several; one result per event, an error in its place. Override to batch requests."""
        out: list[Event | BaseException] = []
        for event in events:
            try:
                out.append(await self.fetch(event))
            except Exception as e:
                out.append(e)
        return out


class EventTemplate:
    """A subject, topic or routing key made from an event's fields, e.g. ``{source}.{entity}.{type}``.

    The template is checked when it is made (a misspelt field is a config error, not a misrouted
    message); in the rendered value, characters outside ``allowed`` become ``_``, and a missing
    field is ``_``, so every part stays a non-empty token.
    """

    FIELDS = ("source", "type", "entity", "entity_id", "id")

    def __init__(self, template: str, allowed: str = r"A-Za-z0-9_\-."):
        self.template = self.check(template)
        self._unsafe = re.compile(f"[^{allowed}]")

    @classmethod
    def check(cls, template: str) -> str:
        """``template`` if it names only event fields, else ValueError naming the wrong one (for config validators)."""
        for _, name, spec, conv in string.Formatter().parse(template):
            if name is not None and (name not in cls.FIELDS or spec or conv):
                raise ValueError(f"unknown field {{{name}}} (use {', '.join(sorted(cls.FIELDS))})")
        return template

    def render(self, event: Event) -> str:
        """The template with ``event``'s fields filled in, made safe for the broker."""

        def tok(value: str | None) -> str:
            return self._unsafe.sub("_", value) if value else "_"

        return self.template.format(
            source=tok(event.source),
            type=tok(event.type),
            entity=tok(event.entity),
            entity_id=tok(event.entity_id),
            id=tok(event.id),
        )


_ENVELOPE_FIELDS = (
    "id",
    "source",
    "type",
    "data",
    "received_at",
    "entity",
    "entity_id",
    "version",
    "occurred_at",
    "meta",
)


def envelope_event(body: Any) -> Event | None:
    """The Event inside an integrand envelope (what a sink with ``payload = "envelope"`` sends), or None when
    ``body`` is other JSON; PayloadError when it claims to be one (id, source, type, data) but is malformed."""
    if not (isinstance(body, dict) and {"id", "source", "type", "data"} <= body.keys()):
        return None
    try:
        ev = Event(**{k: body[k] for k in _ENVELOPE_FIELDS if k in body})
    except TypeError as e:
        raise PayloadError(f"not an integrand envelope ({e})") from None
    if not all(isinstance(getattr(ev, k), str) for k in ("id", "source", "type")) or not isinstance(ev.meta, dict):
        raise PayloadError("not an integrand envelope (id, source and type must be strings, meta an object)")
    optional = ("received_at", "entity", "entity_id", "version", "occurred_at")
    if not all(getattr(ev, k) is None or isinstance(getattr(ev, k), str) for k in optional):
        # Found by fuzzing: {"entity": false} reached the store, whose enqueue then failed on it.
        raise PayloadError("not an integrand envelope (received_at, entity, entity_id, version, occurred_at: strings)")
    return ev


def message_event(
    raw: bytes,
    *,
    source: str,
    fallback_id: Callable[[], str],
    type: str,
    message_id: str | None = None,
    format: Literal["auto", "envelope", "json"] = "auto",
    entity: str | None = None,
    entity_id: str | None = None,
    version: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Event:
    """A consumed broker message's body as an event of ``source``; PayloadError (the reason) if it cannot be one.

    An integrand envelope (``format`` "auto" or "envelope") keeps its type, entity fields, version,
    times and data, with ``meta.origin`` = the source that published it; other JSON (``format``
    "auto" or "json") becomes ``data``, with ``type`` and the entity fields given (from the message's
    headers). The id is ``message_id``, else the envelope's key, else ``fallback_id()`` (a stream
    sequence, a content hash): the same for every redelivery, so a redelivery is a duplicate.
    ``meta`` (where the message came from) is kept under the event's ``meta``. A message the store
    would refuse (``storage_problem``: ids not text, a mixed-form version, JSON too deep) is a PayloadError too."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise PayloadError(f"not JSON ({e})") from None
    inner = envelope_event(body) if format != "json" else None
    if inner is not None:
        ev = Event(
            id=message_id or inner.key,
            source=source,
            type=inner.type,
            data=inner.data,
            entity=inner.entity,
            entity_id=inner.entity_id,
            version=inner.version,
            occurred_at=inner.occurred_at,
            meta={**(inner.meta or {}), "origin": inner.source, **(meta or {})},
        )
    elif format == "envelope":
        raise PayloadError("not an integrand envelope (needs id, source, type, data)")
    else:
        ev = Event(
            id=message_id or fallback_id(),
            source=source,
            type=type,
            data=body,
            entity=entity,
            entity_id=entity_id,
            version=version,
            meta=dict(meta or {}),
        )
    if (why := storage_problem(ev)) is not None:
        # Rejected here: handed to the store, it would fail its whole batch forever (a poison batch).
        raise PayloadError(f"cannot be stored: {why}")
    return ev


@dataclass(frozen=True)
class Rejected:
    """An upstream message that cannot become an event (not parsable, wrong shape): stored as a rejection.

    It is recorded (``integrand`` lists it beside refused webhooks) before the batch is committed,
    and the connector's ``ack`` then settles it upstream (a dead-letter exchange, a ``term``), so
    a poison message is neither lost silently nor redelivered forever.
    """

    reason: str
    headers: Mapping[str, str] = field(default_factory=dict)
    status: int = 400


@dataclass(frozen=True)
class StreamBatch:
    """What a streaming source received: events plus the resume position after them.

    ``position`` (JSON) is committed in the same transaction as ``events`` and handed back to
    ``stream()`` after a restart. ``token`` is the connector's own handle for ``ack`` (delivery
    tags, message objects); it is never stored. ``rejected`` are messages of this batch that
    could not be parsed.
    """

    events: Sequence[Event]
    position: Any
    token: Any = None
    rejected: Sequence[Rejected] = ()


class StreamingSource(ABC):
    """Capability: a long-lived subscription that pushes changes, acknowledged only after integrand's commit.

    integrand runs ``stream(position)`` as one task for the source's life and, for every batch
    it yields: commits the events and ``batch.position`` in one transaction, then awaits
    ``ack(batch)``. A crash between receipt and commit therefore means redelivery, which event
    ids absorb. While the store refuses a commit integrand stops reading (the generator stays
    suspended at its ``yield``) and calls ``refused`` at each attempt. Errors raised from
    ``stream`` are sorted as everywhere: ``RetryableError`` (and anything unexpected) reconnects
    with backoff, ``AuthError``/``PermanentError`` raise an alert and wait, ``PositionLost``
    runs ``resync`` and is logged.

    ``read_ahead`` (0 by default: the next batch is read only once the last one is acknowledged)
    lets integrand read up to that many batches while earlier ones commit, and commit what was read
    meanwhile in one transaction (group commit; each batch's position is committed with its events,
    the last one's is what is stored). A connector that sets it must accept being asked for the next
    batch before the previous ones are acknowledged: acks still come once per batch, in order, only
    after the commit; a batch read but not yet committed when the stream stops is never acked (it is
    redelivered, as after a crash); and ``refused`` is called for the batches of a refused group one
    at a time, in order, as without read-ahead.
    """

    read_ahead: ClassVar[int] = 0

    @abstractmethod
    def stream(self, position: Any) -> AsyncIterator[StreamBatch]:
        """Yield batches received after ``position`` (None: the first run), for as long as the subscription lives."""

    async def ack(self, batch: StreamBatch) -> None:  # noqa: B027 - optional hook; many upstreams need no ack
        """Acknowledge ``batch`` upstream; called only after its events and position are committed."""

    async def refused(self, batch: StreamBatch, error: BaseException) -> bool:
        """The store refused to commit ``batch`` (full disk, locked). Return True if the upstream takes it back
        (e.g. a NATS ``nak`` with delay): integrand then drops its copy and reads again after a backoff.
        The default keeps it: integrand retries the same batch and reads nothing new meanwhile."""
        return False

    def resync(self, lost: PositionLost) -> AsyncIterator[StreamBatch]:
        """The full-resync path after ``lost``: yield the current state as batches (a snapshot); the last
        batch's position is where ``stream`` resumes. The default has none: an alert that needs a human."""
        raise PermanentError(f"{lost} (this connector has no resync path; reset the position by hand)")


class Sink(ABC):
    """Capability: deliver events; must be idempotent on ``event.key``."""

    batch_size: ClassVar[int] = 1

    @abstractmethod
    async def deliver(self, event: Event) -> None:
        """Deliver one event or raise RetryableError / PermanentError / AuthError."""

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Deliver several; one result per event (None = delivered). Override to batch for real."""
        results: list[BaseException | None] = []
        for event in events:
            try:
                await self.deliver(event)
            except Exception as e:
                results.append(e)
            else:
                results.append(None)
        return results

    async def deliver_result(self, event: Event) -> Mapping[str, Any] | None:
        """Deliver one event and return what the sink answered (the ids it assigned), for a saga's later steps.

        The default delivers and returns None; override it where the provider's answer names the record."""
        await self.deliver(event)
        return None
