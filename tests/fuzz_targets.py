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
from integrand.connector import ConnectorConfig, ConnectorContext, Event, WebhookRequest, WebhookSource
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


PLUGINS = [
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


TARGETS = {"webhook": webhook, "config": config, "mapping": mapping, "listing": listing}


def corpus(target: str) -> list[Path]:
    d = CORPUS / target
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []
