"""A hostile client on the webhook port: deep JSON, undecodable headers, idle and slow connections, floods.

Each was found by a probe on 127.0.0.1 against a real daemon; each test here failed before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from integrand import signing
from integrand.app import Daemon
from integrand.guard import QuietLog
from integrand.store import Store

from .daemon_proc import DaemonProcess
from .helpers import DEMO_SECRET, hook_url, running, settings_for, signed_headers, wait_for, write_config

GITHUB_SECRET = "github-test-secret"

SOURCES = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sources.github]
connector = "webhook"
signature = "github"
secret = "{GITHUB_SECRET}"

[sources.shallow]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
max_json_depth = 8

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "demo"
to = ["out"]
[[routes]]
from = "github"
to = ["out"]
[[routes]]
from = "shallow"
to = ["out"]
"""

LIMITS = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "info"
shutdown_grace = "5s"
max_connections_per_ip = 8
header_timeout = "0.5s"
body_timeout = "0.5s"
keepalive_timeout = "1s"

[admin]
listen = "127.0.0.1:0"
"""


def nested(depth: int) -> bytes:
    return b'{"type":"deep","x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


async def post_raw(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


async def exchange(port: int, data: bytes, *, local: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes (or ``timeout``): everything it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
        return out
    finally:
        writer.close()


def head(path: str, extra: bytes = b"", length: int | None = None) -> bytes:
    cl = b"" if length is None else b"Content-Length: %d\r\n" % length
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n".encode()
        + cl
        + extra
        + b"\r\n"
    )


async def test_deep_json_is_400_and_does_not_take_valid_webhooks_down(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, SOURCES)) as d:
        url = hook_url(d)
        valid = [orjson.dumps({"type": "ok", "n": i}) for i in range(300)]
        deep = [nested(300), nested(254), nested(100)] * 10

        async with aiohttp.ClientSession() as s:

            async def send(i: int, body: bytes) -> tuple[int, dict[str, Any]]:
                async with s.post(url, data=body, headers=signed_headers(body, f"m{i}")) as resp:
                    return resp.status, orjson.loads(await resp.read())

            results = await asyncio.gather(*(send(i, b) for i, b in enumerate(valid + deep)))
        good, bad = results[: len(valid)], results[len(valid) :]
        assert [s for s, _ in good] == [200] * len(valid)
        assert {(s, r["error"]) for s, r in bad} == {(400, "JSON nested deeper than 64 levels (daemon.max_json_depth)")}
        assert await d.store.event_count() == len(valid)


async def test_max_json_depth_is_per_source_configurable_and_inclusive(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, SOURCES)) as d:
        url = hook_url(d, "shallow")
        ok, deep = nested(8), nested(9)
        assert (await post_raw(url, ok, signed_headers(ok, "a")))[0] == 200
        status, resp = await post_raw(url, deep, signed_headers(deep, "b"))
        assert status == 400
        assert resp["error"].startswith("JSON nested deeper than 8 levels")


async def test_event_id_header_not_utf8_is_400_and_valid_webhooks_beside_it_are_stored(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, SOURCES)) as d:
        port = d.ports["webhooks"]
        body = b'{"action":"opened"}'
        sig = signing.github_sign(GITHUB_SECRET, body).encode()
        # A replayed GitHub delivery (the id header is not signed) with an undecodable id.
        bad = (
            head(
                "/hooks/github",
                b"X-GitHub-Event: issues\r\nX-GitHub-Delivery: \xff\xfe-1\r\nX-Hub-Signature-256: " + sig + b"\r\n",
                len(body),
            )
            + body
        )
        sw_body = b'{"type":"x"}'
        sw = signing.standard_sign(DEMO_SECRET, "ok", int(time.time()), sw_body)
        sw_bad = (
            head(
                "/hooks/demo",
                b"webhook-id: \xff\r\nwebhook-timestamp: %d\r\nwebhook-signature: %s\r\n"
                % (int(time.time()), sw.encode()),
                len(sw_body),
            )
            + sw_body
        )
        valid = [orjson.dumps({"type": "ok", "n": i}) for i in range(200)]

        session = aiohttp.ClientSession()

        async def good(i: int, b: bytes) -> int:
            async with session.post(hook_url(d), data=b, headers=signed_headers(b, f"v{i}")) as resp:
                return resp.status

        async with session:
            raw_task = asyncio.gather(
                *(exchange(port, bad) for _ in range(20)), *(exchange(port, sw_bad) for _ in range(5))
            )
            statuses = await asyncio.gather(*(good(i, b) for i, b in enumerate(valid)))
            raw = await raw_task
        assert statuses == [200] * len(valid)
        for r in raw[:20]:
            assert r.startswith(b"HTTP/1.1 400"), r[:200]
            assert b"event id (from a header or the body) is not valid UTF-8" in r
        for r in raw[20:]:
            assert r.startswith(b"HTTP/1.1 400"), r[:200]
            assert b"a header the signature covers is not valid UTF-8" in r
        assert await d.store.event_count() == len(valid)
        # The refusal is on record, its undecodable bytes shown as U+FFFD.
        await wait_for(lambda: _rejected(d.store, 400), timeout=5)
        [gh] = [r for r in await d.store.rejections() if r.source == "github"][:1]
        assert gh.headers["X-GitHub-Delivery"] == "\ufffd\ufffd-1"


async def _rejected(store: Store, status: int) -> bool:
    return any(r.status == status for r in await store.rejections())


async def test_per_ip_cap_refuses_with_503_and_other_addresses_still_get_through(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, SOURCES, LIMITS)) as d:
        port = d.ports["webhooks"]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
        try:
            answer = await exchange(port, b"")
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"Retry-After: 1" in answer
            assert b"too many connections" in answer and b"limit is 8" in answer
            # Another address (a different sender) is not affected by this one's connections.
            body = orjson.dumps({"type": "ok"})
            hs = signed_headers(body, "other")
            conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            async with aiohttp.ClientSession(connector=conn) as s, s.post(hook_url(d), data=body, headers=hs) as r:
                assert r.status == 200
        finally:
            for _, w in idle:
                w.close()


async def test_total_cap_refuses_with_503_when_every_connection_is_busy(tmp_path: Path) -> None:
    base = LIMITS.replace("max_connections_per_ip = 8", "max_connections = 20").replace(
        'body_timeout = "0.5s"', 'body_timeout = "30s"'
    )
    async with running(settings_for(tmp_path, SOURCES, base)) as d:
        port = d.ports["webhooks"]
        busy = []
        for i in range(20):  # each in the middle of a request: none can be closed to make room
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{10 + i % 5}", 0))
            w.write(head("/hooks/demo", length=100) + b'{"type":')
            await w.drain()
            busy.append((r, w))
        await wait_for(lambda: d.listener.in_flight == 20, timeout=5)
        try:
            answer = await exchange(port, b"", local="127.0.0.3")
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"the limit (daemon.max_connections) is 20" in answer
        finally:
            for _, w in busy:
                w.close()


async def test_idle_connection_without_a_request_is_closed_after_header_timeout(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, SOURCES, LIMITS)) as d:
        started = time.monotonic()
        answer = await exchange(d.ports["webhooks"], b"")
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"daemon.header_timeout" in answer
        assert time.monotonic() - started < 4


async def test_slow_loris_head_is_cut_at_header_timeout(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, SOURCES, LIMITS)) as d:
        reader, writer = await asyncio.open_connection("127.0.0.1", d.ports["webhooks"])

        async def trickle() -> None:
            """One header line every 0.1 s (the attack's pace, not a wait for something): never a full head."""
            writer.write(b"POST /hooks/demo HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(ConnectionError):
                for _ in range(100):
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.1)

        started = time.monotonic()
        task = asyncio.create_task(trickle())
        try:
            out = await asyncio.wait_for(reader.read(65536), 5)
        finally:
            task.cancel()
            writer.close()
        assert out.startswith(b"HTTP/1.1 408"), out
        assert time.monotonic() - started < 3


async def test_body_that_never_finishes_is_408_at_body_timeout(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, SOURCES, LIMITS)) as d:
        started = time.monotonic()
        answer = await exchange(d.ports["webhooks"], head("/hooks/demo", length=100) + b'{"type":')
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"daemon.body_timeout" in answer
        assert time.monotonic() - started < 4


async def test_idle_keep_alive_connection_is_closed_after_keepalive_timeout(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, SOURCES, LIMITS)) as d:
        body = orjson.dumps({"type": "ok"})
        hs = signed_headers(body, "ka")
        extra = "".join(f"{k}: {v}\r\n" for k, v in hs.items() if k.lower() != "content-type").encode()
        request = head("/hooks/demo", extra, len(body)) + body
        started = time.monotonic()
        answer = await exchange(d.ports["webhooks"], request)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert answer.count(b"HTTP/1.1") == 1
        assert time.monotonic() - started < 4  # aiohttp's default keeps it for an hour


async def test_client_leaving_mid_body_is_no_error_and_no_500(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with running(settings_for(tmp_path, SOURCES)) as d:
        port = d.ports["webhooks"]
        for _ in range(5):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head("/hooks/demo", length=1000) + b'{"type":"x", "pad": "')
            await writer.drain()
            writer.close()
        await wait_for(lambda: _count(d, "400") >= 5, timeout=5)
    assert _count(d, "500") == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def _count(d: Daemon, status: str) -> float:
    return sum(n for (_, st), n in d.metrics.webhooks.values.items() if st == status)


async def test_malformed_requests_are_logged_quietly_and_aggregated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running(settings_for(tmp_path, SOURCES)) as d:
        d.listener.quiet.interval = 60  # one window for the whole flood; its summary is flushed below
        port = d.ports["webhooks"]
        answers = await asyncio.gather(
            *(exchange(port, b"POST /hooks/demo HTTP/1.1\r\nBad Header\r\n\r\n") for _ in range(200))
        )
        assert all(a.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request") for a in answers)
        d.listener.quiet.flush()  # what the timer does when the window ends
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged for a malformed request"
    lines = [
        r.getMessage() for r in caplog.records if "malformed request" in r.getMessage() or "more like" in r.getMessage()
    ]
    assert len(lines) == 6, lines  # five in full, then one with the count
    assert "195 more like these" in lines[-1] and "malformed request: 195" in lines[-1]


async def test_refusal_flood_writes_a_bounded_number_of_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with running(settings_for(tmp_path, SOURCES)) as d:
        body = b'{"type":"x"}'
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> int:
                async with s.post(hook_url(d), data=body, headers={"webhook-id": f"x{i}"}) as r:
                    return r.status

            started = time.monotonic()
            statuses = await asyncio.gather(*(one(i) for i in range(1000)))
            took = time.monotonic() - started
        assert set(statuses) == {401}
        assert _count(d, "401") == 1000
        rows = await d.store.rejections(limit=5000)
        # A burst of 100 and 10 a second after it: a flood of a thousand costs about a hundred writes (the
        # bound grows with how long the flood took: on a loaded machine it took over 6 s and wrote 162).
        assert 50 <= len(rows) <= 100 + 10 * took + 5, (len(rows), took)
    refusals = [r for r in caplog.records if "refused webhook" in r.getMessage()]
    assert len(refusals) <= 10


CHUNKED = b"POST /hooks/demo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"


async def test_a_chunk_declaring_more_than_the_limit_is_refused_before_its_bytes(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, SOURCES)) as d:
        started = time.monotonic()
        # 16 MiB declared, 10 bytes sent, and the client waits: only the declaration can end this.
        answer = await exchange(d.ports["webhooks"], CHUNKED + b"\r\n" + b"1000000\r\n" + b'{"type":"x', timeout=5)
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert b"body exceeds the limit of 1048576 bytes" in answer
        assert time.monotonic() - started < 2


async def test_chunked_bodies_within_the_limit_and_keep_alive_after_them_still_work(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, SOURCES)) as d:
        requests = b""
        for i in range(3):
            body = orjson.dumps({"type": "ok", "n": i})
            hs = signed_headers(body, f"c{i}")
            extra = "".join(f"{k}: {v}\r\n" for k, v in hs.items() if k.lower() != "content-type").encode()
            half = len(body) // 2
            chunks = b"%x\r\n%s\r\n%x;ext=1\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (
                half,
                body[:half],
                len(body) - half,
                body[half:],
            )
            last = b"Connection: close\r\n" if i == 2 else b""
            requests += CHUNKED + extra + last + b"\r\n" + chunks
        # Then a Content-Length request on the same connection would follow; pipelined all at once.
        answer = await exchange(d.ports["webhooks"], requests, timeout=5)
        assert answer.count(b"HTTP/1.1 200") == 3, answer
        assert await d.store.event_count() == 3


async def test_a_full_port_makes_room_by_closing_the_oldest_connection_without_a_request(tmp_path: Path) -> None:
    base = LIMITS.replace("max_connections_per_ip = 8", "max_connections = 20").replace(
        'header_timeout = "0.5s"', 'header_timeout = "30s"'
    )
    async with running(settings_for(tmp_path, SOURCES, base)) as d:
        port = d.ports["webhooks"]
        idle = [
            await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{10 + i % 5}", 0)) for i in range(20)
        ]
        try:
            body = orjson.dumps({"type": "ok"})
            hs = signed_headers(body, "room")
            conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            async with aiohttp.ClientSession(connector=conn) as s, s.post(hook_url(d), data=body, headers=hs) as r:
                assert r.status == 200
            # The first idle connection was the one closed, with a reason.
            first = await asyncio.wait_for(idle[0][0].read(), 5)
            assert first.startswith(b"HTTP/1.1 503") and b"closed to make room" in first
        finally:
            for _, w in idle:
                w.close()


async def test_quiet_log_summarises_each_window_by_itself(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    quiet = QuietLog(logging.getLogger("integrand.test.quiet"), interval=0.05, burst=2)
    for i in range(10):
        quiet.event("401", logging.INFO, "refused %d", i)
    quiet.event("404", logging.INFO, "unknown")
    await wait_for(lambda: any("more like these" in r.getMessage() for r in caplog.records), timeout=5)
    messages = [r.getMessage() for r in caplog.records if r.name == "integrand.test.quiet"]
    assert messages[:3] == ["refused 0", "refused 1", "unknown"]
    assert "8 more like these" in messages[3] and "401: 8" in messages[3]
    quiet.event("401", logging.INFO, "refused again")  # a new window: logged in full again
    assert [r.getMessage() for r in caplog.records][-1] == "refused again"
    assert quiet.total == {"401": 11, "404": 1}


async def test_a_full_port_closes_connections_never_answered_2xx_before_a_kept_alive_sender(tmp_path: Path) -> None:
    """A sender whose connection was answered 200 and kept alive is the oldest idle connection here; the
    port makes room from the flood of silent ones first, and the sender's next request uses the same connection."""
    base = (
        LIMITS.replace("max_connections_per_ip = 8", "max_connections = 20")
        .replace('header_timeout = "0.5s"', 'header_timeout = "30s"')
        .replace('keepalive_timeout = "1s"', 'keepalive_timeout = "30s"')
    )
    async with running(settings_for(tmp_path, SOURCES, base)) as d:
        port = d.ports["webhooks"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))

        async def post(msg_id: str) -> bytes:
            body = orjson.dumps({"type": "ok", "id": msg_id})
            hs = signed_headers(body, msg_id)
            extra = "".join(f"{k}: {v}\r\n" for k, v in hs.items() if k.lower() != "content-type").encode()
            writer.write(head("/hooks/demo", extra, len(body)).replace(b"Connection: close\r\n", b"") + body)
            return await asyncio.wait_for(reader.readuntil(b'"accepted":'), 5)

        assert (await post("kept-1")).startswith(b"HTTP/1.1 200")
        idle = []
        try:
            for i in range(25):  # 19 fill the port, 6 more each make room
                idle.append(await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{10 + i % 5}", 0)))
            first = await asyncio.wait_for(idle[0][0].read(), 5)
            assert first.startswith(b"HTTP/1.1 503") and b"closed to make room" in first
            await reader.readuntil(b"}")  # the rest of the first answer
            assert (await post("kept-2")).startswith(b"HTTP/1.1 200"), "the sender's kept-alive connection was closed"
        finally:
            writer.close()
            for _, w in idle:
                w.close()


async def test_a_connection_that_sends_nothing_costs_no_task_and_no_timer_of_its_own(tmp_path: Path) -> None:
    """Before its first byte a connection is counted and on the sweep's list, nothing more: no aiohttp
    handler task, no per-connection timer (a flood of them is what the port must absorb cheaply)."""
    base = LIMITS.replace('header_timeout = "0.5s"', 'header_timeout = "30s"').replace(
        "max_connections_per_ip = 8", "max_connections_per_ip = 100"
    )
    async with running(settings_for(tmp_path, SOURCES, base)) as d:
        loop = asyncio.get_running_loop()
        tasks, timers = len(asyncio.all_tasks()), len(loop._scheduled)  # type: ignore[attr-defined]
        idle = [await asyncio.open_connection("127.0.0.1", d.ports["webhooks"]) for _ in range(50)]
        try:
            guard = d.listener.guarded
            assert guard is not None
            await wait_for(lambda: guard.open == 50, timeout=5)
            await wait_for(lambda: not any("accept" in repr(t) for t in asyncio.all_tasks()), timeout=5)
            assert len(asyncio.all_tasks()) < tasks + 5
            assert len(loop._scheduled) < timers + 5  # type: ignore[attr-defined]
            # They are counted all the same: a webhook still gets through, and they are cut at the deadline.
            body = orjson.dumps({"type": "ok"})
            async with (
                aiohttp.ClientSession() as s,
                s.post(hook_url(d), data=body, headers=signed_headers(body, "x")) as r,
            ):
                assert r.status == 200
        finally:
            for _, w in idle:
                w.close()


async def test_without_a_header_timeout_a_silent_connection_still_ends_at_the_keepalive_timeout(
    tmp_path: Path,
) -> None:
    base = LIMITS.replace('header_timeout = "0.5s"', 'header_timeout = "0s"')
    async with running(settings_for(tmp_path, SOURCES, base)) as d:
        started = time.monotonic()
        answer = await exchange(d.ports["webhooks"], b"", timeout=10)
        assert answer == b""
        assert time.monotonic() - started < 5  # keepalive_timeout is 1 s here


async def test_connections_that_sent_nothing_are_closed_when_the_daemon_stops(tmp_path: Path) -> None:
    base = LIMITS.replace('header_timeout = "0.5s"', 'header_timeout = "30s"')
    async with running(settings_for(tmp_path, SOURCES, base)) as d:
        reader, writer = await asyncio.open_connection("127.0.0.1", d.ports["webhooks"])
        guard = d.listener.guarded
        assert guard is not None
        await wait_for(lambda: guard.open == 1, timeout=5)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_integrand_run_on_uvloop_answers_its_refusals_and_logs_no_traceback(tmp_path: Path) -> None:
    """`integrand run` uses uvloop, whose transports are not ``asyncio.Transport`` instances: the refusals
    (503 at the cap, 408 at the head deadline) must be answered with their reason there too, and must not
    raise out of ``connection_made`` (a traceback per refused connection is a log an attacker fills)."""
    daemon = DaemonProcess(write_config(tmp_path, SOURCES, LIMITS), tmp_path / "integrand.log")
    await daemon.start()
    idle = []
    try:
        late = await exchange(daemon.port, b"")
        assert late.startswith(b"HTTP/1.1 408") and b"daemon.header_timeout" in late, late
        for _ in range(8):
            idle.append(await asyncio.open_connection("127.0.0.1", daemon.port))
        for _ in range(3):
            answer = await exchange(daemon.port, b"")
            assert answer.startswith(b"HTTP/1.1 503") and b"limit is 8" in answer, answer
    finally:
        for _, w in idle:
            w.close()
        daemon.signal(signal.SIGTERM)
        await daemon.wait(30)
    assert "Traceback" not in daemon.output(), daemon.output()[-3000:]


async def test_connections_reaching_their_head_deadline_together_are_all_cut_in_batches(tmp_path: Path) -> None:
    """More than one sweep's batch (64) expire at once: every one still gets its 408, none is left open."""
    base = LIMITS.replace("max_connections_per_ip = 8", "max_connections_per_ip = 200")
    async with running(settings_for(tmp_path, SOURCES, base)) as d:
        port = d.ports["webhooks"]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(150)]
        try:
            answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 10) for r, _ in conns))
            assert all(a.startswith(b"HTTP/1.1 408") for a in answers), [a[:40] for a in answers if b"408" not in a]
            guard = d.listener.guarded
            assert guard is not None
            await wait_for(lambda: guard.open == 0 and not guard.heads and not guard.idle, timeout=5)
        finally:
            for _, w in conns:
                w.close()
