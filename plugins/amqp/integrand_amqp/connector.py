"""RabbitMQ (AMQP 0-9-1) as an integrand sink (publisher confirms) and streaming source (manual acks).

Sink: each event is published persistent to an exchange (topic by default) with a routing key
rendered from a template on the event, ``message_id`` = its idempotency key, on a channel with
publisher confirms and ``mandatory``: a delivery is done only with the broker's ack, and a nack
or a returned (unroutable) message is an error with the broker's reason.

Source: a queue consumed with manual acks and a prefetch window; integrand commits each batch,
then acks it. Redeliveries are absorbed by the event id (``message_id``, else a content hash).
A message that cannot be parsed is stored as a rejection and dead-lettered with its reason, never
requeued.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
import orjson
from pydantic import Field, field_validator
from yarl import URL

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
    Rejected,
    RetryableError,
    SecretValue,
    Sink,
    StreamBatch,
    StreamingSource,
    content_id,
    message_event,
    wait_event,
)

REASON_HEADER = "x-integrand-rejected"
BODY_EXCERPT = 2048


class QueueDeclare(ConnectorConfig):
    """``declare_queue``: what integrand declares (only when configured) before consuming."""

    type: Literal["quorum", "classic"] = "quorum"
    bind: list[str] = []
    dead_letter_exchange: str | None = None
    delivery_limit: int | None = Field(default=None, ge=1)


class AmqpConfig(ConnectorConfig):
    url: str = "amqp://127.0.0.1:5672/"
    vhost: str | None = None
    user: str | None = None
    password: SecretValue | None = None
    connect_timeout: Duration = 5.0
    heartbeat: int = Field(default=30, ge=0)
    exchange: str = "integrand"
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = "topic"
    declare_exchange: bool = False
    # --- sink
    routing_key: str = "{source}.{entity}.{type}"
    payload: Literal["envelope", "data"] = "envelope"
    mandatory: bool = True
    publish_timeout: Duration = 10.0
    # --- source
    queue: str | None = None
    declare_queue: QueueDeclare | None = None
    prefetch: int = Field(default=512, ge=1, le=65535)
    batch: int = Field(default=256, ge=1)
    batch_wait: Duration = 0.02
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    format: Literal["auto", "envelope", "json"] = "auto"
    # What makes two deliveries the same event: the publisher's message_id (else the content), or always the
    # content (for publishers whose client invents a random message_id per publish, as aiormq does).
    dedup: Literal["message_id", "content"] = "message_id"

    @field_validator("routing_key")
    @classmethod
    def _template(cls, v: str) -> str:
        return EventTemplate.check(v)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = URL(v)
        if u.scheme not in ("amqp", "amqps"):
            raise ValueError("url must start with amqp:// or amqps://")
        if u.password:
            raise ValueError("put the password in `password` (a secret reference), not in the url")
        return v


class AmqpConnector(Connector[AmqpConfig], StreamingSource, Sink):
    """RabbitMQ: confirmed persistent publishes; a manual-ack consumer acked after integrand's commit."""

    Config = AmqpConfig
    batch_size = 256

    _conn: aio_pika.abc.AbstractConnection | None = None
    _channel: aio_pika.abc.AbstractChannel | None = None
    _exchange: aio_pika.abc.AbstractExchange | None = None

    def __init__(self, config: AmqpConfig, ctx: ConnectorContext):
        super().__init__(config, ctx)
        self._template = EventTemplate(config.routing_key, allowed=r"A-Za-z0-9_\-.:/")

    async def start(self) -> None:
        self._lock = asyncio.Lock()
        self._count = 0
        if self.ctx.role == "source" and not self.config.queue:
            raise PermanentError(f"sources.{self.ctx.name}: an AMQP source needs `queue`")

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = self._channel = self._exchange = None

    def _url(self) -> URL:
        c = self.config
        u = URL(c.url)
        if c.user is not None:
            u = u.with_user(c.user)
        if c.password is not None:
            u = u.with_password(c.password.reveal())
        if c.vhost is not None:
            u = u.with_path("/" + c.vhost.lstrip("/")) if c.vhost != "/" else u.with_path("/%2F", encoded=True)
        return u.update_query(heartbeat=c.heartbeat)

    async def _connect(self) -> aio_pika.abc.AbstractConnection:
        where = URL(self.config.url).with_user(None)
        try:
            return await aio_pika.connect(self._url(), timeout=self.config.connect_timeout)
        except (aiormq.exceptions.AuthenticationError, aiormq.exceptions.ProbableAuthenticationError) as e:
            raise AuthError(f"RabbitMQ at {where} refused the credentials: {e}") from None
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as e:
            vhost = f" (vhost {self.config.vhost!r})" if self.config.vhost else ""
            raise RetryableError(f"cannot connect to RabbitMQ at {where}{vhost}: {type(e).__name__}: {e}") from None

    async def _exchange_on(self, channel: aio_pika.abc.AbstractChannel, name: str) -> aio_pika.abc.AbstractExchange:
        c = self.config
        if not name:
            return channel.default_exchange
        try:
            if c.declare_exchange and name == c.exchange:
                return await channel.declare_exchange(name, c.exchange_type, durable=True)
            return await channel.get_exchange(name, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise RetryableError(
                f"exchange {name!r} does not exist on RabbitMQ (declare it, or set declare_exchange = true)"
            ) from None

    # --- sink -----------------------------------------------------------------------------------

    async def _sink_exchange(self) -> aio_pika.abc.AbstractExchange:
        async with self._lock:
            if self._conn is None or self._conn.is_closed or self._channel is None or self._channel.is_closed:
                await self.close()
                self._conn = await self._connect()
                try:
                    self._channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
                    self._exchange = await self._exchange_on(self._channel, self.config.exchange)
                except BaseException:
                    await self.close()
                    raise
            assert self._exchange is not None
            return self._exchange

    def _message(self, event: Event) -> aio_pika.Message:
        headers: dict[str, Any] = {"integrand-source": event.source, "integrand-type": event.type}
        for name, value in (
            ("integrand-entity", event.entity),
            ("integrand-entity-id", event.entity_id),
            ("integrand-version", event.version),
        ):
            if value is not None:
                headers[name] = value
        body = event.to_json() if self.config.payload == "envelope" else orjson.dumps(event.data)
        return aio_pika.Message(
            body,
            headers=headers,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.key,
            type=event.type,
        )

    async def deliver(self, event: Event) -> None:
        [err] = await self.deliver_batch([event])
        if err is not None:
            raise err

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        """Publish all (in order, on one channel), then collect the confirms: done only with the broker's ack."""
        exchange = await self._sink_exchange()
        pending = [
            asyncio.ensure_future(
                exchange.publish(
                    self._message(ev),
                    self._template.render(ev),
                    mandatory=self.config.mandatory,
                    timeout=self.config.publish_timeout,
                )
            )
            for ev in events
        ]
        results: list[BaseException | None] = []
        for ev, fut in zip(events, pending, strict=True):
            key = self._template.render(ev)
            try:
                await fut
                results.append(None)
            except aio_pika.exceptions.PublishError as e:
                results.append(
                    PermanentError(
                        f"RabbitMQ returned {ev.key} as unroutable: {e.args[0] if e.args else e} "
                        f"(exchange {self.config.exchange!r}, routing key {key!r}): bind a queue, "
                        "or set mandatory = false if dropping it is intended"
                    )
                )
            except aio_pika.exceptions.DeliveryError as e:
                results.append(RetryableError(f"RabbitMQ did not confirm {ev.key}: {e}"))
            except TimeoutError:
                results.append(
                    RetryableError(f"no publisher confirm for {ev.key} within {self.config.publish_timeout:g} s")
                )
            except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError, OSError, RuntimeError) as e:
                results.append(RetryableError(f"RabbitMQ publish of {ev.key} failed: {type(e).__name__}: {e}"))
        return results

    # --- source ---------------------------------------------------------------------------------

    async def stream(self, position: Any) -> AsyncIterator[StreamBatch]:
        c = self.config
        assert c.queue is not None
        self._count = int(position or 0)
        conn = await self._connect()
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage | BaseException] = asyncio.Queue()
        arrived = asyncio.Event()  # a wake-up only: waiting on it with a timeout can never lose a message

        def lost(_: object, exc: BaseException | None = None) -> None:
            inbox.put_nowait(RetryableError(f"RabbitMQ connection lost: {exc or 'closed'}"))
            arrived.set()

        try:
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
            channel.close_callbacks.add(lost)
            await channel.set_qos(prefetch_count=c.prefetch)
            queue = await self._queue_on(channel)
            dlx = (
                await self._exchange_on(channel, c.dead_letter_exchange) if c.dead_letter_exchange is not None else None
            )

            async def on_message(m: aio_pika.abc.AbstractIncomingMessage) -> None:
                inbox.put_nowait(m)
                arrived.set()

            await queue.consume(on_message, no_ack=False)
            while True:
                first = await inbox.get()
                if isinstance(first, BaseException):
                    raise first
                msgs = [first]
                deadline = asyncio.get_running_loop().time() + c.batch_wait
                while len(msgs) < c.batch:
                    if inbox.empty():
                        left = deadline - asyncio.get_running_loop().time()
                        if left <= 0:
                            break
                        arrived.clear()
                        await wait_event(arrived, left)  # not wait_for: it can lose a reload's cancel
                        if inbox.empty():
                            break
                    nxt = inbox.get_nowait()
                    if isinstance(nxt, BaseException):
                        raise nxt  # the unacked ones are redelivered on the next connection
                    msgs.append(nxt)
                yield self._batch(msgs, dlx)
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise PermanentError(f"queue {c.queue!r} does not exist (declare it, or set declare_queue): {e}") from None
        except aiormq.exceptions.ChannelAccessRefused as e:
            raise AuthError(f"RabbitMQ refused access to queue {c.queue!r}: {e}") from None
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError, OSError) as e:
            raise RetryableError(f"RabbitMQ consumer failed: {type(e).__name__}: {e}") from None
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _queue_on(self, channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
        c = self.config
        assert c.queue is not None
        d = c.declare_queue
        if d is None:
            return await channel.get_queue(c.queue, ensure=True)
        exchange = await self._exchange_on(channel, c.exchange) if d.bind else None
        args: dict[str, Any] = {"x-queue-type": d.type}
        if d.dead_letter_exchange is not None:
            args["x-dead-letter-exchange"] = d.dead_letter_exchange
        if d.delivery_limit is not None:
            args["x-delivery-limit"] = d.delivery_limit
        queue = await channel.declare_queue(c.queue, durable=True, arguments=args)
        if exchange is not None:
            for key in d.bind:
                await queue.bind(exchange, key)
        return queue

    def _batch(
        self, msgs: list[aio_pika.abc.AbstractIncomingMessage], dlx: aio_pika.abc.AbstractExchange | None
    ) -> StreamBatch:
        events: list[Event] = []
        rejected: list[Rejected] = []
        bad: dict[int, str] = {}
        for i, m in enumerate(msgs):
            try:
                events.append(self._event(m))
            except PayloadError as e:
                reason = f"AMQP message {m.message_id or '(no message_id)'} from queue {self.config.queue}: {e}"
                bad[i] = reason
                rejected.append(
                    Rejected(
                        reason,
                        {
                            "queue": str(self.config.queue),
                            "routing_key": str(m.routing_key),
                            "message_id": str(m.message_id or ""),
                            "body": m.body[:BODY_EXCERPT].decode(errors="replace"),
                        },
                    )
                )
        self._count += len(msgs)
        return StreamBatch(events, self._count, token=(msgs, bad, dlx), rejected=rejected)

    def _event(self, m: aio_pika.abc.AbstractIncomingMessage) -> Event:
        headers = {k: v for k, v in (m.headers or {}).items() if isinstance(v, str)}
        return message_event(
            m.body,
            source=self.ctx.name,
            format=self.config.format,
            message_id=m.message_id if self.config.dedup == "message_id" else None,
            # Without a message_id the content is the identity: a redelivery is then the same event.
            fallback_id=lambda: content_id(str(m.routing_key), m.body),
            type=headers.get("integrand-type") or m.type or str(m.routing_key),
            entity=headers.get("integrand-entity"),
            entity_id=headers.get("integrand-entity-id"),
            version=headers.get("integrand-version"),
            meta={"amqp": {"queue": self.config.queue, "routing_key": m.routing_key, "exchange": m.exchange}},
        )

    async def ack(self, batch: StreamBatch) -> None:
        msgs, bad, dlx = batch.token
        try:
            if not bad and msgs:
                # One basic.ack with `multiple` for the whole batch: its delivery tags are the channel's
                # oldest unacked ones (batches are settled in order), so nothing later is acked with them.
                await msgs[-1].ack(multiple=True)
                return
            for i, m in enumerate(msgs):
                if i not in bad:
                    await m.ack()
                elif dlx is not None:
                    # Dead-lettered by us, with the reason in a header, confirmed, and only then acked.
                    headers = {**(m.headers or {}), REASON_HEADER: bad[i]}
                    out = aio_pika.Message(
                        m.body,
                        headers=headers,
                        content_type=m.content_type,
                        message_id=m.message_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    )
                    await dlx.publish(out, self.config.dead_letter_routing_key or str(m.routing_key), mandatory=False)
                    await m.ack()
                else:
                    await m.reject(requeue=False)  # the queue's own dead-letter exchange, if it has one
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError, OSError, RuntimeError) as e:
            # Committed already: what was not acked comes back and is absorbed by the event ids.
            raise RetryableError(f"RabbitMQ ack failed: {type(e).__name__}: {e}") from None
