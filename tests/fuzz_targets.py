"""Fuzz targets: bytes in, and either a clean refusal or a clean result out — never anything else.

Each target takes arbitrary bytes (from atheris in ``bench/fuzz.py``, from hypothesis in
``tests/test_fuzz.py``, or from the corpus in ``tests/fuzz_corpus/<target>/`` replayed by
``make test``) and raises ``Finding`` (or lets an unexpected exception through) when a property breaks:

- ``webhook``: every built-in webhook scheme, http-poll's and each plugin's webhook parser: verify and
  parse either succeed or raise WebhookRejected with a status under 500, and what parses is storable
  or refused by the listener's check (the store is never handed what it cannot serialise);
- ``config``: the TOML config loader raises only ConfigError (one message per problem, with its key);
- ``mapping``: a route's field mapping on arbitrary event data returns a record or raises MappingError;
- ``listing``: http-poll's reading of a listing page yields events or an IntegrandError (retry, give up);
- ``outbound``: Salesforce Outbound Messages (SOAP): fuzz bytes spliced into a real envelope's ids, types,
  field names and values (raw, so they can break the XML too), through the connector's verify and parse;
- ``cdc``: Salesforce Change Data Capture: fuzz bytes as an Avro payload of a change-event schema,
  through the CDC source's decoding: events, or a PermanentError naming the event;
- ``nats`` / ``amqp``: a broker message (headers, body) through each streaming source's reading, in
  every ``format``: an event the store accepts, or the message is rejected (never a poison batch);
- ``pgoutput``: PostgreSQL logical decoding messages (after a real Relation message) through the
  decoder: transactions, or one PgoutputError saying what is malformed;
- ``outbox``: an outbox row (op, table, before/after JSON) through the outbox source: a storable event
  or a rejection;
- ``http``: the raw bytes are an HTTP request for a running daemon (replayed in test_fuzz.py).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import tomllib
from pathlib import Path
from typing import Any

from multidict import CIMultiDict

from integrand import signing
from integrand.config import parse_config
from integrand.connector import (
    ConnectorConfig,
    ConnectorContext,
    Event,
    PayloadError,
    WebhookRequest,
    WebhookSource,
)
from integrand.errors import ConfigError, WebhookRejected
from integrand.listener import unstorable
from integrand.plugins import Registry
from integrand.routes import MappingError, RouteSettings, load_mapping

CORPUS = Path(__file__).parent / "fuzz_corpus"
SECRET = "whsec_" + base64.b64encode(b"fuzz-key-of-twenty-four-bytes!!").decode()
HMAC_SECRET = "fuzz-hmac-secret"
NOW = 1_700_000_000.0


class Finding(AssertionError):
    """A property broke on this input."""


class _NoState:
    async def get(self, key: str) -> Any:
        return None

    async def set(self, key: str, value: Any) -> None:
        return None


def _connector(cls: type[Any], cfg: dict[str, Any]) -> WebhookSource:
    config: ConnectorConfig = cls.Config.model_validate(cfg, context={"base_dir": Path(".")})
    ctx = ConnectorContext(name="fuzz", role="source", base_dir=Path("."), state=_NoState())
    inst = cls(config, ctx)
    assert isinstance(inst, WebhookSource)
    return inst


@functools.cache
def webhook_sources() -> list[tuple[str, WebhookSource]]:
    from integrand.builtin.httppoll import HttpPollSource
    from integrand.builtin.webhook import WebhookConnector

    out = [
        ("standard", _connector(WebhookConnector, {"signature": "standard-webhooks", "secret": SECRET})),
        ("stripe", _connector(WebhookConnector, {"signature": "stripe", "secret": HMAC_SECRET})),
        ("github", _connector(WebhookConnector, {"signature": "github", "secret": HMAC_SECRET})),
        ("shopify", _connector(WebhookConnector, {"signature": "shopify", "secret": HMAC_SECRET})),
        (
            "hmac",
            _connector(
                WebhookConnector,
                {
                    "signature": "hmac-sha256",
                    "secret": HMAC_SECRET,
                    "timestamp_header": "X-Ts",
                    "id_header": "X-Id",
                    "entity_field": "a.b",
                    "entity_id_field": "a.c.0",
                    "version_field": "v",
                    "type_field": "t",
                },
            ),
        ),
        ("none", _connector(WebhookConnector, {"signature": "none", "allow_unsigned": True, "type_field": "x.y"})),
        (
            "http-poll",
            _connector(
                HttpPollSource,
                {
                    "url": "http://127.0.0.1:1/r?since={since}",
                    "webhook": {"signature": "github", "secret": HMAC_SECRET},
                },
            ),
        ),
    ]
    for name, dotted, cfg in PLUGINS:
        try:
            module, _, attr = dotted.partition(":")
            cls = getattr(__import__(module, fromlist=[attr]), attr)
        except ImportError:  # pragma: no cover - every plugin is installed by make install
            continue
        out.append((name, _connector(cls, cfg)))
    return out


ORG_ID = "00D5g000004FUZZAAA"
SF_CONFIG = {
    "auth": "client_credentials",
    "client_id": "id",
    "client_secret": "secret",
    "my_domain_url": "https://fuzz.my.salesforce.com",
    "org_id": ORG_ID,
}
PLUGINS = [
    ("salesforce", "integrand_salesforce:SalesforceConnector", SF_CONFIG),
    ("hubspot", "integrand_hubspot.connector:HubSpotConnector", {"client_secret": HMAC_SECRET}),
    (
        "quickbooks",
        "integrand_quickbooks.connector:QuickBooksConnector",
        {
            "realm_id": "1",
            "client_id": "id",
            "client_secret": "secret",
            "token_key": "ZmVybmV0LWtleS1mb3ItZnV6emluZy0wMTIzNDU2Nzg=",
            "verifier_token": HMAC_SECRET,
        },
    ),
]

CONTENT_TYPES = [
    "application/json",
    "application/cloudevents+json",
    "text/plain",
    "",
    "application/x-www-form-urlencoded",
]


def split_request(data: bytes) -> tuple[str, CIMultiDict[str], bytes]:
    """Fuzz bytes as (content type, headers, body): byte 0 picks the type, header lines up to a blank line."""
    ct = CONTENT_TYPES[data[0] % len(CONTENT_TYPES)] if data else ""
    head, sep, body = data[1:].partition(b"\n\n")
    if not sep:
        head, body = b"", data[1:]
    headers: CIMultiDict[str] = CIMultiDict()
    for line in head.split(b"\n"):
        k, colon, v = line.partition(b":")
        if colon and k.strip():
            # As aiohttp hands them over: undecodable bytes kept as surrogates.
            headers.add(k.strip().decode("utf-8", "surrogateescape"), v.strip().decode("utf-8", "surrogateescape"))
    return ct, headers, body


def _signed(name: str, headers: CIMultiDict[str], body: bytes) -> CIMultiDict[str]:
    """The same request with a valid signature for ``name``'s scheme, so parse sees fuzzed bodies and ids."""
    h = headers.copy()
    ts = int(NOW)
    msg_id = h.get("webhook-id", "msg")
    try:
        if name == "standard":
            h["webhook-id"], h["webhook-timestamp"] = msg_id, str(ts)
            h["webhook-signature"] = signing.standard_sign(SECRET, msg_id, ts, body)
        elif name == "stripe":
            h["Stripe-Signature"] = signing.stripe_sign(HMAC_SECRET, ts, body)
        elif name in ("github", "http-poll"):
            h["X-Hub-Signature-256"] = signing.github_sign(HMAC_SECRET, body)
        elif name == "shopify":
            h["X-Shopify-Hmac-Sha256"] = signing.hmac_sign(HMAC_SECRET, body, encoding="base64")
        elif name == "hmac":
            h["X-Ts"] = str(ts)
            h["X-Signature"] = signing.hmac_sign(HMAC_SECRET, body, timestamp=ts)
    except UnicodeError:
        pass  # an undecodable id cannot be signed; the unsigned request is still tried
    return h


def _one(source: WebhookSource, name: str, ct: str, headers: CIMultiDict[str], body: bytes) -> None:
    req = WebhookRequest(
        source="fuzz",
        method="POST",
        url="http://127.0.0.1/hooks/fuzz",
        headers=headers,
        body=body,
        received_at="2023-11-14T22:13:20.000000Z",
        content_type=ct,
        remote="127.0.0.1",
    )
    try:
        source.verify(req, NOW)
        events = source.parse(req)
    except WebhookRejected as e:
        if not 400 <= e.status < 500:
            raise Finding(f"{name}: refused with {e.status}") from e
        return
    except UnicodeError:
        return  # the listener answers 400 "a header the signature covers is not valid UTF-8"
    if not isinstance(events, list) or not all(isinstance(e, Event) for e in events):
        raise Finding(f"{name}: parse returned {type(events).__name__}, not a list of events")
    if unstorable(events, body, 64) is None:
        for ev in events:
            try:
                ev.to_json()  # what the store does before queueing; a TypeError there is its UnstorableEvent (400)
            except TypeError:
                if not any(isinstance(v, str) and not _utf8(v) for v in (ev.id, ev.type, ev.entity, ev.entity_id)):
                    raise


def _utf8(v: str) -> bool:
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def webhook(data: bytes) -> None:
    ct, headers, body = split_request(data)
    for name, source in webhook_sources():
        _one(source, name, ct, headers, body)
        _one(source, name, ct, _signed(name, headers, body), body)


def config(data: bytes) -> None:
    try:
        raw = tomllib.loads(data.decode("utf-8", "replace"))
    except tomllib.TOMLDecodeError:
        return  # load_config reports it as one ConfigError line; nothing else to check
    config_dict(raw)


def config_dict(raw: dict[str, Any]) -> None:
    """The loader after TOML parsing: only ConfigError, each problem a readable line."""
    try:
        parse_config(raw, base_dir=Path("/nonexistent-fuzz"), registry=_registry())
    except ConfigError as e:
        if not e.problems or not all(isinstance(p, str) and p for p in e.problems):
            raise Finding(f"ConfigError without readable problems: {e.problems!r}") from e


@functools.cache
def _registry() -> Registry:
    """Entry points discovered once: the loader is what is fuzzed, not importlib's metadata scan per example."""
    return Registry.default()


@functools.cache
def _mapping() -> Any:
    route = RouteSettings.model_validate(
        {
            "from": "src",
            "to": ["out"],
            "map": {
                "email": {"path": "data.email", "convert": ["strip", "lower"], "required": True},
                "name": {"template": "{data.first} {data.last}", "convert": "title"},
                "age": {"path": "data.age", "convert": "int"},
                "score": {"path": "data.score", "convert": ["number"]},
                "amount": {"path": "data.amount", "convert": "float"},
                "vip": {"path": "data.vip", "convert": "bool"},
                "born": {"path": "data.born", "convert": "date"},
                "seen": {"path": "data.seen", "convert": "datetime"},
                "ms": {"path": "data.seen", "convert": "epoch_ms"},
                "tier": {"path": "data.tier", "lookup": "tiers", "default": "basic"},
                "country": {"path": "data.country", "convert": "upper", "lookup": "countries"},
                "address.city": {"path": "data.addr.city"},
                "source": {"const": "fuzz"},
            },
            "lookups": {"tiers": {"1": "gold", "2": "silver"}, "countries": {"FR": "France", "DE": "Germany"}},
        }
    )
    mapping, problems = load_mapping(route, "routes[0]")
    assert mapping is not None, problems
    return mapping


def mapping(data: bytes) -> None:
    import orjson

    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = {"email": data.decode("utf-8", "replace"), "age": data[:8].decode("latin-1"), "seen": data[:20].hex()}
    ev = Event(id="e1", source="src", type="t", data=doc)
    with contextlib.suppress(MappingError):
        _mapping().apply(ev)
    if isinstance(doc, dict):
        keys = ["email", "age", "score", "amount", "vip", "born", "seen", "tier", "country"]
        for i, k in enumerate(keys):  # each field alone, so one bad value does not hide the next
            if k in doc:
                with contextlib.suppress(MappingError):
                    _mapping().apply(Event(id=f"e{i}", source="src", type="t", data={"email": "a@b", k: doc[k]}))


@functools.cache
def _poller() -> Any:
    from integrand.builtin.httppoll import HttpPollSource

    return _connector(
        HttpPollSource,
        {
            "url": "http://127.0.0.1:1/r?since={since}",
            "items": "$.results[*]",
            "id": "$.id",
            "updated": "$.updated_at",
            "next_page": "$.next",
            "deleted": "$.archived",
        },
    )


def listing(data: bytes) -> None:
    """http-poll's reading of a listing page: events and the next page, or an IntegrandError saying why not."""
    import orjson

    from integrand.errors import IntegrandError

    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return  # _get answers RetryableError "invalid JSON" before this point
    src = _poller()
    try:
        events, _ = src._events(body)
        src._page(body)
    except IntegrandError:
        return
    for ev in events:
        ev.to_json()


# --- storability: what the store does before queueing --------------------------------------------------


def storable(ev: Event, *, alert_ok: bool = False) -> None:
    """Raise Finding unless the store accepts ``ev`` (the SQLite queue's own checks, in its order).

    ``alert_ok``: for sources with no way to set one change aside (PostgreSQL's), the store refusing that
    one event is the defined behaviour — the stream stops with an alert naming it, nothing is lost."""
    from integrand.connector import storage_problem
    from integrand.store.queue import _prepare, _serialised
    from integrand.store.records import UnstorableEvent

    why = storage_problem(ev)
    try:
        _prepare([(ev, ["out"])])
        _serialised(ev)
    except UnstorableEvent as e:
        if why is None:
            raise Finding(f"storage_problem() missed what the store refuses: {e}") from e
        if not alert_ok:
            raise Finding(f"the connector produced an event the store refuses: {e}") from e
        return
    if why is not None:
        raise Finding(f"storage_problem() refuses what the store accepts: {why}")


def _parts(data: bytes, n: int) -> list[bytes]:
    """``data`` cut at 0xff bytes into ``n`` parts (missing ones empty), so a fuzzer can aim at each."""
    parts = data.split(b"\xff", n - 1)
    return parts + [b""] * (n - len(parts))


# --- Salesforce ------------------------------------------------------------------------------------------


def outbound(data: bytes) -> None:
    """Salesforce Outbound Messages: the fuzz bytes are a notification's id, type, field name and values."""
    from integrand_salesforce.outbound import envelope

    nid, sobject, name, value, stamp, extra = _parts(data, 6)
    body = envelope(
        ORG_ID,
        "04k5g000000FUZZ",
        [("04l5g0000FUZZ01", "Contact", {"Id": "0035g00000FUZZ", "SystemModstamp": "2026-01-02T03:04:05.000Z"})],
    )
    # Raw splices (they may break the XML): the id, the sObject type, a field element, values.
    body = body.replace(b"04l5g0000FUZZ01", nid or b"04l5g0000FUZZ01", 1)
    body = body.replace(b"sf:Contact", b"sf:" + sobject if sobject else b"sf:Contact", 1)
    body = body.replace(b"2026-01-02T03:04:05.000Z", stamp or b"2026-01-02T03:04:05.000Z", 1)
    if name:
        field = b"<sf:" + name + b">" + value + b"</sf:" + name + b">"
        body = body.replace(b"</sObject>", field + b"</sObject>", 1)
    if extra:
        body = body.replace(b"</notifications>", extra + b"</notifications>", 1)
    source = dict(webhook_sources())["salesforce"]
    headers: CIMultiDict[str] = CIMultiDict({"SOAPAction": '""'})
    _one(source, "salesforce", "text/xml", headers, body)
    _one(source, "salesforce", "text/xml", headers, data)  # and the bytes alone as the body


CDC_FIELDS = ["Id", "Name", "Phone", "OwnerId"]


@functools.cache
def _cdc() -> tuple[Any, Any]:
    """The CDC source with its schema cache filled, and the parsed schema (no Pub/Sub API is reached)."""
    import orjson
    from integrand_salesforce.cdc import Schema
    from integrand_salesforce.fake_pubsub import change_event_schema
    from integrand_salesforce.streaming import SalesforceCDC

    src: Any = _connector_any(SalesforceCDC, SF_CONFIG)
    schema_json = orjson.dumps(change_event_schema("Account", CDC_FIELDS)).decode()
    src._schemas = {"fuzz-schema": Schema(schema_json)}  # what start() and GetSchema would fill

    async def fetch_many(events: Any) -> list[Any]:  # the REST read of gap events: the record as it is now
        return list(events)

    src.fetch_many = fetch_many
    return src, src._schemas["fuzz-schema"]


def cdc_payload(record: dict[str, Any]) -> bytes:
    """A record written with the fuzz schema, as Salesforce's Pub/Sub API sends it."""
    import io

    import fastavro

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, _cdc()[1].parsed, record)
    return buf.getvalue()


def cdc(data: bytes) -> None:
    """A change event payload (Avro) through the CDC source: events, or PermanentError/PositionLost naming it."""
    from integrand_salesforce.pubsub import pubsub_api_pb2 as pb

    from integrand.errors import IntegrandError

    src, _ = _cdc()
    ce = pb.ConsumerEvent(event=pb.ProducerEvent(schema_id="fuzz-schema", payload=data), replay_id=b"\x00\x01")
    coro = src._decode(ce, None, ())
    try:
        coro.send(None)  # nothing in it waits: the schema is cached and gap reads are local
    except StopIteration as done:
        events = done.value
    except IntegrandError:
        return
    else:
        coro.close()
        raise Finding("decoding a change event waited on something")
    for ev in events:
        storable(ev)


# --- brokers ---------------------------------------------------------------------------------------------


@functools.cache
def _brokers() -> list[tuple[str, Any]]:
    from integrand_amqp.connector import AmqpConnector
    from integrand_nats.connector import NatsConnector

    out: list[tuple[str, Any]] = []
    for fmt in ("auto", "json", "envelope"):
        out.append(("nats", _connector_any(NatsConnector, {"stream": "S", "durable": "d", "format": fmt})))
        out.append(("amqp", _connector_any(AmqpConnector, {"queue": "q", "format": fmt})))
    return out


class _AmqpMessage:
    """What the AMQP source reads of an incoming message (aio-pika's needs a live channel)."""

    def __init__(self, body: bytes, headers: dict[str, Any], message_id: str | None, type_: str | None):
        self.body, self.headers, self.message_id, self.type = body, headers, message_id, type_
        self.routing_key, self.exchange = "rk.fuzz", "ex"


def _broker_message(kind: str, data: bytes) -> tuple[Any, Any]:
    """(connector's message, its parse function) from fuzz bytes: header lines, a blank line, the body."""
    _, headers, body = split_request(b"\x00" + data)
    h = {k: v for k, v in headers.items() if _utf8(k) and _utf8(v)}  # both clients hand over decoded text
    if kind == "nats":
        from nats.aio.msg import Msg

        return Msg(_client=None, subject="S.fuzz", data=body, headers=h or None), None  # type: ignore[arg-type]
    return _AmqpMessage(body, {k.lower(): v for k, v in h.items()}, h.get("message-id"), h.get("type")), None


def _broker(kind: str, data: bytes) -> None:
    for name, src in _brokers():
        if name != kind:
            continue
        m, _ = _broker_message(kind, data)
        try:
            ev = src._event(m, 7) if kind == "nats" else src._event(m)
        except PayloadError:
            continue  # stored as a rejection and terminated/dead-lettered: never redelivered forever
        storable(ev)


def nats(data: bytes) -> None:
    _broker("nats", data)


def amqp(data: bytes) -> None:
    _broker("amqp", data)


# --- PostgreSQL ------------------------------------------------------------------------------------------


def pg_relation() -> bytes:
    """A Relation message (public.items: id int8 key, body jsonb, price numeric, flag bool, note text)."""
    import struct

    cols = [(1, "id", 20), (0, "body", 3802), (0, "price", 1700), (0, "flag", 16), (0, "note", 25)]
    out = b"R" + struct.pack("!I", 16384) + b"public\0items\0" + b"d" + struct.pack("!h", len(cols))
    for flags, name, oid in cols:
        out += bytes([flags]) + name.encode() + b"\0" + struct.pack("!Ii", oid, -1)
    return out


def pgoutput(data: bytes) -> None:
    """Messages (cut at 0xff bytes) fed to a decoder that knows public.items, inside a Begin/Commit."""
    import struct

    from integrand_postgres.pgoutput import Decoder, PgoutputError
    from integrand_postgres.source import envelope

    dec = Decoder()
    dec.feed(pg_relation())
    dec.feed(b"B" + struct.pack("!qqI", 1 << 32, 0, 7))
    for msg in data.split(b"\xff"):
        try:
            tx = dec.feed(msg)
        except PgoutputError:
            dec.current = None  # the stream alerts with it; the next peek starts over
            dec.feed(b"B" + struct.pack("!qqI", 1 << 32, 0, 7))
            continue
        for seq, ch in enumerate(tx.changes if tx is not None else []):
            rel = ch.relation
            storable(  # the event the logical stream makes of it (logical.py)
                alert_ok=True,
                ev=envelope(
                    source="fuzz",
                    mode="logical",
                    db="db",
                    schema=rel.schema,
                    table=rel.name,
                    op=ch.op,
                    before=ch.before,
                    after=ch.after,
                    key_cols=[c for c, _, k in rel.columns if k],
                    version=str(tx.commit_lsn * 1000 + seq) if tx is not None else None,
                    event_id=f"lsn-{seq}",
                    ts_ms=tx.commit_ts_ms if tx is not None else 0,
                ),
            )


def outbox(data: bytes) -> None:
    """An outbox row built from fuzz JSON: [op, schema, table, before, after, txid]."""
    from datetime import UTC, datetime

    import orjson
    from integrand_postgres.source import TableKeys

    from integrand.errors import IntegrandError

    try:
        row = orjson.loads(data)
    except orjson.JSONDecodeError:
        row = [data[:1].decode("latin-1"), "public", data[1:20].decode("utf-8", "replace"), None, {"id": 1}, 5]
    if not isinstance(row, list):
        row = [row]
    op, schema, table, before, after, txid = (row + [None] * 6)[:6]
    src = _outbox_source()
    keys = TableKeys({("public", "items"): ["id"]}, {("public", "items"): ["bigint"]}, "db")
    record = (
        1,
        txid if isinstance(txid, int) else 5,
        datetime(2026, 1, 2, tzinfo=UTC),
        schema if isinstance(schema, str) else "public",
        table if isinstance(table, str) else "items",
        op if isinstance(op, str) else "c",
        before,
        after,
    )
    try:
        ev = src._outbox_event(record, keys)
    except IntegrandError:
        return
    storable(ev, alert_ok=True)


@functools.cache
def _outbox_source() -> Any:
    from integrand_postgres.source import PostgresSource

    return _connector_any(PostgresSource, {"dsn": "postgresql://127.0.0.1/fuzz", "tables": ["public.items"]})


def _connector_any(cls: type[Any], cfg: dict[str, Any]) -> Any:
    config: ConnectorConfig = cls.Config.model_validate(cfg, context={"base_dir": Path(".")})
    return cls(config, ConnectorContext(name="fuzz", role="source", base_dir=Path("."), state=_NoState()))


TARGETS = {
    "webhook": webhook,
    "config": config,
    "mapping": mapping,
    "listing": listing,
    "outbound": outbound,
    "cdc": cdc,
    "nats": nats,
    "amqp": amqp,
    "pgoutput": pgoutput,
    "outbox": outbox,
}


def corpus(target: str) -> list[Path]:
    d = CORPUS / target
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []
