"""The ``http`` sink: POST each event as JSON, signed the Standard Webhooks way, idempotency key attached."""

from __future__ import annotations

import time

import aiohttp
from aiohttp_retry import ExponentialRetry, RetryClient
from pydantic import field_validator

from integrand import signing
from integrand.backoff import parse_retry_after
from integrand.connector import (
    Connector,
    ConnectorConfig,
    Duration,
    Event,
    PermanentError,
    RetryableError,
    SecretValue,
    Sink,
)

RETRYABLE_STATUS = frozenset({408, 425, 429})


class HttpConfig(ConnectorConfig):
    url: str
    method: str = "POST"
    timeout: Duration = 15.0
    headers: dict[str, str] = {}
    secret: SecretValue | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v.upper() not in {"POST", "PUT", "PATCH"}:
            raise ValueError("method must be POST, PUT or PATCH")
        return v.upper()

    @field_validator("secret")
    @classmethod
    def _whsec(cls, v: SecretValue | None) -> SecretValue | None:
        if v is not None:
            signing.standard_key(v.reveal())
        return v


class HttpSink(Connector[HttpConfig], Sink):
    """Delivers to any HTTP endpoint; 2xx is success, 408/429/5xx and network errors retry, other 4xx give up."""

    Config = HttpConfig
    batch_size = 1

    _client: RetryClient | None = None

    async def start(self) -> None:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        # aiohttp-retry only covers a connection dropped under us (a stale keep-alive); every other
        # failure goes back to the dispatcher, whose backoff and breaker see the whole picture.
        options = ExponentialRetry(
            attempts=2,
            start_timeout=0.05,
            statuses=set(),
            exceptions={aiohttp.ServerDisconnectedError},
            retry_all_server_errors=False,
        )
        self._client = RetryClient(client_session=session, retry_options=options, raise_for_status=False)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def headers_for(self, event: Event, body: bytes, now: float) -> dict[str, str]:
        msg_id = event.key
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": msg_id,
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now)),
            **self.config.headers,
        }
        if self.config.secret is not None:
            headers["webhook-signature"] = signing.standard_sign(self.config.secret.reveal(), msg_id, int(now), body)
        return headers

    async def deliver(self, event: Event) -> None:
        if self._client is None:
            raise RetryableError("http sink is not started")
        url = self.config.url
        body = event.to_json()
        now = time.time()
        try:
            async with self._client.request(
                self.config.method, url, data=body, headers=self.headers_for(event, body, now)
            ) as resp:
                status = resp.status
                text = (await resp.text(errors="replace"))[:500]
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                request_id = resp.headers.get("X-Request-Id") or None
        except TimeoutError:
            raise RetryableError(f"{url} did not answer within {self.config.timeout:g} s") from None
        except aiohttp.ClientError as e:
            raise RetryableError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
        if 200 <= status < 300:
            return
        message = f"HTTP {status} from {url}: {text.strip() or '(empty body)'}"
        if status >= 500 or status in RETRYABLE_STATUS:
            raise RetryableError(message, retry_after=retry_after, request_id=request_id)
        raise PermanentError(message, request_id=request_id)
