"""The ``http`` sink: POST each event as JSON, signed the Standard Webhooks way, idempotency key attached."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import field_validator

from integrand import signing
from integrand.connector import (
    Connector,
    ConnectorConfig,
    Duration,
    Event,
    SecretValue,
    Sink,
)


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
        if v is not None and v.resolved:  # a lazily loaded one (the CLI's) is not read just to check it
            signing.check_standard_secret(v.reveal())
        return v


class HttpSink(Connector[HttpConfig], Sink):
    """Delivers to any HTTP endpoint; 2xx is success, 408/429/5xx and network errors retry, 401/403 pause, other 4xx give up."""

    Config = HttpConfig
    batch_size = 1

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
        await self.deliver_result(event)

    async def deliver_result(self, event: Event) -> Mapping[str, Any] | None:
        """POST the event; a JSON object in a 2xx answer is the result a saga's later steps can map from."""
        # The shared helper maps the answer (error_for_status) and keeps the endpoint's X-Request-Id.
        body = event.to_json()
        resp = await self.ctx.http.request(
            self.config.method,
            self.config.url,
            data=body,
            headers=self.headers_for(event, body, self.ctx.clock()),
            timeout=self.config.timeout,
        )
        if not resp.body.strip() or "json" not in resp.headers.get("Content-Type", "").lower():
            return None
        try:
            answer = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            return None  # delivered all the same: the endpoint simply says nothing a later step could use
        return answer if isinstance(answer, dict) else None
