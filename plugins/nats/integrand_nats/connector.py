"""NATS JetStream as an integrand sink (publish, wait for the PubAck) and streaming source (durable pull consumer).

Sink: each event is published to a subject rendered from a template on the event, with the
``Nats-Msg-Id`` header set to its idempotency key, so the stream's duplicate window absorbs
integrand's own retries; a delivery is done only when the PubAck arrived.

Source: a durable pull consumer fetched in batches; integrand commits each batch with the last
stream sequence as its resume position and only then are the messages acked. A message that
cannot be parsed is stored as a rejection and ``term``-ed; a batch the store refuses is ``nak``-ed
with a delay; ``in_progress`` keeps a batch ours while a long commit runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from pydantic import Field, field_validator

from integrand.connector import (
    AuthError,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Duration,
    Event,
    EventTemplate,
    PayloadError,
    PermanentError,
    PositionLost,
    Rejected,
    RetryableError,
    SecretValue,
    Sink,
    StreamBatch,
    StreamingSource,
    message_event,
)

# The client's own reconnect attempts (0.5 s apart) before it gives up; then the sink reconnects on its next
# delivery and the source through integrand's backoff. Bounded, so a server that is down is reported.
RECONNECTS = 10


class NatsConfig(ConnectorConfig):
    servers: list[str] = ["nats://127.0.0.1:4222"]
    user: str | None = None
    password: SecretValue | None = None
    token: SecretValue | None = None
    connect_timeout: Duration = 5.0
    # --- sink
    subject: str = "{source}.{entity}.{type}"
    payload: Literal["envelope", "data"] = "envelope"
    publish_timeout: Duration = 10.0
    expect_stream: str | None = None
    # --- source
    stream: str | None = None
    durable: str | None = None
    filter_subject: str | None = None
    batch: int = Field(default=256, ge=1, le=10_000)
    fetch_wait: Duration = 1.0
    ack_wait: Duration = 30.0
    # Unset: two batches, the one integrand commits and the next, fetched meanwhile. Bounded, so after a
    # crash the unacked ones are redelivered (in stream order) before anything newer: per-subject order holds.
    max_ack_pending: int | None = Field(default=None, ge=1)
    nak_delay: Duration = 5.0
    create_consumer: bool = True
    format: Literal["auto", "envelope", "json"] = "auto"
    on_gap: Literal["alert", "skip"] = "alert"

    @field_validator("subject")
    @classmethod
    def _template(cls, v: str) -> str:
        return EventTemplate.check(v)


@dataclass
class _Pending:
    """A fetched batch's messages until they are acked or handed back; ``bad`` are the ones to ``term``."""

    nc: Client
    msgs: Sequence[Msg]
    bad: set[int] = field(default_factory=set)
    keepalive: asyncio.Task[None] | None = None
    released: bool = False  # handed back (nak) after the store refused it

    def stop(self) -> None:
        if self.keepalive is not None:
            self.keepalive.cancel()
            self.keepalive = None


class NatsConnector(Connector[NatsConfig], StreamingSource, Sink):
    """JetStream: publish with Nats-Msg-Id and PubAcks; consume a durable pull consumer, acked after integrand's commit."""

    Config = NatsConfig
    batch_size = 256

    _nc: Client | None = None
    _acks: _Acks | None = None
    _lock: asyncio.Lock | None = None

    def __init__(self, config: NatsConfig, ctx: ConnectorContext):
        super().__init__(config, ctx)
        self._template = EventTemplate(config.subject)

    async def start(self) -> None:
        self._lock = asyncio.Lock()
        if self.ctx.role == "source" and not (self.config.stream and self.config.durable):
            raise PermanentError(f"sources.{self.ctx.name}: a NATS source needs `stream` and `durable`")

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
            self._acks = None

    async def _connect(self, reconnects: int) -> Client:
        c = self.config
        try:
            return await nats.connect(
                servers=c.servers,
                user=c.user,
                password=c.password.reveal() if c.password else None,
                token=c.token.reveal() if c.token else None,
                connect_timeout=max(1, int(c.connect_timeout)),
                allow_reconnect=True,
                max_reconnect_attempts=reconnects,
                reconnect_time_wait=0.5,
                name=f"integrand-{self.ctx.role}-{self.ctx.name}",
                error_cb=self._on_error,
            )
        except nats.errors.AuthorizationError as e:
            raise AuthError(f"NATS refused the credentials: {e}") from None
        except (nats.errors.Error, OSError, TimeoutError) as e:
            raise RetryableError(f"cannot connect to NATS {', '.join(c.servers)}: {type(e).__name__}: {e}") from None

    async def _on_error(self, e: Exception) -> None:
        self.log.debug("nats client: %s: %s", type(e).__name__, e)

    # --- sink -----------------------------------------------------------------------------------

    async def _publisher(self) -> _Acks:
        """The connection and its one PubAck subscription, (re)made when the client gave up reconnecting."""
        assert self._lock is not None
        async with self._lock:
            if self._nc is None or self._nc.is_closed or self._acks is None or self._acks.nc is not self._nc:
                if self._nc is not None:
                    with contextlib.suppress(Exception):
                        await self._nc.close()
                self._nc = await self._connect(reconnects=RECONNECTS)
                self._acks = await _Acks.open(self._nc)
            return self._acks

    def _message(self, event: Event) -> tuple[str, bytes, dict[str, str]]:
        headers = {"Nats-Msg-Id": event.key, "Content-Type": "application/json", "Integrand-Type": event.type}
        for name, value in (
            ("Integrand-Entity", event.entity),
            ("Integrand-Entity-Id", event.entity_id),
            ("Integrand-Version", event.version),
            ("Nats-Expected-Stream", self.config.expect_stream),
        ):
            if value is not None:
                headers[name] = value
        payload = event.to_json() if self.config.payload == "envelope" else orjson.dumps(event.data)
        return self._template.render(event), payload, headers

    async def deliver(self, event: Event) -> None:
        [err] = await self.deliver_batch([event])
        if err is not None:
            raise err

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Publish a batch with every message in flight at once; a delivery is done only with its PubAck.

        Per-entity order: events of one entity go out in waves, the next only after the previous one's
        PubAck, and an entity whose event failed sends nothing after it in this batch. (The dispatcher
        leases only the head of each entity's line, so a batch from it is a single wave.)"""
        acks = await self._publisher()
        deadline = asyncio.get_running_loop().time() + self.config.publish_timeout
        results: list[BaseException | None] = [None] * len(events)
        failed: dict[str, str] = {}  # entity key -> the key of its event that failed
        for wave in _waves(events):
            todo = []
            for i in wave:
                before = failed.get(events[i].entity_key)
                if before is None:
                    todo.append(i)
                else:
                    results[i] = RetryableError(f"{events[i].key} not sent: {before}, before it in its entity, failed")
            got = await acks.publish([(events[i], *self._message(events[i])) for i in todo], deadline)
            for i, err in zip(todo, got, strict=True):
                results[i] = err
                if err is not None:
                    failed[events[i].entity_key] = events[i].key
        return results

    # --- source ---------------------------------------------------------------------------------

    async def stream(self, position: Any) -> AsyncIterator[StreamBatch]:
        c = self.config
        assert c.stream is not None and c.durable is not None
        nc = await self._connect(reconnects=RECONNECTS)
        pending: list[_Pending] = []
        ahead: asyncio.Future[list[Msg]] | None = None
        try:
            js = nc.jetstream(timeout=max(5.0, c.connect_timeout))
            psub = await self._subscribe(js, position)
            # The position only moves forward: redeliveries (after a nak, a crash) carry older sequences,
            # and the consumer's ack floor, not this high-water mark, is what tracks them.
            high = int(position or 0)
            while True:
                fetch, ahead = ahead or asyncio.ensure_future(self._fetch(psub)), None
                msgs = await fetch
                if not msgs:
                    continue
                batch = self._batch(nc, msgs, pending, high)
                high = batch.position
                # The next batch is fetched while integrand commits this one (the consumer allows two
                # batches unacked), so a fetch's round trip does not wait behind a commit's fsync.
                ahead = asyncio.ensure_future(self._fetch(psub))
                yield batch
                pending[:] = [p for p in pending if p.keepalive is not None]
                if batch.token.released:
                    # This batch went back upstream: what was fetched after it goes back too (after its
                    # fetch ends, so nothing of it is left to the next one), and nothing newer is
                    # committed before the redelivery.
                    await self._hand_back(ahead, self.config.nak_delay)
                    ahead = None
        finally:
            # What integrand holds unacked is not nak-ed here: a pull request of this session may still be
            # open on the server and would take the redelivery, out of order. It comes back after ack_wait,
            # and the next session waits for that before fetching (``_await_redelivery``).
            for p in pending:
                p.stop()
            if ahead is not None:
                ahead.cancel()
            with contextlib.suppress(Exception):
                await nc.close()

    async def _fetch(self, psub: Any) -> list[Msg]:
        c = self.config
        try:
            return list(await psub.fetch(c.batch, timeout=c.fetch_wait))
        except TimeoutError:  # nothing waiting (nats-py raises both its own and the builtin one)
            return []
        except nats.js.errors.NotFoundError as e:
            raise RetryableError(f"consumer {c.durable!r} on stream {c.stream!r} is gone: {e}") from None
        except nats.errors.Error as e:
            raise RetryableError(f"NATS fetch failed: {type(e).__name__}: {e}") from None

    async def _hand_back(self, ahead: asyncio.Future[list[Msg]], delay: float) -> None:
        """Give a fetched (or still fetching: it ends first) batch integrand did not take back: ``nak``."""
        with contextlib.suppress(BaseException):
            for m in await ahead:
                await m.nak(delay=delay)

    async def _subscribe(self, js: Any, position: Any) -> Any:
        c = self.config
        assert c.stream is not None and c.durable is not None
        try:
            info = await js.stream_info(c.stream)
        except nats.js.errors.NotFoundError:
            raise PermanentError(f"JetStream stream {c.stream!r} does not exist (create it, or fix `stream`)") from None
        except nats.errors.Error as e:
            raise RetryableError(f"cannot read stream {c.stream!r}: {type(e).__name__}: {e}") from None
        consumer = None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            consumer = await js.consumer_info(c.stream, c.durable)
        first = int(info.state.first_seq)
        have = max(int(position or 0), int(consumer.ack_floor.stream_seq) if consumer and consumer.ack_floor else 0)
        if position is not None and first > have + 1:
            lost = PositionLost(
                f"stream {c.stream} now starts at sequence {first}",
                position=position,
                detail=f"sequences {have + 1}..{first - 1} expired or were purged before integrand stored them",
            )
            if c.on_gap == "alert":
                raise lost
            self.log.error("NATS source %s: skipping a gap: %s (%s)", self.ctx.name, lost, lost.detail)
            have = first - 1
        if consumer is not None and consumer.num_ack_pending:
            await self._await_redelivery(int(consumer.num_ack_pending))
        if consumer is None:
            if not c.create_consumer:
                raise PermanentError(f"durable consumer {c.durable!r} does not exist on stream {c.stream!r}")
            cfg = api.ConsumerConfig(
                durable_name=c.durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=c.ack_wait,
                max_ack_pending=c.max_ack_pending or 2 * c.batch,
                max_deliver=-1,  # integrand naks only when its store refuses: never drop a message for that
                filter_subject=c.filter_subject,
            )
            if position is not None:
                cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
                cfg.opt_start_seq = have + 1
            await js.add_consumer(c.stream, config=cfg)
            self.log.info("NATS source %s: created durable consumer %s on %s", self.ctx.name, c.durable, c.stream)
        return await js.pull_subscribe_bind(durable=c.durable, stream=c.stream)

    async def _await_redelivery(self, pending: int) -> None:
        """Messages a previous session fetched and never acked (it was killed, or a reload stopped it) come back
        only after ``ack_wait``, while ``max_ack_pending`` may still leave room for newer ones: fetching now
        would hand those over first, and the store would drop the older versions as stale when they return.
        So wait until they are due again (the server then redelivers them before anything new)."""
        c = self.config
        assert c.stream is not None and c.durable is not None
        self.log.info(
            "NATS source %s: %d message(s) a previous session left unacknowledged; waiting ack_wait (%.1f s) "
            "for their redelivery so that nothing newer overtakes them",
            self.ctx.name,
            pending,
            c.ack_wait,
        )
        # A little past ack_wait: the server notices the expiry on its own timer.
        await asyncio.sleep(c.ack_wait * 1.1 + 0.2)

    def resync(self, lost: PositionLost) -> AsyncIterator[StreamBatch]:
        raise PermanentError(
            f"{lost} ({lost.detail}); JetStream keeps no older copy to resync from: replay the range from its "
            'origin, then set `on_gap = "skip"` (or reset the stream position) to go on'
        )

    def _batch(self, nc: Client, msgs: Sequence[Msg], pending: list[_Pending], high: int) -> StreamBatch:
        events: list[Event] = []
        rejected: list[Rejected] = []
        p = _Pending(nc, msgs)
        last = high
        stream = str(self.config.stream)
        for i, m in enumerate(msgs):
            seq = stream_sequence(m.reply)
            last = max(last, seq)
            try:
                events.append(self._event(m, seq))
            except PayloadError as e:
                p.bad.add(i)
                rejected.append(
                    Rejected(
                        f"NATS message {stream}:{seq} on {m.subject}: {e}",
                        {"subject": m.subject, "stream": stream, "seq": str(seq)},
                    )
                )
        p.keepalive = asyncio.ensure_future(self._keepalive(p))
        pending.append(p)
        return StreamBatch(events, last, token=p, rejected=rejected)

    def _event(self, m: Msg, seq: int) -> Event:
        headers = m.headers or {}
        return message_event(
            m.data,
            source=self.ctx.name,
            format=self.config.format,
            message_id=headers.get("Nats-Msg-Id"),
            fallback_id=lambda: f"{self.config.stream}:{seq}",
            type=headers.get("Integrand-Type") or m.subject,
            entity=headers.get("Integrand-Entity"),
            entity_id=headers.get("Integrand-Entity-Id"),
            version=headers.get("Integrand-Version"),
            meta={"nats": {"subject": m.subject, "stream": self.config.stream, "seq": seq}},
        )

    async def _keepalive(self, p: _Pending) -> None:
        """While integrand commits a batch (slow disk, a large batch), keep its messages from being redelivered."""
        while True:
            await asyncio.sleep(self.config.ack_wait / 3)
            for m in p.msgs:
                with contextlib.suppress(nats.errors.Error):
                    await m.in_progress()

    async def ack(self, batch: StreamBatch) -> None:
        p: _Pending = batch.token
        p.stop()
        try:
            # Fire-and-forget acks, no flush round trip: they precede the next fetch on this connection, and a
            # lost one only means a redelivery the event ids absorb.
            for i, m in enumerate(p.msgs):
                await (m.term() if i in p.bad else m.ack())
        except (nats.errors.Error, OSError) as e:
            # Committed already: the redelivery this causes is absorbed by the event ids.
            raise RetryableError(f"NATS ack failed: {type(e).__name__}: {e}") from None

    async def refused(self, batch: StreamBatch, error: BaseException) -> bool:
        p: _Pending = batch.token
        p.stop()
        p.released = True
        try:
            for m in p.msgs:
                await m.nak(delay=self.config.nak_delay)
        except (nats.errors.Error, OSError):
            return True  # the ack wait hands them back all the same
        return True


def _waves(events: Sequence[Event]) -> list[list[int]]:
    """Indices of ``events`` in rounds holding at most one event per entity, each entity's in batch order."""
    seen: dict[str, int] = {}
    waves: list[list[int]] = []
    for i, ev in enumerate(events):
        n = seen.get(ev.entity_key, 0)
        seen[ev.entity_key] = n + 1
        if n == len(waves):
            waves.append([])
        waves[n].append(i)
    return waves


class _Acks:
    """PubAcks by reply subject: one wildcard subscription per connection, one future per batch.

    The client's ``publish_async`` costs a semaphore wait, a future, a callback and a PubAck object per
    message; a batch needs only its count of outstanding acks and the errors among them."""

    def __init__(self, nc: Client, prefix: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self._tokens = itertools.count()
        self._waiting: dict[str, tuple[_Round, int]] = {}

    @classmethod
    async def open(cls, nc: Client) -> _Acks:
        acks = cls(nc, nc.new_inbox() + ".")
        try:
            await nc.subscribe(acks.prefix + "*", cb=acks._reply)
        except (nats.errors.Error, OSError) as e:
            raise RetryableError(f"NATS: cannot subscribe for PubAcks: {type(e).__name__}: {e}") from None
        return acks

    async def publish(
        self, messages: Sequence[tuple[Event, str, bytes, dict[str, str]]], deadline: float
    ) -> list[BaseException | None]:
        """Publish all, then wait (until ``deadline``, loop time) for each one's PubAck or error."""
        r = _Round(messages)
        tokens: list[str] = []
        for j, (_ev, subject, payload, headers) in enumerate(messages):
            token = str(next(self._tokens))
            tokens.append(token)
            self._waiting[token] = (r, j)
            try:
                await self.nc.publish(subject, payload, reply=self.prefix + token, headers=headers)
            except (nats.errors.Error, OSError) as e:
                r.settle(j, RetryableError(f"NATS publish to {subject!r} failed: {type(e).__name__}: {e}"))
        if r.left:
            await asyncio.wait([r.done], timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        for j, token in enumerate(tokens):
            self._waiting.pop(token, None)
            if r.results[j] is _NO_ACK:
                ev = messages[j][0]
                r.results[j] = RetryableError(f"no PubAck for {ev.key} from NATS in time")
        return [e if isinstance(e, BaseException) else None for e in r.results]

    async def _reply(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject[len(self.prefix) :], None)
        if entry is None:  # late, after its batch gave up on it
            return
        r, j = entry
        ev, subject = r.messages[j][0], r.messages[j][1]
        if msg.headers and msg.headers.get("Status") == "503":
            r.settle(j, RetryableError(f"no JetStream stream takes subject {subject!r}"))
            return
        try:
            resp = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            r.settle(j, RetryableError(f"NATS answered {ev.key} with something not a PubAck: {msg.data[:100]!r}"))
            return
        err = resp.get("error") if isinstance(resp, dict) else None
        r.settle(j, None if err is None else _api_error(err, ev))


_NO_ACK = object()


class _Round:
    """One wave of a batch in flight: its messages, what came back for each, and when all have."""

    def __init__(self, messages: Sequence[tuple[Event, str, bytes, dict[str, str]]]) -> None:
        self.messages = messages
        self.results: list[object] = [_NO_ACK] * len(messages)
        self.left = len(messages)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not messages:
            self.done.set_result(None)

    def settle(self, j: int, result: BaseException | None) -> None:
        if self.results[j] is not _NO_ACK:
            return
        self.results[j] = result
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(None)


def stream_sequence(reply: str) -> int:
    """The stream sequence in a JetStream message's ack subject (the client's ``metadata`` parses all of it,
    with a datetime, per message: a tenth of the consume path's time).

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.…`` (9 tokens) or, with a domain and account hash,
    ``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.…`` (11 or more)."""
    tokens = reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise RetryableError(f"not a JetStream message (reply subject {reply!r})")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def _api_error(err: Any, ev: Event) -> BaseException:
    """A PubAck's ``error`` ({"code", "err_code", "description"}) as what integrand does next."""
    if not isinstance(err, dict):
        return RetryableError(f"JetStream did not store {ev.key}: {err!r}")
    code = err.get("code") or 0
    desc = err.get("description") or "no description"
    if code in (401, 403):
        return AuthError(f"JetStream refused {ev.key}: {desc}")
    if code == 400:
        return PermanentError(f"JetStream rejected {ev.key}: {desc} (err_code {err.get('err_code')})")
    return RetryableError(f"JetStream did not store {ev.key}: {desc}")
