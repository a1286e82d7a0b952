"""The ``salesforce-cdc`` connector: Change Data Capture over the Pub/Sub API, as an integrand streaming source.

One pull-based ``Subscribe`` per source (``grpc.aio``): integrand commits each batch's events with
the last ``replay_id`` as the stream position, and only then asks for more (``num_requested``, at
most 100 at a time), so a crash between receipt and commit means those events come again and dedup
absorbs them. Keepalive batches move the position without events. A replay id the bus no longer has
(72-hour retention) or cannot read ends the call with ``…replayid.corrupted``: that is
``PositionLost``, and the resync re-reads every configured object through ``queryAll`` and resumes
from the earliest retained event (older versions are dropped by integrand's entity table), logged,
never a silent gap. Gap events are completed by fetching the records; ``GAP_OVERFLOW`` resyncs its
object. Changes whose ``changeOrigin`` names this connector's ``client_name`` are integrand's own
writes and are not emitted (the loop guard).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from integrand.connector import (
    AuthError,
    Event,
    PermanentError,
    PositionLost,
    RetryableError,
    StreamBatch,
    StreamingSource,
    content_id,
)

from .cdc import Change, Schema, b64, changes, unb64
from .connector import SalesforceConnector
from .pubsub import GET_SCHEMA, SUBSCRIBE
from .pubsub import pubsub_api_pb2 as pb

REPLAY_LOST = ("replayid.corrupted", "replayid.invalid", "replay.id.validation")
OVERFLOW = "GAP_OVERFLOW:"


class SalesforceCDC(SalesforceConnector, StreamingSource):
    """Salesforce Change Data Capture through the Pub/Sub API (plus everything the salesforce connector does)."""

    _requests: asyncio.Queue[pb.FetchRequest | None] | None = None
    echoes_skipped = 0

    async def start(self) -> None:
        await super().start()
        self._schemas: dict[str, Schema] = {}

    def _channel(self) -> grpc.aio.Channel:
        c = self.config
        if c.pubsub_tls:
            return grpc.aio.secure_channel(c.pubsub_url, grpc.ssl_channel_credentials())
        return grpc.aio.insecure_channel(c.pubsub_url)

    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        session = await self.sessions.session(self.ctx.http)
        org = self.config.org_id or session.org_id
        if not org:
            raise PermanentError("set org_id: the Pub/Sub API needs the org id (tenantid) on every call")
        return (("accesstoken", session.access_token), ("instanceurl", session.instance_url), ("tenantid", org))

    async def stream(self, position: Any) -> AsyncIterator[StreamBatch]:
        """Subscribe from ``position`` (``{"replay_id": base64}``; None or a preset on the first run / after a resync)."""
        c = self.config
        md = await self._metadata()
        first = pb.FetchRequest(topic_name=c.cdc_topic, num_requested=c.cdc_batch)
        replay = position.get("replay_id") if isinstance(position, dict) else None
        preset = position.get("preset") if isinstance(position, dict) else None
        if replay:
            try:
                first.replay_id = unb64(str(replay))
            except ValueError:
                raise PositionLost(f"stored replay id {replay!r} is not base64", position=position) from None
            first.replay_preset = pb.CUSTOM
        elif (preset or c.cdc_start) == "earliest":
            first.replay_preset = pb.EARLIEST
        else:
            first.replay_preset = pb.LATEST
        queue: asyncio.Queue[pb.FetchRequest | None] = asyncio.Queue()
        queue.put_nowait(first)
        self._requests = queue

        async def requests() -> AsyncIterator[pb.FetchRequest]:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item

        channel = self._channel()
        subscribe = channel.stream_stream(
            SUBSCRIBE,
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=pb.FetchResponse.FromString,
        )
        call = subscribe(requests(), metadata=md)
        try:
            async for resp in call:
                if resp.events:
                    events: list[Event] = []
                    for ce in resp.events:
                        events += await self._decode(ce, channel, md)
                    yield StreamBatch(events, {"replay_id": b64(resp.events[-1].replay_id)}, token=len(resp.events))
                elif resp.latest_replay_id:
                    yield StreamBatch([], {"replay_id": b64(resp.latest_replay_id)}, token=0)
        except grpc.aio.AioRpcError as e:
            raise await self._rpc_error(e, position) from None
        finally:
            queue.put_nowait(None)
            call.cancel()
            await channel.close()
            self._requests = None

    async def ack(self, batch: StreamBatch) -> None:
        """After the commit: ask for as many events as were just stored (flow control, ≤ 100 at a time)."""
        n = int(batch.token or 0)
        if n and self._requests is not None:
            self._requests.put_nowait(pb.FetchRequest(num_requested=min(n, self.config.cdc_batch)))

    async def _rpc_error(self, e: grpc.aio.AioRpcError, position: Any) -> Exception:
        trailers = dict(e.trailing_metadata() or ())
        code = str(trailers.get("error-code", ""))
        msg = f"Pub/Sub API {e.code().name}: {e.details()} (error-code {code or 'none'})"
        if any(k in code for k in REPLAY_LOST):
            return PositionLost(msg, position=position, detail=code)
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            session = await self.sessions.session(self.ctx.http)
            await self.sessions.renew(self.ctx.http, stale=session)
            return RetryableError(msg + "; obtained a new session")
        if e.code() == grpc.StatusCode.PERMISSION_DENIED:
            return AuthError(msg)
        if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            return PermanentError(msg)
        return RetryableError(msg)

    async def _schema(self, schema_id: str, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]) -> Schema:
        schema = self._schemas.get(schema_id)
        if schema is None:
            get = channel.unary_unary(
                GET_SCHEMA,
                request_serializer=pb.SchemaRequest.SerializeToString,
                response_deserializer=pb.SchemaInfo.FromString,
            )
            info = await get(pb.SchemaRequest(schema_id=schema_id), metadata=md)
            schema = self._schemas[schema_id] = Schema(info.schema_json)
        return schema

    async def _decode(
        self, ce: pb.ConsumerEvent, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]
    ) -> list[Event]:
        schema = await self._schema(ce.event.schema_id, channel, md)
        try:
            record = schema.decode(ce.event.payload)
        except Exception as e:
            raise PermanentError(
                f"cannot decode change event {b64(ce.replay_id)} with schema {ce.event.schema_id}: {e}"
            ) from None
        replay = b64(ce.replay_id)
        try:
            found = changes(schema, record)
            for ch in found:
                _ = ch.version  # commitTimestamp as a time: far out of range is as malformed as bad Avro
        except (ValueError, OverflowError, OSError, TypeError) as e:
            raise PermanentError(
                f"cannot read change event {replay} with schema {ce.event.schema_id}: {type(e).__name__}: {e}"
            ) from None
        out: list[Event] = []
        gaps: list[tuple[int, Event]] = []
        for ch in found:
            if ch.change_type == "GAP_OVERFLOW":
                raise PositionLost(
                    f"GAP_OVERFLOW for {ch.entity}: too many changes in one transaction to report; resyncing {ch.entity}",
                    position={"replay_id": replay},
                    detail=OVERFLOW + ch.entity,
                )
            origin = str(ch.header.get("changeOrigin") or "")
            if self.config.client_name and f"client={self.config.client_name}" in origin:
                self.echoes_skipped += 1
                self.log.debug(
                    "skipping %s %s %s: integrand's own write (%s)", ch.entity, ch.record_id, ch.change_type, origin
                )
                continue
            ev = self._event(ch, replay)
            if ch.gap and ch.verb != "deleted":
                gaps.append((len(out), ev))
            out.append(ev)
        if gaps:
            # Gap events carry no usable field values: read the records as they are now.
            fetched = await self.fetch_many([ev for _, ev in gaps])
            for (i, _), res in zip(gaps, fetched, strict=True):
                if isinstance(res, BaseException):
                    raise res
                out[i] = res
        return out

    def _event(self, ch: Change, replay: str) -> Event:
        deleted = ch.verb == "deleted"
        h = ch.header
        return Event(
            id=content_id("cdc", replay, ch.record_id),
            source=self.ctx.name,
            type=f"{ch.entity.lower()}.{ch.verb}",
            data={"Id": ch.record_id, "IsDeleted": True} if deleted else ch.data,
            entity=ch.entity,
            entity_id=ch.record_id,
            version=ch.version,
            occurred_at=ch.version,
            meta={
                "via": "cdc",
                "change_type": ch.change_type,
                "changed_fields": ch.changed,
                "transaction_key": h.get("transactionKey"),
                "sequence_number": h.get("sequenceNumber"),
                "commit_number": h.get("commitNumber"),
                "change_origin": h.get("changeOrigin"),
                "replay_id": replay,
                **({"deleted": True} if deleted else {}),
                **({"gap": True} if ch.gap else {}),
            },
        )

    async def resync(self, lost: PositionLost) -> AsyncIterator[StreamBatch]:
        """Re-read the objects (or the overflowed one) in full through ``queryAll``, then resume.

        After an expired or corrupted replay id the stream resumes from the earliest retained event:
        events older than the snapshot carry older versions and integrand's entity table drops them.
        After ``GAP_OVERFLOW`` it resumes right after the overflow event.
        """
        overflow = lost.detail[len(OVERFLOW) :] if lost.detail and lost.detail.startswith(OVERFLOW) else None
        objects = [overflow] if overflow else list(self.config.objects)
        resume: dict[str, Any] = (
            lost.position if overflow and isinstance(lost.position, dict) else {"preset": "earliest"}
        )
        self.log.warning(
            "Salesforce CDC: %s; full resync of %s from queryAll, then resuming at %s", lost, ", ".join(objects), resume
        )
        for obj in objects:
            cursor: Any = {"object": obj}
            while True:
                page = await self._reconcile_one(obj, cursor)
                events, cursor, more = page
                yield StreamBatch(events, resume)
                if not more:
                    break

    async def _reconcile_one(self, obj: str, cursor: Any) -> tuple[list[Event], Any, bool]:
        """One queryAll page of ``obj`` as current-state events (deleted rows as deletions)."""
        if cursor.get("url"):
            body = await self.query_page(None, str(cursor["url"]), all_rows=True)
        else:
            body = await self.query_page(
                f"SELECT {self.select(obj)} FROM {obj} ORDER BY SystemModstamp, Id", None, all_rows=True
            )
        events = [self.record_event(obj, r, "resync") for r in body["records"]]
        if not body.get("done", True) and body.get("nextRecordsUrl"):
            return events, {"object": obj, "url": body["nextRecordsUrl"]}, True
        return events, None, False
