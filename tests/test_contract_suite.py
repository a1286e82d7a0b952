"""The contract suite itself: it passes a well-behaved connector and names what a misbehaving one gets wrong."""

from __future__ import annotations

import pytest

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""

GOOD = '''
import hashlib, hmac
from integrand.connector import (
    Connector, ConnectorConfig, Event, PollingSource, PollResult, SecretValue, SignatureError, Sink,
    WebhookRequest, WebhookSource,
)
from integrand.testing import ConnectorContract

DELIVERED = {}

class Cfg(ConnectorConfig):
    secret: SecretValue
    label: str = "x"

class Good(Connector[Cfg], WebhookSource, PollingSource, Sink):
    """A well-behaved connector."""
    Config = Cfg

    def _mac(self, body):
        return hmac.new(self.config.secret.reveal().encode(), body, hashlib.sha256).hexdigest()

    def verify(self, request: WebhookRequest, now: float) -> None:
        if not hmac.compare_digest(request.headers.get("X-Sig", ""), self._mac(request.body)):
            raise SignatureError("bad signature")

    def parse(self, request):
        return [Event(id=hashlib.sha256(request.body).hexdigest(), source=self.ctx.name, type="t", data={})]

    def sign(self, body, now, delivery_id):
        return {"X-Sig": self._mac(body)}

    async def poll(self, cursor):
        n = (cursor or 0) + 1
        return PollResult(events=[Event(id=f"e{min(n, 3)}", source=self.ctx.name, type="t", data={})],
                          cursor=min(n, 3), more=n < 3)

    async def deliver(self, event):
        DELIVERED[event.key] = event

class TestGood(ConnectorContract):
    connector_class = Good
    config = {"secret": "s3cret"}
'''

BAD = """
import uuid
from pathlib import Path
from integrand.connector import (
    Connector, ConnectorConfig, Event, PermanentError, PollingSource, PollResult, Sink, WebhookSource,
)
from integrand.testing import ConnectorContract

class Bad(Connector[ConnectorConfig], WebhookSource, PollingSource, Sink):
    Config = ConnectorConfig
    seen = set()

    async def start(self):
        Path("cursor.txt").write_text("0")

    def verify(self, request, now):
        pass

    def parse(self, request):
        return [Event(id=uuid.uuid4().hex, source=self.ctx.name, type="t", data={})]

    def sign(self, body, now, delivery_id):
        return {}

    async def poll(self, cursor):
        return PollResult(events=[], cursor=(1, 2), more=False)

    async def deliver(self, event):
        if event.key in self.seen:
            raise PermanentError("duplicate")
        self.seen.add(event.key)

class TestBad(ConnectorContract):
    connector_class = Bad


import pytest
from aiohttp import web
from integrand.connector import RetryableError
from integrand.testing import fake_api_server


class SwallowCfg(ConnectorConfig):
    url: str


class Swallow(Connector[SwallowCfg], Sink):
    '''Turns every failure into a bare RetryableError: Retry-After and the request id are lost.'''
    Config = SwallowCfg

    async def deliver(self, event):
        try:
            await self.ctx.http.post(self.config.url, json=event.data)
        except Exception:
            raise RetryableError("it failed") from None


class TestSwallow(ConnectorContract):
    connector_class = Swallow

    @pytest.fixture
    async def fake_api(self):
        self.fault = None

        async def handle(request):
            if self.fault:
                return web.json_response({}, status=self.fault[0], headers=self.fault[1])
            return web.json_response({})

        app = web.Application()
        app.router.add_post("/x", handle)
        async with fake_api_server(app) as url:
            yield url

    @pytest.fixture
    def connector_config(self, fake_api):
        return {"url": fake_api + "/x"}

    @pytest.fixture
    def api_faults(self):
        def fail(status, headers):
            self.fault = None if status is None else (status, headers)
        return fail
"""


def test_a_well_behaved_connector_passes_every_check(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI.replace("auto", "strict"))  # works without asyncio_mode = auto too
    pytester.makepyfile(test_good=GOOD)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, skipped=3)  # no reconcile, no fetch, no api_faults


def test_a_misbehaving_connector_fails_and_is_told_why(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_bad=BAD)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, failed=6, skipped=7)
    out = result.stdout.str()
    assert "say in one line what the connector is for" in out  # no docstring
    assert "the connector wrote files of its own (use ctx.state): ['cursor.txt']" in out
    assert "event ids must be stable" in out
    assert "the cursor must survive a JSON round trip" in out
    assert "PermanentError: duplicate" in out  # redelivery of the same key must be harmless
    assert "Retry-After must reach RetryableError.retry_after" in out  # TestSwallow
