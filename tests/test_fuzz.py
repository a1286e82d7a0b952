"""The fuzz corpus replayed, and hypothesis over the same targets: never an unhandled exception, never a 5xx
for bad input, never a hang. ``make fuzz`` runs the coverage-guided fuzzer (atheris) for longer."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integrand.connector import Event, PayloadError
from integrand.routes import MappingError

from . import fuzz_targets as t
from .helpers import running, settings_for

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    ("target", "path"), [(name, p) for name in t.TARGETS for p in t.corpus(name)], ids=lambda v: getattr(v, "name", v)
)
def test_corpus(target: str, path: Path) -> None:
    t.TARGETS[target](path.read_bytes())


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),  # what orjson can write
    st.floats(allow_nan=False),
    st.text(),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
)
header_text = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" "))
NAMES = [
    b"webhook-id",
    b"X-GitHub-Delivery",
    b"X-Shopify-Webhook-Id",
    b"X-Id",
    b"X-Ts",
    b"X-Shopify-Topic",
    b"X-GitHub-Event",
]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    ct = bytes([draw(st.integers(0, 255))])
    headers = b"".join(
        name + b": " + draw(header_text) + b"\n" for name in draw(st.lists(st.sampled_from(NAMES), max_size=4))
    )
    kind = draw(st.sampled_from(["json", "deep", "bytes", "hubspot"]))
    if kind == "json":
        body = orjson.dumps(draw(json_value))
    elif kind == "deep":
        n = draw(st.integers(1, 400))
        body = b"[" * n + b"]" * n
    elif kind == "hubspot":
        item = {
            "subscriptionType": draw(st.text(max_size=5)),
            "objectId": draw(json_leaf),
            "occurredAt": draw(json_leaf),
        }
        body = orjson.dumps([item])
    else:
        body = draw(st.binary(max_size=200))
    return ct + headers + b"\n" + body


@FAST
@given(requests())
def test_webhook_parsers_never_fail_on_structured_input(data: bytes) -> None:
    t.webhook(data)


@FAST
@given(st.binary(max_size=300))
def test_webhook_parsers_never_fail_on_any_bytes(data: bytes) -> None:
    t.webhook(data)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["email", "age", "score", "amount", "vip", "born", "seen", "tier", "country"]), json_leaf
    )
)
def test_mapping_returns_a_record_or_a_mapping_error(doc: dict[str, object]) -> None:
    t.mapping(orjson.dumps(doc))


toml_value = st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.lists(st.integers(), max_size=2))
KEYS = [
    "connector",
    "signature",
    "secret",
    "url",
    "path",
    "listen",
    "max_json_depth",
    "poll",
    "from",
    "to",
    "map",
    "id",
]


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["daemon", "sources", "sinks", "routes", "store", "other"]),
        st.one_of(toml_value, st.dictionaries(st.text(max_size=6), st.dictionaries(st.sampled_from(KEYS), toml_value))),
    )
)
def test_config_loader_raises_only_config_errors(raw: dict[str, object]) -> None:
    t.config_dict(raw)


# --- the HTTP path: raw requests against a real daemon --------------------------------------------------

HTTP = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "2s"
header_timeout = "1s"
body_timeout = "1s"
keepalive_timeout = "1s"
max_body_bytes = 65536

[admin]
enabled = false
"""
SOURCE = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{t.SECRET}"

[sources.open]
connector = "webhook"
signature = "none"
allow_unsigned = true

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "demo"
to = ["out"]
[[routes]]
from = "open"
to = ["out"]
"""


async def answer(port: int, data: bytes) -> list[int]:
    """Every status the daemon answered to ``data`` before closing; a hang fails on the deadline."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(8):  # header/body/keep-alive deadlines are 1 s each: closed well before
            while chunk := await reader.read(65536):
                out += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    return [int(line.split(b" ")[1]) for line in out.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def mutations(seed: int, n: int) -> list[bytes]:
    """Byte-level mutations of the corpus requests (flips, cuts, splices, repeats), reproducible by seed."""
    rng = random.Random(seed)
    base = [p.read_bytes() for p in t.corpus("http")]
    out = []
    for _ in range(n):
        b = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 4)):
            op, i = rng.randrange(4), rng.randrange(len(b) + 1)
            if op == 0 and b:
                b[min(i, len(b) - 1)] = rng.randrange(256)
            elif op == 1:
                del b[i : i + rng.randint(1, 16)]
            elif op == 2:
                b[i:i] = rng.choice(base)[: rng.randint(1, 64)]
            else:
                b[i:i] = bytes(b[i : i + rng.randint(1, 8)]) * rng.randint(2, 50)
        out.append(bytes(b).replace(b"/hooks/demo", rng.choice([b"/hooks/demo", b"/hooks/open"])))
    return out


async def test_raw_http_corpus_and_mutations_never_5xx_never_hang(tmp_path: Path) -> None:
    cases = [p.read_bytes() for p in t.corpus("http")] + mutations(1, 300)
    async with running(settings_for(tmp_path, SOURCE, HTTP)) as d:
        port = d.ports["webhooks"]
        sem = asyncio.Semaphore(50)

        async def one(data: bytes) -> list[int]:
            async with sem:
                return await answer(port, data)

        results = await asyncio.gather(*(one(c) for c in cases))
        bad = [(c[:120], s) for c, s in zip(cases, results, strict=True) if any(x >= 500 for x in s)]
        assert bad == []
        # And it still takes a good webhook afterwards.
        assert [
            x
            for x in await answer(
                port,
                b"POST /hooks/open HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
            )
        ] == [200]


def test_a_huge_exponent_is_refused_not_computed() -> None:
    """Found by atheris: "1e890994" with convert = "int" built an 890,994-digit integer (seconds of CPU on
    the event loop per delivery); a number that large is now a MappingError at once."""
    started = time.monotonic()
    for value in ("1e890994", "-1e890994", "1e-890994", 10**400):
        with pytest.raises(MappingError, match="out of range"):
            t._mapping().apply(Event(id="e", source="src", type="t", data={"email": "a@b", "age": value}))
    assert time.monotonic() - started < 1


@st.composite
def pipelined(draw: st.DrawFn) -> tuple[bytes, int, list[int]]:
    """Requests one after another on a connection (Content-Length, chunked with extensions and trailers, none),
    the body limit, and where the stream is cut into reads."""
    limit = draw(st.integers(16, 400))
    stream, total_declared = b"", 0
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["length", "chunked", "empty"]))
        if kind == "length":
            body = draw(st.binary(max_size=limit))
            stream += b"POST /hooks/demo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        elif kind == "chunked":
            sizes = draw(st.lists(st.integers(1, 40), max_size=5))
            if sum(sizes) > limit:
                sizes = []
            total_declared = max(total_declared, sum(sizes))
            chunks = b"".join(b"%x;x=1\r\n" % n + b"z" * n + b"\r\n" for n in sizes)
            trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n"]))
            stream += (
                b"POST /hooks/demo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunks
                + b"0\r\n"
                + trailer
                + b"\r\n"
            )
        else:
            stream += b"GET /hooks/demo HTTP/1.1\r\nHost: x\r\n\r\n"
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    return stream, limit, cuts


@FAST
@given(pipelined())
def test_chunk_watch_never_refuses_traffic_within_the_limit(case: tuple[bytes, int, list[int]]) -> None:
    from integrand.guard import ChunkWatch

    stream, limit, cuts = case
    w = ChunkWatch(lambda target: limit)
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        assert w.feed(stream[a:b]) is None
    # And still following the framing at the end: a chunk over the limit on the same connection is refused.
    assert w.state != "off"
    over = b"POST /hooks/demo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (limit + 1)
    assert w.feed(over) == f"body exceeds the limit of {limit} bytes"


@FAST
@given(
    st.dictionaries(st.sampled_from(["id", "updated_at", "archived", "x"]), json_leaf), st.lists(json_leaf, max_size=3)
)
def test_a_listing_page_yields_events_or_says_why(item: dict[str, object], extra: list[object]) -> None:
    t.listing(orjson.dumps({"results": [item, *extra], "next": extra[0] if extra else None}))


# --- the new connectors' parsers ---------------------------------------------------------------------------

broker_header = st.sampled_from(
    [b"Nats-Msg-Id", b"Integrand-Type", b"Integrand-Entity", b"Integrand-Entity-Id", b"Integrand-Version"]
)


@st.composite
def broker_messages(draw: st.DrawFn) -> bytes:
    """Header lines (the ones the sources read, with any text) and a body: JSON, an envelope, deep, or bytes."""
    names = draw(st.lists(broker_header, max_size=5))
    headers = b"".join(n + b": " + draw(header_text) + b"\n" for n in names)
    kind = draw(st.sampled_from(["json", "envelope", "deep", "bytes"]))
    if kind == "json":
        body = orjson.dumps(draw(json_value))
    elif kind == "envelope":
        env = {k: draw(json_leaf) for k in draw(st.lists(st.sampled_from(ENVELOPE_KEYS), max_size=8))}
        body = orjson.dumps({"id": "e1", "source": "s", "type": "t", "data": draw(json_value), **env})
    elif kind == "deep":
        n = draw(st.integers(1, 400))
        body = b"[" * n + b"]" * n
    else:
        body = draw(st.binary(max_size=100))
    return headers + b"\n" + body


ENVELOPE_KEYS = ["id", "source", "type", "data", "entity", "entity_id", "version", "occurred_at", "meta"]


@FAST
@given(broker_messages())
def test_nats_and_amqp_messages_become_storable_events_or_rejections(data: bytes) -> None:
    t.nats(data)
    t.amqp(data)


def test_a_broker_message_the_store_cannot_hold_is_rejected_not_left_to_poison_its_batch() -> None:
    """Regression: a JSON body nested past orjson's 254 levels, or an ``Integrand-Version`` that is neither a
    number nor a time, made an event the store refuses; the streamer treats that as a permanent error, so the
    whole batch (good messages too) stayed uncommitted and was fetched again forever."""
    deep = b"[" * 300 + b"]" * 300
    for kind in ("nats", "amqp"):
        for name, src in t._brokers():
            if name != kind:
                continue
            for data in (b"\n" + deep, b"Integrand-Entity-Id: k\nIntegrand-Version: banana\n\n{}"):
                m, _ = t._broker_message(kind, data)
                reason = "not an integrand envelope" if src.config.format == "envelope" else "cannot be stored"
                # PayloadError: stored as a rejection, then term-ed / dead-lettered
                with pytest.raises(PayloadError, match=reason):
                    src._event(m, 7) if kind == "nats" else src._event(m)


CHANGE_TYPES = ["CREATE", "UPDATE", "DELETE", "UNDELETE", "GAP_CREATE", "GAP_UPDATE", "GAP_OVERFLOW"]


@FAST
@given(
    st.fixed_dictionaries(
        {
            "entityName": st.text(max_size=8),
            "recordIds": st.lists(st.text(max_size=8), max_size=3),
            "changeType": st.sampled_from(CHANGE_TYPES),
            "changeOrigin": st.text(max_size=20),
            "transactionKey": st.text(max_size=4),
            "sequenceNumber": st.integers(-(2**31), 2**31 - 1),
            "commitTimestamp": st.integers(-(2**63), 2**63 - 1),
            "commitNumber": st.integers(-(2**63), 2**63 - 1),
            "commitUser": st.text(max_size=4),
            "nulledFields": st.lists(st.text(max_size=6), max_size=3),
            "diffFields": st.lists(st.text(max_size=6), max_size=2),
            "changedFields": st.lists(
                st.one_of(st.text(max_size=6), st.sampled_from(["0x2", "0xff", "3-0x01"])), max_size=3
            ),
        }
    ),
    st.lists(st.one_of(st.none(), st.text(max_size=10)), min_size=4, max_size=4),
)
def test_a_cdc_change_event_becomes_events_or_a_permanent_error(
    header: dict[str, object], values: list[object]
) -> None:
    record = {"ChangeEventHeader": header, **dict(zip(t.CDC_FIELDS, values, strict=True))}
    t.cdc(t.cdc_payload(record))


@FAST
@given(st.binary(max_size=300))
def test_cdc_payload_bytes_never_escape_as_anything_but_a_permanent_error(data: bytes) -> None:
    t.cdc(data)


pg_text = st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"1", b"-3.5", b"NaN", b"t", b"{}", b"1e400"]))


@st.composite
def pg_messages(draw: st.DrawFn) -> bytes:
    """Insert/Update/Delete messages for public.items (well formed or cut short), Commits, and noise."""
    import struct

    out = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from([b"I", b"U", b"D", b"C", b"T", b"X"]))
        vals = [draw(pg_text) for _ in range(draw(st.integers(0, 6)))]
        tup = struct.pack("!h", len(vals)) + b"".join(
            b"n" if v is None else b"t" + struct.pack("!i", len(v)) + v for v in vals
        )
        if kind in (b"I", b"U", b"D"):
            oid = draw(st.sampled_from([16384, 16384, 1]))
            msg = kind + struct.pack("!I", oid) + draw(st.sampled_from([b"N", b"K", b"O"])) + tup
        elif kind == b"C":
            msg = b"C\x00" + struct.pack("!qqq", *(draw(st.integers(-(2**63), 2**63 - 1)) for _ in range(3)))
        else:
            msg = kind + draw(st.binary(max_size=20))
        cut = draw(st.integers(0, len(msg)))
        out.append(msg if draw(st.booleans()) else msg[:cut])
    return b"\xff".join(out)


@FAST
@given(pg_messages())
def test_pgoutput_messages_decode_or_say_what_is_malformed(data: bytes) -> None:
    t.pgoutput(data)


def test_a_numeric_past_64_bits_decodes_to_a_float_not_an_integer_the_store_cannot_write() -> None:
    """Regression: pgoutput turned numeric 123456789012345678901234567890 into a Python int, which orjson
    cannot write: the logical stream's batch failed for good (the outbox mode's to_jsonb gives a float)."""
    from integrand_postgres.pgoutput import value

    assert value(1700, "123456789012345678901234567890") == pytest.approx(1.2345678901234568e29)
    assert value(1700, "9223372036854775807") == 9223372036854775807
    assert value(1700, "-9223372036854775808") == -9223372036854775808
    assert isinstance(value(1700, "9223372036854775808"), float)


@FAST
@given(
    st.lists(
        st.one_of(st.sampled_from(["c", "u", "d", "r", "x", ""]), json_value, st.integers(0, 2**40)),
        min_size=0,
        max_size=6,
    )
)
def test_an_outbox_row_becomes_an_event_or_a_permanent_error_naming_it(row: list[object]) -> None:
    t.outbox(orjson.dumps(row))


@FAST
@given(st.lists(st.one_of(st.binary(max_size=20), st.text(max_size=20).map(str.encode)), min_size=1, max_size=6))
def test_a_salesforce_outbound_message_is_parsed_or_refused_below_500(parts: list[bytes]) -> None:
    t.outbound(b"\xff".join(p.replace(b"\xff", b"") for p in parts))
