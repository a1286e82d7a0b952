"""A local Pub/Sub API (gRPC) over a FakeSalesforce org: Change Data Capture as Salesforce publishes it.

- ``Subscribe`` (bidirectional, pull-based): the first ``FetchRequest`` names the topic and the replay
  preset (LATEST, EARLIEST, CUSTOM with ``replay_id``); the server sends at most as many events as
  requested so far (``num_requested`` ≤ 100 per request) and reports ``pending_num_requested``; with
  nothing to send it answers an empty batch with ``latest_replay_id`` (a keepalive);
- ``GetSchema`` / ``GetTopic``; payloads are Avro (fastavro) written with the topic's schema;
- metadata ``accesstoken``, ``instanceurl``, ``tenantid`` checked on every call against the org's
  sessions (``UNAUTHENTICATED`` otherwise);
- events kept ``retention`` (72 h) on the org's clock: a replay id older than that, or one that is not
  a replay id at all, ends the call with the trailer ``error-code:
  sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted``;
- changes through the REST API carry ``changeOrigin`` ``com/salesforce/api/rest/<v>;client=<id>``
  when the client sent ``Sforce-Call-Options: client=<id>``; ``publish_gap`` and ``publish_overflow``
  emit gap events; ``disconnect()`` drops every open stream (UNAVAILABLE).

(Reference: pubsub_api.proto; third-party-apis.md "Pub/Sub API"; Salesforce Pub/Sub API guide:
"Event Message Durability", "Retry Long-Lived RPC Calls After an Error Occurs".)
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import fastavro
import grpc
import orjson

from .cdc import bitmap
from .fake import CHANGE_ORIGIN, FakeSalesforce
from .pubsub import SERVICE
from .pubsub import pubsub_api_pb2 as pb

RETENTION = 72 * 3600.0
REPLAY_CORRUPTED = "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"
AUTH_ERROR = "sfdc.platform.eventbus.grpc.service.auth.error"
CHANGE_TYPES = [
    "CREATE",
    "UPDATE",
    "DELETE",
    "UNDELETE",
    "GAP_CREATE",
    "GAP_UPDATE",
    "GAP_DELETE",
    "GAP_UNDELETE",
    "GAP_OVERFLOW",
]


def change_event_schema(sobject: str, fields: list[str]) -> dict[str, Any]:
    """An Avro schema shaped like Salesforce's ``<Object>ChangeEvent`` (header first, nullable fields)."""
    header = {
        "type": "record",
        "name": "ChangeEventHeader",
        "namespace": "com.sforce.eventbus",
        "fields": [
            {"name": "entityName", "type": "string"},
            {"name": "recordIds", "type": {"type": "array", "items": "string"}},
            {"name": "changeType", "type": {"type": "enum", "name": "ChangeType", "symbols": CHANGE_TYPES}},
            {"name": "changeOrigin", "type": "string"},
            {"name": "transactionKey", "type": "string"},
            {"name": "sequenceNumber", "type": "int"},
            {"name": "commitTimestamp", "type": "long"},
            {"name": "commitNumber", "type": "long"},
            {"name": "commitUser", "type": "string"},
            {"name": "nulledFields", "type": {"type": "array", "items": "string"}},
            {"name": "diffFields", "type": {"type": "array", "items": "string"}},
            {"name": "changedFields", "type": {"type": "array", "items": "string"}},
        ],
    }
    body = [{"name": f, "type": ["null", "string"], "default": None} for f in fields]
    return {
        "type": "record",
        "name": f"{sobject}ChangeEvent",
        "namespace": "com.sforce.eventbus",
        "fields": [{"name": "ChangeEventHeader", "type": header}, *body],
    }


@dataclass
class Stored:
    replay: int
    schema_id: str
    payload: bytes
    at: float
    entity: str


class FakePubSub:
    """The Pub/Sub API of ``org``: ``enable(sobject, fields)`` turns on CDC for an object."""

    def __init__(self, org: FakeSalesforce, *, keepalive: float = 0.5, retention: float = RETENTION):
        self.org = org
        self.keepalive = keepalive
        self.retention = retention
        self.schemas: dict[str, str] = {}  # schema id → JSON
        self.by_entity: dict[str, tuple[str, list[str], Any]] = {}  # sobject → (schema id, fields, parsed)
        self.log: list[Stored] = []
        self.subscribes = 0
        self.requested: list[int] = []
        self._replay = itertools.count(1000, 7)  # not contiguous, as Salesforce's are not
        self._commit = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._streams: set[asyncio.Event] = set()
        self._new = asyncio.Event()
        self.target = ""
        org.on_change.append(self._on_change)

    # --- publishing ----------------------------------------------------------------------------

    def enable(self, sobject: str, fields: list[str]) -> None:
        schema = change_event_schema(sobject, fields)
        raw = orjson.dumps(schema).decode()
        sid = hashlib.sha256(raw.encode()).hexdigest()[:22]
        self.schemas[sid] = raw
        self.by_entity[sobject] = (sid, [f["name"] for f in schema["fields"]], fastavro.parse_schema(schema))

    def _on_change(
        self, sobject: str, rid: str, ctype: str, rec: dict[str, Any], changed: list[str], nulled: list[str]
    ) -> None:
        if sobject in self.by_entity:
            self.publish(sobject, [rid], ctype, rec, changed, nulled, origin=CHANGE_ORIGIN.get())

    def publish(
        self,
        sobject: str,
        ids: list[str],
        change_type: str,
        values: dict[str, Any] | None = None,
        changed: list[str] | None = None,
        nulled: list[str] | None = None,
        *,
        origin: str = "",
        transaction: str | None = None,
        sequence: int = 1,
    ) -> int:
        """One change event (several ids = several records changed the same way); returns its replay number."""
        sid, fields, parsed = self.by_entity[sobject]
        header = {
            "entityName": sobject,
            "recordIds": ids,
            "changeType": change_type,
            "changeOrigin": origin,
            "transactionKey": transaction or secrets.token_hex(8),
            "sequenceNumber": sequence,
            "commitTimestamp": int(self.org.clock() * 1000),
            "commitNumber": next(self._commit),
            "commitUser": "0055g00000FAKEUSER",
            "nulledFields": bitmap(fields, nulled or []),
            "diffFields": [],
            "changedFields": bitmap(fields, changed or []),
        }
        record: dict[str, Any] = {"ChangeEventHeader": header}
        for f in fields[1:]:
            v = (values or {}).get(f)
            record[f] = None if v is None else str(v)
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, record)
        n = next(self._replay)
        self.log.append(Stored(n, sid, buf.getvalue(), self.org.clock(), sobject))
        self._new.set()
        return n

    def publish_gap(self, sobject: str, ids: list[str], change_type: str = "GAP_UPDATE") -> int:
        """A gap event: Salesforce could not build the change event; only ids and the header are right."""
        return self.publish(sobject, ids, change_type)

    def expire_events(self) -> None:
        """Everything published so far falls out of retention (as 72 hours passing would do)."""
        self.log.clear()

    def disconnect(self) -> None:
        """Every open Subscribe stream ends with UNAVAILABLE (a network drop, a server restart)."""
        for ev in list(self._streams):
            ev.set()

    # --- serving ---------------------------------------------------------------------------------

    async def start(self) -> str:
        self._server = grpc.aio.server()
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Subscribe": grpc.stream_stream_rpc_method_handler(
                self._subscribe,
                request_deserializer=pb.FetchRequest.FromString,
                response_serializer=pb.FetchResponse.SerializeToString,
            ),
            "GetSchema": grpc.unary_unary_rpc_method_handler(
                self._get_schema,
                request_deserializer=pb.SchemaRequest.FromString,
                response_serializer=pb.SchemaInfo.SerializeToString,
            ),
            "GetTopic": grpc.unary_unary_rpc_method_handler(
                self._get_topic,
                request_deserializer=pb.TopicRequest.FromString,
                response_serializer=pb.TopicInfo.SerializeToString,
            ),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.target = f"127.0.0.1:{port}"
        return self.target

    async def stop(self) -> None:
        if self._server is not None:
            self.disconnect()
            await self._server.stop(0.2)
            self._server = None

    async def _auth(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        token = md.get("accesstoken")
        sess = self.org.sessions.get(str(token)) if token else None
        if sess is None or sess.expires_at <= self.org.clock():
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "Invalid session", trailing_metadata=(("error-code", AUTH_ERROR),)
            )
        if str(md.get("tenantid", ""))[:15] != self.org.org_id[:15]:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "tenantid does not match the session's org",
                trailing_metadata=(("error-code", AUTH_ERROR),),
            )

    def _topic_entities(self, topic: str) -> set[str] | None:
        if topic == "/data/ChangeEvents":
            return set(self.by_entity)
        if topic.startswith("/data/") and topic.endswith("ChangeEvent"):
            name = topic[len("/data/") : -len("ChangeEvent")]
            return {name} if name in self.by_entity else None
        return None

    def _retained(self) -> list[Stored]:
        floor = self.org.clock() - self.retention
        self.log = [s for s in self.log if s.at >= floor]
        return self.log

    async def _get_schema(
        self, request: pb.SchemaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SchemaInfo:
        await self._auth(context)
        raw = self.schemas.get(request.schema_id)
        if raw is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no schema {request.schema_id}")
        return pb.SchemaInfo(schema_json=raw, schema_id=request.schema_id, rpc_id=secrets.token_hex(8))

    async def _get_topic(self, request: pb.TopicRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.TopicInfo:
        await self._auth(context)
        if self._topic_entities(request.topic_name) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no topic {request.topic_name}")
        return pb.TopicInfo(topic_name=request.topic_name, tenant_guid=self.org.org_id, can_subscribe=True)

    async def _subscribe(
        self, requests: AsyncIterator[pb.FetchRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.FetchResponse]:
        await self._auth(context)
        first = await requests.__anext__()
        entities = self._topic_entities(first.topic_name)
        if entities is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown topic {first.topic_name}")
        assert entities is not None
        retained = self._retained()
        if first.replay_preset == pb.CUSTOM:
            raw = first.replay_id
            n = int.from_bytes(raw, "big") if len(raw) == 8 else -1
            if n < 0 or not retained or n < retained[0].replay - 7 or n > (retained[-1].replay if retained else 0):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "The Replay ID validation failed",
                    trailing_metadata=(("error-code", REPLAY_CORRUPTED),),
                )
            after = n
        elif first.replay_preset == pb.EARLIEST:
            after = retained[0].replay - 1 if retained else 0
        else:
            after = retained[-1].replay if retained else 0
        pending = [min(first.num_requested, 100)]
        self.requested.append(first.num_requested)
        self.subscribes += 1  # established: its start position is fixed (tests wait on this, not on the call)
        wake = asyncio.Event()
        dropped = asyncio.Event()
        self._streams.add(dropped)

        async def read_more() -> None:
            async for req in requests:
                self.requested.append(req.num_requested)
                pending[0] += min(req.num_requested, 100)
                wake.set()

        reader = asyncio.create_task(read_more())
        try:
            while True:
                if dropped.is_set():
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection dropped")
                ready = [s for s in self._retained() if s.replay > after and s.entity in entities]
                if ready and pending[0] > 0:
                    batch = ready[: pending[0]]
                    pending[0] -= len(batch)
                    after = batch[-1].replay
                    yield pb.FetchResponse(
                        events=[
                            pb.ConsumerEvent(
                                event=pb.ProducerEvent(
                                    id=secrets.token_hex(8), schema_id=s.schema_id, payload=s.payload
                                ),
                                replay_id=s.replay.to_bytes(8, "big"),
                            )
                            for s in batch
                        ],
                        latest_replay_id=after.to_bytes(8, "big"),
                        rpc_id=secrets.token_hex(8),
                        pending_num_requested=pending[0],
                    )
                    continue
                self._new.clear()
                wake.clear()
                waits = [asyncio.ensure_future(e.wait()) for e in (self._new, wake, dropped)]
                done, rest = await asyncio.wait(waits, timeout=self.keepalive, return_when=asyncio.FIRST_COMPLETED)
                for w in rest:
                    w.cancel()
                if not done:
                    # Nothing to send: a keepalive naming the latest position, which never passes an event
                    # of this topic that was not delivered yet (the client may store it).
                    undelivered = [s for s in self._retained() if s.replay > after and s.entity in entities]
                    tip = self.log[-1].replay if self.log and not undelivered else after
                    yield pb.FetchResponse(
                        latest_replay_id=max(after, tip).to_bytes(8, "big"), pending_num_requested=pending[0]
                    )
        finally:
            self._streams.discard(dropped)
            reader.cancel()
