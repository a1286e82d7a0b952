"""Every way the webhook port says no, with its status and reason, against a real in-process daemon."""

from __future__ import annotations

import asyncio
import base64
import gzip
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from integrand import signing
from integrand.cli import main as cli_main
from integrand.config import Settings
from integrand.store import Store

from .helpers import DEMO_SECRET, admin_url, hook_url, read_jsonl, running, settings_for, signed_headers, wait_for

ROTATED_SECRET = "whsec_" + base64.b64encode(b"the-new-key-after-rotation-0123").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"a-key-integrand-never-heard-of!").decode()
STRIPE_SECRET = "whsec_stripe_test_secret"
GITHUB_SECRET = "github-test-secret"
SHOPIFY_SECRET = "shopify-test-secret"
HMAC_SECRET = "plain-hmac-secret"

SOURCES = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = ["{DEMO_SECRET}", "{ROTATED_SECRET}"]
max_body_bytes = 1024

[sources.roomy]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sources.stripe]
connector = "webhook"
signature = "stripe"
secret = "{STRIPE_SECRET}"

[sources.github]
connector = "webhook"
signature = "github"
secret = "{GITHUB_SECRET}"

[sources.shopify]
connector = "webhook"
signature = "shopify"
secret = "{SHOPIFY_SECRET}"

[sources.hmac]
connector = "webhook"
signature = "hmac-sha256"
secret = "{HMAC_SECRET}"
header = "X-Signature"
prefix = "sha256="
id_header = "X-Delivery"

[sources.hmacts]
connector = "webhook"
signature = "hmac-sha256"
secret = "{HMAC_SECRET}"
header = "X-Sig"
encoding = "base64"
timestamp_header = "X-Timestamp"

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
from = "roomy"
to = ["out"]
[[routes]]
from = "stripe"
to = ["out"]
[[routes]]
from = "github"
to = ["out"]
[[routes]]
from = "shopify"
to = ["out"]
[[routes]]
from = "hmac"
to = ["out"]
[[routes]]
from = "hmacts"
to = ["out"]
[[routes]]
from = "open"
to = ["out"]
"""


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path, SOURCES)


async def post(
    s: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with s.post(url, data=body, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read()), dict(resp.headers)


async def raw_exchange(port: int, head: bytes, chunks: list[bytes]) -> tuple[int, bytes, bytes]:
    """Speak HTTP/1.1 by hand (for bodies aiohttp's client would not send): status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for c in chunks:
            writer.write(c)
            await writer.drain()
        # Not read to EOF: aiohttp keeps reading (and dropping) an unfinished body for its lingering time.
        head_part = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head_part.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
    status = int(head_part.split(b" ", 2)[1])
    return status, head_part, body


async def test_get_is_405_with_allow(settings: Settings) -> None:
    async with running(settings) as d, aiohttp.ClientSession() as s, s.get(hook_url(d)) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert await resp.json() == {"error": "GET is not allowed; webhooks are POSTed"}


async def test_unknown_source_is_404_and_recorded(settings: Settings) -> None:
    async with running(settings) as d, aiohttp.ClientSession() as s:
        status, body, _ = await post(s, hook_url(d, "nope"), b"{}", {"Content-Type": "application/json"})
        assert (status, body) == (404, {"error": "unknown source 'nope'"})
        await wait_for(lambda: _rejections(d.store, 404))


async def test_paths_outside_hooks_source_are_404_with_the_right_path(settings: Settings) -> None:
    async with running(settings) as d, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{d.ports['webhooks']}"
        for path in ("/", "/hooks/", "/hooks/demo/extra", "/other"):
            status, body, _ = await post(s, base + path, b"{}", {"Content-Type": "application/json"})
            assert (status, body) == (
                404,
                {"error": f"no endpoint at {path}; webhooks are POSTed to /hooks/{{source}}"},
            )
        assert await d.store.event_count() == 0


async def test_content_length_over_the_source_limit_is_413(settings: Settings) -> None:
    big = orjson.dumps({"pad": "x" * 2000})
    async with running(settings) as d, aiohttp.ClientSession() as s:
        status, body, _ = await post(s, hook_url(d), big, signed_headers(big, "msg_big"))
        assert (status, body) == (413, {"error": f"body of {len(big)} bytes exceeds the limit of 1024 bytes"})
        # The limit is per source: `roomy` has the daemon's default of 1 MiB and takes the same body.
        status, body, _ = await post(s, hook_url(d, "roomy"), big, signed_headers(big, "msg_big"))
        assert (status, body) == (200, {"accepted": 1, "duplicates": 0})
        assert await d.store.event_count() == 1


async def test_chunked_body_growing_past_the_limit_is_413(settings: Settings) -> None:
    async with running(settings) as d:
        head = (
            b"POST /hooks/demo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        # Three 512-byte chunks and no terminating chunk: only reading past the limit can end this request.
        chunks = [b"200\r\n" + b"x" * 512 + b"\r\n"] * 3
        status, headers, body = await raw_exchange(d.ports["webhooks"], head, chunks)
        assert status == 413
        assert b"Connection: close" in headers
        assert orjson.loads(body) == {"error": "body exceeds the limit of 1024 bytes"}
        assert await d.store.event_count() == 0


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "missing webhook-id header"),
        ("no-signature", "missing webhook-signature header"),
        ("bad-signature", "signature does not match"),
        ("stale", "webhook-timestamp is outside the 300 s replay window"),
        ("future", "webhook-timestamp is outside the 300 s replay window"),
        ("other-secret", "signature does not match"),
        ("bad-signature-bad-json", "signature does not match"),
    ],
)
async def test_unauthenticated_is_401_and_never_parsed(settings: Settings, case: str, reason: str) -> None:
    body = b"{not json" if case == "bad-signature-bad-json" else orjson.dumps({"n": 1})
    now = int(time.time())
    headers = signed_headers(body, "msg_1")
    if case == "missing":
        headers = {"Content-Type": "application/json"}
    elif case == "no-signature":
        del headers["webhook-signature"]
    elif case in ("bad-signature", "bad-signature-bad-json"):
        headers["webhook-signature"] = signing.standard_sign(DEMO_SECRET, "msg_1", now, body + b" ")
    elif case == "stale":
        headers = signed_headers(body, "msg_1", ts=now - 301)
    elif case == "future":
        headers = signed_headers(body, "msg_1", ts=now + 320)  # margin: the server reads its clock later
    elif case == "other-secret":
        headers = signed_headers(body, "msg_1", secret=OTHER_SECRET)
    async with running(settings) as d, aiohttp.ClientSession() as s:
        status, got, _ = await post(s, hook_url(d), body, headers)
        assert (status, got) == (401, {"error": reason})
        assert await d.store.event_count() == 0


async def test_timestamps_inside_the_window_and_both_rotated_secrets_are_accepted(settings: Settings) -> None:
    out = settings.base_dir / "var" / "out.jsonl"
    now = int(time.time())
    async with running(settings) as d, aiohttp.ClientSession() as s:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("old-key", {"secret": DEMO_SECRET}),
            ("new-key", {"secret": ROTATED_SECRET}),
            ("a-bit-late", {"ts": now - 240}),
            ("a-bit-early", {"ts": now + 240}),
        ]
        for msg_id, kw in cases:
            body = orjson.dumps({"id": msg_id})
            status, got, _ = await post(s, hook_url(d), body, signed_headers(body, msg_id, **kw))
            assert (status, got) == (200, {"accepted": 1, "duplicates": 0}), msg_id
        await wait_for(lambda: len(read_jsonl(out)) == 4)
    assert sorted(e["id"] for e in read_jsonl(out)) == ["a-bit-early", "a-bit-late", "new-key", "old-key"]


async def test_wrong_content_type_is_415_malformed_json_is_400(settings: Settings) -> None:
    async with running(settings) as d, aiohttp.ClientSession() as s:
        body = orjson.dumps({"n": 1})
        headers = {**signed_headers(body, "msg_ct"), "Content-Type": "text/plain"}
        status, got, _ = await post(s, hook_url(d), body, headers)
        assert (status, got) == (415, {"error": "Content-Type must be application/json, got 'text/plain'"})

        bad = b'{"n": 1,'
        status, got, _ = await post(s, hook_url(d), bad, signed_headers(bad, "msg_json"))
        assert status == 400
        assert got["error"].startswith("body is not valid JSON: ")

        # application/*+json is JSON too.
        headers = {**signed_headers(body, "msg_cloud"), "Content-Type": "application/cloudevents+json"}
        status, got, _ = await post(s, hook_url(d), body, headers)
        assert (status, got) == (200, {"accepted": 1, "duplicates": 0})
        assert await d.store.event_count() == 1


async def test_503_with_retry_after_while_shutting_down(settings: Settings) -> None:
    async with running(settings) as d, aiohttp.ClientSession() as s:
        body = orjson.dumps({"n": 1})
        # What _shutdown does first, before the port closes; the subprocess test drives the real SIGTERM.
        d.listener.stopping = True
        status, got, headers = await post(s, hook_url(d), body, signed_headers(body, "msg_late"))
        assert (status, got) == (503, {"error": "integrand is shutting down"})
        assert headers["Retry-After"] == "5"
        assert headers.get("Connection", "").lower() == "close"
        assert await d.store.event_count() == 0


async def test_refused_webhooks_are_recorded_with_secrets_redacted(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    body = orjson.dumps({"n": 1})
    headers = signed_headers(body, "msg_x", secret=OTHER_SECRET)
    leaked = headers["webhook-signature"]
    async with running(settings) as d, aiohttp.ClientSession() as s:
        headers = {**headers, "Authorization": "Bearer hunter2", "X-Api-Key": "k-123", "X-Trace": "trace-1"}
        status, _, _ = await post(s, hook_url(d), body, headers)
        assert status == 401
        await wait_for(lambda: _rejections(d.store, 401))
        [r] = await d.store.rejections(source="demo")
        assert (r.source, r.status, r.reason, r.remote) == ("demo", 401, "signature does not match", "127.0.0.1")
        assert r.headers["webhook-signature"] == "***"
        assert r.headers["Authorization"] == "***"
        assert r.headers["X-Api-Key"] == "***"
        assert r.headers["X-Trace"] == "trace-1"
        assert r.headers["webhook-id"] == "msg_x"
        assert leaked not in orjson.dumps(r.headers).decode()
        assert settings.path is not None
        rc = await asyncio.to_thread(cli_main, ["status", "--config", str(settings.path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "recent refused webhooks:" in out
    assert "demo" in out and "401  signature does not match" in out
    assert "hunter2" not in out and leaked not in out


async def _rejections(store: Store, status: int) -> bool:
    return any(r.status == status for r in await store.rejections())


# --- the other signing schemes, through the listener ---------------------------------------------


def _scheme_request(source: str, body: bytes, good: bool) -> dict[str, str]:
    """Headers signed as the provider would (``good``), or with one thing wrong."""
    now = int(time.time())
    ct = {"Content-Type": "application/json"}
    if source == "stripe":
        sig = signing.stripe_sign(STRIPE_SECRET if good else "whsec_wrong", now, body)
        return {**ct, "Stripe-Signature": sig}
    if source == "github":
        sig = signing.github_sign(GITHUB_SECRET, body)
        return {
            **ct,
            "X-Hub-Signature-256": sig if good else sig.replace("sha256=", "sha1="),
            "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
            "X-GitHub-Event": "issues",
        }
    if source == "shopify":
        return {
            **ct,
            "X-Shopify-Hmac-Sha256": signing.hmac_sign(SHOPIFY_SECRET, body if good else b"{}", encoding="base64"),
            "X-Shopify-Webhook-Id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
            "X-Shopify-Topic": "orders/create",
        }
    if source == "hmac":
        sig = signing.hmac_sign(HMAC_SECRET, body, prefix="sha256=")
        return {**ct, "X-Signature": sig if good else sig[len("sha256=") :], "X-Delivery": "d-1"}
    if source == "hmacts":
        ts = now if good else now - 600
        return {
            **ct,
            "X-Sig": signing.hmac_sign(HMAC_SECRET, body, encoding="base64", timestamp=ts),
            "X-Timestamp": str(ts),
        }
    assert source == "open"
    return ct if good else {"Content-Type": "application/xml"}


@pytest.mark.parametrize(
    ("source", "refusal"),
    [
        ("stripe", (401, "signature does not match")),
        ("github", (401, "X-Hub-Signature-256 must start with 'sha256='")),
        ("shopify", (401, "signature does not match")),
        ("hmac", (401, "X-Signature must start with 'sha256='")),
        ("hmacts", (401, "X-Timestamp is outside the 300 s replay window")),
        ("open", (415, "Content-Type must be application/json, got 'application/xml'")),
    ],
)
async def test_other_schemes_accept_and_refuse(settings: Settings, source: str, refusal: tuple[int, str]) -> None:
    out = settings.base_dir / "var" / "out.jsonl"
    payload = {
        "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
        "object": "event",
        "type": "customer.updated",
        "created": 1686089970,
        "data": {"object": {"id": "cus_9", "object": "customer"}},
        "action": "opened",
    }
    body = orjson.dumps(payload)
    async with running(settings) as d, aiohttp.ClientSession() as s:
        status, got, _ = await post(s, hook_url(d, source), body, _scheme_request(source, body, good=False))
        assert (status, got) == (refusal[0], {"error": refusal[1]})
        status, got, _ = await post(s, hook_url(d, source), body, _scheme_request(source, body, good=True))
        assert (status, got) == (200, {"accepted": 1, "duplicates": 0})
        await wait_for(lambda: len(read_jsonl(out)) == 1)
    [ev] = read_jsonl(out)
    assert ev["source"] == source
    assert ev["data"] == payload
    expected_id = {
        "stripe": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
        "github": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "shopify": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
        "hmac": "d-1",
    }
    if source in expected_id:
        assert ev["id"] == expected_id[source]
    else:  # no id from the scheme: a content hash, stable across resends
        assert ev["id"].startswith("h_")
    if source == "stripe":
        # `created` dates the event, not the object: it is occurred_at, never a version (events are a log).
        assert (ev["entity"], ev["entity_id"], ev["version"]) == ("customer", "cus_9", None)
        assert ev["occurred_at"] == "2023-06-06T22:19:30Z"
    if source == "github":
        assert ev["type"] == "issues.opened"
    if source == "shopify":
        assert (ev["type"], ev["entity"], ev["entity_id"]) == ("orders/create", "orders", payload["id"])


# --- the store cannot commit ------------------------------------------------------------------------

FULL = """
[store]
max_size_mb = {mb}

[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{secret}"
max_body_bytes = 200000

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "demo"
to = ["out"]
"""


async def test_full_store_is_503_nothing_half_stored_and_recovers(tmp_path: Path) -> None:
    out = tmp_path / "var" / "out.jsonl"
    accepted: list[str] = []
    refused: str | None = None
    pad = "p" * 40_000  # about 25 of these fill a 1 MB store
    async with (
        running(settings_for(tmp_path, FULL.format(mb=1, secret=DEMO_SECRET))) as d,
        aiohttp.ClientSession() as s,
    ):
        for i in range(200):
            body = orjson.dumps({"n": i, "pad": pad})
            status, got, headers = await post(s, hook_url(d), body, signed_headers(body, f"msg_{i}"))
            if status == 200:
                assert got == {"accepted": 1, "duplicates": 0}
                accepted.append(f"msg_{i}")
                continue
            assert (status, got) == (503, {"error": "the event store cannot commit right now; retry later"})
            assert headers["Retry-After"] == "5"
            refused = f"msg_{i}"
            break
        assert refused is not None, "a 1 MB store never filled up"
        assert len(accepted) >= 5
        # Readiness tells a load balancer the same thing the webhooks were told.
        async with s.get(admin_url(d, "/readyz")) as resp:
            assert resp.status == 503
            assert "full" in (await resp.json())["reason"]
    # Nothing half-stored: exactly the acknowledged events, each with its one delivery row.
    db = sqlite3.connect(tmp_path / "var" / "integrand.db")
    try:
        ids = {r[0] for r in db.execute("SELECT event_id FROM events")}
        [orphans] = db.execute(
            "SELECT COUNT(*) FROM deliveries d LEFT JOIN events e ON e.id = d.event WHERE e.id IS NULL"
        ).fetchone()
        per_event = {r[0] for r in db.execute("SELECT COUNT(*) FROM deliveries GROUP BY event")}
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
    assert ids == set(accepted)
    assert orphans == 0
    assert per_event == {1}

    # Space again (a bigger limit): the refused webhook, resent as its sender would, is taken and everything goes out.
    async with running(settings_for(tmp_path, FULL.format(mb=16, secret=DEMO_SECRET))) as d:
        async with aiohttp.ClientSession() as s:
            body = orjson.dumps({"n": "again", "pad": pad})
            status, got, _ = await post(s, hook_url(d), body, signed_headers(body, refused))
            assert (status, got) == (200, {"accepted": 1, "duplicates": 0})
            async with s.get(admin_url(d, "/readyz")) as resp:
                assert (resp.status, await resp.json()) == (200, {"status": "ready"})
        want = {*accepted, refused}
        await wait_for(lambda: {e["id"] for e in read_jsonl(out)} == want, timeout=20)
        await wait_for(lambda: _all_done(d.store, len(want)), timeout=20)


async def _all_done(store: Store, n: int) -> bool:
    return await store.counts() == {("out", "done"): n}


async def test_limit_is_inclusive_and_counts_the_decompressed_body(settings: Settings) -> None:
    def body_of(size: int) -> bytes:
        body = orjson.dumps({"pad": ""})
        return orjson.dumps({"pad": "x" * (size - len(body))})

    async with running(settings) as d, aiohttp.ClientSession() as s:
        exact, over = body_of(1024), body_of(1025)
        assert (len(exact), len(over)) == (1024, 1025)
        status, got, _ = await post(s, hook_url(d), exact, signed_headers(exact, "exact"))
        assert (status, got) == (200, {"accepted": 1, "duplicates": 0})
        status, got, _ = await post(s, hook_url(d), over, signed_headers(over, "over"))
        assert (status, got) == (413, {"error": "body of 1025 bytes exceeds the limit of 1024 bytes"})

        # A gzip bomb: under 1 KB on the wire, 800 KB once inflated. The limit applies to what we would store.
        bomb = orjson.dumps({"pad": "0" * 800_000})
        wire = gzip.compress(bomb)
        assert len(wire) < 1024
        headers = {**signed_headers(bomb, "bomb"), "Content-Encoding": "gzip"}
        status, got, _ = await post(s, hook_url(d), wire, headers)
        assert (status, got) == (413, {"error": "body exceeds the limit of 1024 bytes"})
        assert await d.store.event_count() == 1
