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

from integrand.connector import Event
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
