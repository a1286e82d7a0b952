"""The connectors' HTTP helper against a real local server: error mapping, retries, rate limits, redaction."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from integrand.connector import (
    AuthError,
    Http,
    HttpPool,
    PermanentError,
    RateLimiter,
    Response,
    RetryableError,
    error_for_status,
)
from integrand.httpclient import redact_headers
from integrand.listener import redact_headers as listener_redact
from integrand.secrets import REDACTED, is_credential_name

from .connectors import registry_with
from .helpers import BASE, DEMO_SECRET, admin_url, hook_url, post_signed, running, wait_for, write_config


class FakeApi:
    """A local API whose next answers the test scripts; it counts every request it sees."""

    def __init__(self) -> None:
        self.hits: list[web.Request] = []
        self.bodies: list[bytes] = []
        self.answers: list[tuple[int, dict[str, str], bytes]] = []
        self.default: tuple[int, dict[str, str], bytes] = (200, {}, b'{"ok": true}')
        self.hang = asyncio.Event()
        self.hanging = False
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(request)
        self.bodies.append(await request.read())
        if self.hanging:
            await self.hang.wait()
        status, headers, body = self.answers.pop(0) if self.answers else self.default
        return web.Response(status=status, headers=headers, body=body, content_type="application/json")


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    fake = FakeApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    fake.hang.set()
    await runner.cleanup()


@pytest.fixture
async def pool() -> AsyncIterator[HttpPool]:
    p = HttpPool(timeout=5.0, retries=2)
    await p.start()
    yield p
    await p.close()


def http(pool: HttpPool, name: str = "test") -> Http:
    return pool.for_connector(logging.getLogger(f"integrand.test.{name}"))


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, AuthError), (403, AuthError), (400, PermanentError), (404, PermanentError), (422, PermanentError)]
    + [(s, RetryableError) for s in (408, 425, 429, 500, 502, 503)],
)
def test_error_for_status(status: int, kind: type[Exception]) -> None:
    err = error_for_status(status, "x", request_id="r-1")
    assert type(err) is kind
    assert getattr(err, "request_id", None) == "r-1"


async def test_429_is_retryable_with_retry_after_and_request_id_and_pauses_the_account(
    api: FakeApi, pool: HttpPool
) -> None:
    api.answers.append(
        (429, {"Retry-After": "120", "X-HubSpot-Correlation-Id": "corr-9"}, b'{"errorType":"RATE_LIMIT"}')
    )
    h = http(pool)
    with pytest.raises(RetryableError) as info:
        await h.get(api.url + "/crm/v3/objects/contacts", rate_key="hubspot:42")
    assert info.value.retry_after == 120
    assert info.value.request_id == "corr-9"
    assert "RATE_LIMIT" in str(info.value)
    assert len(api.hits) == 1  # 429 is not retried in the client: the caller's backoff honours Retry-After
    assert 100 < pool.paused_for("hubspot:42") <= 120
    assert pool.paused_for("hubspot:other") == 0
    # Another account is not held up; the paused one waits and never reaches the server.
    await h.get(api.url + "/other", rate_key="hubspot:other")
    assert len(api.hits) == 2
    held = asyncio.create_task(h.get(api.url + "/held", rate_key="hubspot:42"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not held.done()
    assert len(api.hits) == 2
    held.cancel()


async def test_auth_and_permanent_errors_keep_the_request_id(api: FakeApi, pool: HttpPool) -> None:
    api.answers.append((401, {"intuit_tid": "tid-1"}, b'{"Fault":{"type":"AuthenticationFault"}}'))
    api.answers.append((400, {"X-Request-Id": "req-2"}, b'{"Fault":{"Error":[{"code":"6240"}]}}'))
    h = http(pool)
    with pytest.raises(AuthError) as auth:
        await h.post(api.url + "/v3/company/1/customer", json={"DisplayName": "A"})
    assert auth.value.request_id == "tid-1"
    with pytest.raises(PermanentError) as perm:
        await h.post(api.url + "/v3/company/1/customer", json={"DisplayName": "A"})
    assert perm.value.request_id == "req-2"
    assert "6240" in str(perm.value)
    assert orjson.loads(api.bodies[0]) == {"DisplayName": "A"}
    assert api.hits[0].headers["Content-Type"] == "application/json"


async def test_transient_server_errors_are_retried_on_idempotent_methods_only(api: FakeApi, pool: HttpPool) -> None:
    h = http(pool)
    api.answers += [(503, {}, b"{}"), (502, {}, b"{}"), (200, {}, b'{"n": 1}')]
    res = await h.get(api.url + "/thing")
    assert res.json() == {"n": 1}
    assert len(api.hits) == 3
    api.answers += [(503, {}, b"{}"), (200, {}, b"{}")]
    with pytest.raises(RetryableError):
        await h.post(api.url + "/thing", json={})  # a POST is never repeated behind the caller's back
    assert len(api.hits) == 4
    api.answers.clear()
    api.default = (503, {}, b"{}")
    with pytest.raises(RetryableError):
        await h.get(api.url + "/thing")
    assert len(api.hits) == 4 + 3  # one try and two retries, then the error goes to the caller


async def test_check_false_returns_the_response_for_the_connector_to_classify(api: FakeApi, pool: HttpPool) -> None:
    api.answers.append((400, {"X-Request-Id": "r"}, b'{"Fault":{"Error":[{"code":"5010"}]}}'))
    res = await http(pool).post(api.url + "/x", json={}, check=False)
    assert (res.status, res.ok, res.request_id) == (400, False, "r")
    assert res.json()["Fault"]["Error"][0]["code"] == "5010"


async def test_no_answer_within_the_timeout_is_retryable(api: FakeApi, pool: HttpPool) -> None:
    api.hanging = True
    with pytest.raises(RetryableError, match=r"did not answer within 0\.2 s"):
        await http(pool).post(api.url + "/slow", json={}, timeout=0.2)


async def test_unreachable_host_is_retryable(pool: HttpPool) -> None:
    with pytest.raises(RetryableError, match="ClientConnectorError"):
        await http(pool).post("http://127.0.0.1:9/nothing", json={})


async def test_rate_limit_is_shared_by_every_connector_using_the_same_account(api: FakeApi, pool: HttpPool) -> None:
    poller, sink = http(pool, "poller"), http(pool, "sink")
    poller.limit("quickbooks:1185883450", 2, 60)
    sink.limit("quickbooks:1185883450", 500, 60)  # the first declaration wins: one budget per account
    await poller.get(api.url + "/a", rate_key="quickbooks:1185883450")
    await sink.post(api.url + "/b", json={}, rate_key="quickbooks:1185883450")
    assert len(api.hits) == 2
    blocked = asyncio.create_task(sink.post(api.url + "/c", json={}, rate_key="quickbooks:1185883450"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not blocked.done()
    assert len(api.hits) == 2  # the budget of 2/min is spent by the poller and the sink together
    await sink.post(api.url + "/d", json={}, rate_key="quickbooks:other-realm")
    assert len(api.hits) == 3
    blocked.cancel()


async def test_logs_never_show_credentials(api: FakeApi, pool: HttpPool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="integrand")
    api.answers.append(
        (
            200,
            {},
            b'{"token_type":"bearer","access_token":"at-SECRET-1","refresh_token":"rt-SECRET-2","expires_in":3600}',
        )
    )
    api.answers.append((401, {}, b'{"message":"token pat-SECRET-3 is revoked"}'))
    h = http(pool)
    h.add_secret("pat-SECRET-3")
    res = await h.post(
        api.url + "/oauth2/v1/tokens/bearer?client_secret=cs-SECRET-4&realm=1",
        data={"grant_type": "refresh_token", "refresh_token": "rt-OLD-5"},
        headers={"Authorization": "Basic Y2xpZW50OnNlY3JldA=="},
    )
    assert res.json()["access_token"] == "at-SECRET-1"
    with pytest.raises(AuthError) as info:
        await h.get(api.url + "/x", headers={"Authorization": "Bearer pat-SECRET-3"})
    logged = caplog.text + str(info.value)
    for secret in ("at-SECRET-1", "rt-SECRET-2", "pat-SECRET-3", "cs-SECRET-4", "Y2xpZW50OnNlY3JldA=="):
        assert secret not in logged
    assert "realm=1" in logged
    assert "***" in logged
    assert "→ POST" in caplog.text
    assert "← 200 POST" in caplog.text


async def test_sink_refused_credentials_pauses_alerts_once_and_shows_in_status(
    tmp_path: Path, api: FakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    api.default = (401, {"X-Request-Id": "auth-1"}, b'{"message":"token expired"}')
    body = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.crm]
connector = "bearer"
url = "{api.url}/contacts"
token = "tok-very-secret"
breaker = {{ open_for = "50ms", max_open_for = "50ms" }}

[[routes]]
from = "demo"
to = ["crm"]
"""
    from integrand.config import load_config

    settings = load_config(
        write_config(tmp_path, body, BASE), registry=registry_with(bearer="tests.connectors:BearerSink")
    )
    async with running(settings) as d, aiohttp.ClientSession() as s:
        for i in range(3):
            assert (await post_signed(s, hook_url(d), {"n": i}, f"m{i}"))[0] == 200
        await wait_for(lambda: len(api.hits) >= 4)  # the first try, then probes every 50 ms

        async def status() -> dict[str, Any]:
            async with s.get(admin_url(d, "/status")) as r:
                return dict(await r.json())

        st = await status()
        crm = st["breakers"]["crm"]
        assert crm["paused"] == "auth"
        assert "auth-1" in crm["auth_error"]
        assert st["deliveries"]["crm"].get("done", 0) == 0
        alerts = [r for r in caplog.records if "ALERT sink crm" in r.getMessage()]
        assert len(alerts) == 1
        assert "tok-very-secret" not in caplog.text
        # Re-authorized: the next probe succeeds, the sink resumes and everything waiting goes out.
        api.default = (200, {}, b"{}")

        async def all_done() -> bool:
            return bool((await status())["deliveries"]["crm"].get("done", 0) == 3)

        await wait_for(all_done)
        st = await status()
        assert st["breakers"]["crm"]["paused"] is None
        assert st["deliveries"]["crm"].get("dead", 0) == 0


def test_several_windows_on_one_key_hold_on_a_fake_clock() -> None:
    now = [0.0]

    async def sleep(d: float) -> None:
        now[0] += d

    async def run() -> list[float]:
        lim = RateLimiter([(10, 1.0), (500, 60.0)], clock=lambda: now[0], sleep=sleep)
        stamps = []
        for _ in range(1200):
            async with lim.slot():
                stamps.append(now[0])
        return stamps

    stamps = asyncio.run(run())
    for i in range(len(stamps)):
        assert sum(1 for t in stamps[i : i + 11] if t < stamps[i] + 1.0) <= 10
        assert sum(1 for t in stamps[i : i + 501] if t < stamps[i] + 60.0) <= 500
    assert stamps[-1] >= 120  # 1,200 requests at 500/min take at least two minutes


async def test_every_retry_passes_the_accounts_limiter(api: FakeApi, pool: HttpPool) -> None:
    h = http(pool)
    h.limit("qbo:1", limits=[(2, 60.0), (100, 3600.0)])
    api.default = (503, {}, b"{}")
    task = asyncio.create_task(h.get(api.url + "/flaky", rate_key="qbo:1"))
    # The pool retries a 503 twice; the third attempt asks the limiter too, and must wait a minute.
    await wait_for(lambda: pool.limiter("qbo:1").waited > 50)
    assert not task.done()
    assert len(api.hits) == 2
    task.cancel()


async def test_retries_can_be_turned_off_per_key_and_per_call(api: FakeApi, pool: HttpPool) -> None:
    h = http(pool)
    h.limit("no-retry", 100, 1.0, retries=0)
    api.default = (503, {"intuit_tid": "t-1"}, b"{}")
    with pytest.raises(RetryableError) as info:
        await h.get(api.url + "/a", rate_key="no-retry")
    assert info.value.request_id == "t-1"
    assert len(api.hits) == 1  # the caller (the dispatcher, the poller) decides when to try again
    with pytest.raises(RetryableError):
        await h.get(api.url + "/b", retries=0)
    assert len(api.hits) == 2
    with pytest.raises(RetryableError):
        await h.get(api.url + "/c", rate_key="no-retry", retries=1)  # the call's own number wins
    assert len(api.hits) == 4


async def test_429_without_retry_after_pauses_the_key_for_its_default(api: FakeApi, pool: HttpPool) -> None:
    h = http(pool)
    h.limit("quickbooks:9", limits=[(10, 1.0), (500, 60.0)], pause_429=60.0)
    api.answers.append((429, {"intuit_tid": "t-429"}, b'{"Fault":{"type":"ThrottleExceeded"}}'))
    with pytest.raises(RetryableError) as info:
        await h.get(api.url + "/q", rate_key="quickbooks:9")
    assert info.value.retry_after == 60.0
    assert info.value.request_id == "t-429"
    assert 50 < pool.paused_for("quickbooks:9") <= 60
    api.answers.append((429, {}, b"{}"))
    res = await h.get(api.url + "/q", rate_key="other", check=False)
    assert (res.status, res.retry_after) == (429, 1.0)  # an undeclared key: one second


async def test_classify_maps_a_fault_inside_a_200(api: FakeApi, pool: HttpPool) -> None:
    def fault(res: Response) -> Exception | None:
        data = res.json()
        if isinstance(data, dict) and "Fault" in data:
            return PermanentError(f"Fault {data['Fault']['Error'][0]['code']}", request_id=res.request_id)
        return None

    api.answers.append((200, {"intuit_tid": "t-200"}, b'{"Fault":{"Error":[{"code":"6240"}]}}'))
    with pytest.raises(PermanentError, match="6240") as info:
        await http(pool).post(api.url + "/customer", json={}, classify=fault)
    assert info.value.request_id == "t-200"
    api.answers.append((200, {}, b'{"Customer":{"Id":"1"}}'))
    res = await http(pool).post(api.url + "/customer", json={}, classify=fault)
    assert res.json() == {"Customer": {"Id": "1"}}
    api.answers.append((500, {}, b"{}"))
    with pytest.raises(RetryableError):  # no opinion from classify: the status decides
        await http(pool).post(api.url + "/customer", json={}, classify=fault)


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "Proxy-Authorization",
        "webhook-signature",
        "Stripe-Signature",
        "X-Hub-Signature-256",
        "X-HubSpot-Signature-v3",
        "intuit-signature",
        "X-Shopify-Hmac-Sha256",
        "X-Api-Key",
        "apikey",
        "X-Auth-Token",
        "access_token",
        "client_secret",
        "password",
        "Cookie",
        "Set-Cookie",
        "auth_code",
        "key",
        "X-Sig",
    ],
)
def test_credential_names_are_redacted_everywhere(name: str) -> None:
    """One rule for the listener's rejections and the HTTP helper's logs: a name hidden in one is hidden in both."""
    assert is_credential_name(name)
    assert redact_headers({name: "s3cr3t"}) == {name: REDACTED}
    assert listener_redact({name: "s3cr3t"}) == {name: REDACTED}


@pytest.mark.parametrize(
    "name", ["webhook-id", "X-Request-Id", "Content-Type", "author", "design", "monkey", "User-Agent"]
)
def test_ordinary_names_stay_visible(name: str) -> None:
    assert not is_credential_name(name)
    assert listener_redact({name: "v"}) == {name: "v"}


def test_the_redaction_list_is_bounded_and_keeps_the_first_and_the_newest() -> None:
    from integrand.httpclient import MAX_SECRETS, PINNED_SECRETS, Http, HttpPool, redact_text

    h = Http(HttpPool(), logging.getLogger("t"))
    h.add_secret("static-token-from-config")
    for i in range(24 * 365):  # a year of hourly access-token refreshes
        h.add_secret(f"access-token-{i:05d}")
    assert len(h._secrets) == PINNED_SECRETS + MAX_SECRETS
    shown = redact_text("Bearer access-token-08759 static-token-from-config access-token-00003", h._secrets)
    assert "access-token-08759" not in shown and "static-token-from-config" not in shown
    assert "access-token-00003" not in shown  # among the first ones: pinned
    assert "access-token-00100" in redact_text("access-token-00100", h._secrets)  # long renewed, long dead
