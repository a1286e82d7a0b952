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
    envelope_event,
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
    # Unset: one batch. integrand reads a batch, commits, acks, reads the next, so more buys nothing, and it
    # keeps per-subject order across a crash: the unacked batch is redelivered before anything newer.
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

    def stop(self) -> None:
        if self.keepalive is not None:
            self.keepalive.cancel()
            self.keepalive = None


class NatsConnector(Connector[NatsConfig], StreamingSource, Sink):
    """JetStream: publish with Nats-Msg-Id and PubAcks; consume a durable pull consumer, acked after integrand's commit."""

    Config = NatsConfig
    batch_size = 256

    _nc: Client | None = None
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

    async def _client(self) -> Client:
        assert self._lock is not None
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                self._nc = await self._connect(reconnects=RECONNECTS)
            return self._nc

    def _message(self, event: Event) -> tuple[str, bytes, dict[str, str]]:
        headers = {"Nats-Msg-Id": event.key, "Content-Type": "application/json", "Integrand-Type": event.type}
        for name, value in (
            ("Integrand-Entity", event.entity),
            ("Integrand-Entity-Id", event.entity_id),
            ("Integrand-Version", event.version),
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
        """Publish all, in order, then wait for every PubAck: a delivery is done only with its ack."""
        nc = await self._client()
        js = nc.jetstream(timeout=self.config.publish_timeout)
        futures: list[asyncio.Future[api.PubAck] | BaseException] = []
        for ev in events:
            subject, payload, headers = self._message(ev)
            try:
                futures.append(
                    await js.publish_async(subject, payload, headers=headers, stream=self.config.expect_stream)
                )
            except (nats.errors.Error, OSError) as e:
                futures.append(RetryableError(f"NATS publish to {subject!r} failed: {type(e).__name__}: {e}"))
        waiting = [f for f in futures if not isinstance(f, BaseException)]
        if waiting:  # one wait for the whole batch: a wait_for per message costs a task each
            await asyncio.wait(waiting, timeout=self.config.publish_timeout)
        results: list[BaseException | None] = []
        for ev, fut in zip(events, futures, strict=True):
            if isinstance(fut, BaseException):
                results.append(fut)
            elif not fut.done():
                fut.cancel()
                results.append(RetryableError(f"no PubAck for {ev.key} within {self.config.publish_timeout:g} s"))
            elif (err := fut.exception()) is None:
                results.append(None)
            elif isinstance(err, nats.js.errors.NoStreamResponseError):
                results.append(RetryableError(f"no JetStream stream takes subject {self._template.render(ev)!r}"))
            elif isinstance(err, nats.js.errors.APIError):
                results.append(_api_error(err, ev))
            else:
                results.append(RetryableError(f"NATS publish failed: {type(err).__name__}: {err}"))
        return results

    # --- source ---------------------------------------------------------------------------------

    async def stream(self, position: Any) -> AsyncIterator[StreamBatch]:
        c = self.config
        assert c.stream is not None and c.durable is not None
        nc = await self._connect(reconnects=RECONNECTS)
        pending: list[_Pending] = []
        try:
            js = nc.jetstream(timeout=max(5.0, c.connect_timeout))
            psub = await self._subscribe(js, position)
            # The position only moves forward: redeliveries (after a nak, a crash) carry older sequences,
            # and the consumer's ack floor, not this high-water mark, is what tracks them.
            high = int(position or 0)
            while True:
                try:
                    msgs = await psub.fetch(c.batch, timeout=c.fetch_wait)
                except TimeoutError:  # nothing waiting (nats-py raises both its own and the builtin one)
                    continue
                except nats.js.errors.NotFoundError as e:
                    raise RetryableError(f"consumer {c.durable!r} on stream {c.stream!r} is gone: {e}") from None
                except nats.errors.Error as e:
                    raise RetryableError(f"NATS fetch failed: {type(e).__name__}: {e}") from None
                if not msgs:
                    continue
                batch = self._batch(nc, msgs, pending, high)
                high = batch.position
                yield batch
                pending[:] = [p for p in pending if p.keepalive is not None]
        finally:
            for p in pending:
                p.stop()
            with contextlib.suppress(Exception):
                await nc.close()

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
                max_ack_pending=c.max_ack_pending or c.batch,
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
        for i, m in enumerate(msgs):
            md = m.metadata
            seq = int(md.sequence.stream)
            last = max(last, seq)
            try:
                events.append(self._event(m, seq, int(md.num_delivered)))
            except _Unparsable as e:
                p.bad.add(i)
                rejected.append(
                    Rejected(
                        f"NATS message {md.stream}:{seq} on {m.subject}: {e}",
                        {"subject": m.subject, "stream": str(md.stream), "seq": str(seq)},
                    )
                )
        p.keepalive = asyncio.ensure_future(self._keepalive(p))
        pending.append(p)
        return StreamBatch(events, last, token=p, rejected=rejected)

    def _event(self, m: Msg, seq: int, delivered: int) -> Event:
        headers = m.headers or {}
        try:
            body = orjson.loads(m.data)
        except orjson.JSONDecodeError as e:
            raise _Unparsable(f"not JSON ({e})") from None
        nats_meta = {"subject": m.subject, "stream": self.config.stream, "seq": seq}
        msg_id = headers.get("Nats-Msg-Id")
        fmt = self.config.format
        inner = None
        if fmt != "json":
            try:
                inner = envelope_event(body)
            except PayloadError as e:
                raise _Unparsable(str(e)) from None
        if inner is not None:
            return Event(
                id=msg_id or inner.key,
                source=self.ctx.name,
                type=inner.type,
                data=inner.data,
                entity=inner.entity,
                entity_id=inner.entity_id,
                version=inner.version,
                occurred_at=inner.occurred_at,
                meta={**(inner.meta or {}), "origin": inner.source, "nats": nats_meta},
            )
        if fmt == "envelope":
            raise _Unparsable("not an integrand envelope (needs id, source, type, data)")
        return Event(
            id=msg_id or f"{self.config.stream}:{seq}",
            source=self.ctx.name,
            type=headers.get("Integrand-Type") or m.subject,
            data=body,
            entity=headers.get("Integrand-Entity"),
            entity_id=headers.get("Integrand-Entity-Id"),
            version=headers.get("Integrand-Version"),
            meta={"nats": nats_meta},
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
        try:
            for m in p.msgs:
                await m.nak(delay=self.config.nak_delay)
        except (nats.errors.Error, OSError):
            return True  # the ack wait hands them back all the same
        return True


class _Unparsable(Exception):
    """A consumed message that can never become an event."""


def _api_error(e: nats.js.errors.APIError, ev: Event) -> BaseException:
    code = getattr(e, "code", None) or 0
    desc = getattr(e, "description", None) or str(e)
    if code in (401, 403):
        return AuthError(f"JetStream refused {ev.key}: {desc}")
    if code == 400:
        return PermanentError(f"JetStream rejected {ev.key}: {desc} (err_code {getattr(e, 'err_code', None)})")
    return RetryableError(f"JetStream did not store {ev.key}: {desc}")
