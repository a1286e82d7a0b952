"""The generic ``webhook`` source: Standard Webhooks, Stripe, GitHub, Shopify, plain HMAC, or none."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import ValidationInfo, field_validator, model_validator

from integrand import signing
from integrand.connector import (
    Connector,
    ConnectorConfig,
    Duration,
    Event,
    PayloadError,
    SecretList,
    SignatureError,
    UnsupportedMediaType,
    WebhookRequest,
    WebhookSource,
    content_id,
)

Scheme = Literal["standard-webhooks", "stripe", "github", "shopify", "hmac-sha256", "none"]


class WebhookConfig(ConnectorConfig):
    signature: Scheme
    secret: SecretList | None = None
    tolerance: Duration = signing.DEFAULT_TOLERANCE
    # hmac-sha256 only: where the signature is and how it is written.
    header: str = "X-Signature"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    timestamp_header: str | None = None
    # Where the event's identity comes from when the scheme does not say (dotted paths into the JSON body).
    id_header: str | None = None
    type_field: str | None = None
    entity_field: str | None = None
    entity_id_field: str | None = None
    version_field: str | None = None
    # signature = "none" lets anyone on the network post events; it must be asked for in so many words.
    allow_unsigned: bool = False

    @model_validator(mode="after")
    def _secret_matches_scheme(self) -> WebhookConfig:
        if self.signature == "none":
            if self.secret is not None:
                raise ValueError("signature = 'none' takes no secret (remove it or choose a scheme)")
            if not self.allow_unsigned:
                raise ValueError(
                    "signature = 'none' accepts events from anyone who can reach the port; "
                    "choose a signing scheme, or set allow_unsigned = true to accept that"
                )
        elif self.secret is None:
            raise ValueError(f"signature = {self.signature!r} needs a secret")
        return self

    @field_validator("secret")
    @classmethod
    def _secret_strength(cls, v: SecretList | None, info: ValidationInfo) -> SecretList | None:
        """Per key, so the message names ``secret``: a key anyone could guess is a config error."""
        # A lazily loaded secret (the CLI's) is not read just to check it; the daemon reads and checks it.
        for s in [x.reveal() for x in v if x.resolved] if v is not None else []:
            if info.data.get("signature") == "standard-webhooks":
                signing.check_standard_secret(s)  # raises ValueError with the expected format and size
            elif not s:
                raise ValueError("secret is empty: an empty HMAC key lets anyone sign")
        return v

    def warnings(self) -> list[str]:
        """Accepted but worth saying at ``check`` and at start."""
        if self.signature == "none":
            return ["signature = 'none': webhooks are accepted unauthenticated from anyone who can reach the port"]
        return []

    @property
    def secrets(self) -> list[str]:
        return self.secret.reveal_all() if self.secret is not None else []


def dig(data: Any, path: str | None) -> Any:
    """Follow a dotted path (``data.object.id``) into parsed JSON; None where it leads nowhere."""
    if path is None:
        return None
    if type(data) is dict and "." not in path:  # the usual case, taken on every webhook: one key
        return data.get(path)
    for part in path.split("."):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def _text(v: Any) -> str | None:
    return None if v is None or isinstance(v, dict | list) else str(v)


class WebhookConnector(Connector[WebhookConfig], WebhookSource):
    """Receives signed JSON webhooks from any service that uses a common signing scheme."""

    Config = WebhookConfig

    @functools.cached_property
    def _secrets(self) -> list[str]:
        """Revealed once: the config is immutable for the connector's life."""
        return self.config.secrets

    def verify(self, request: WebhookRequest, now: float) -> None:
        c, h, body, secrets = self.config, request.headers, request.body, self._secrets
        if c.signature == "standard-webhooks":
            signing.standard_verify(secrets, h, body, now, c.tolerance)
        elif c.signature == "stripe":
            signing.stripe_verify(secrets, h, body, now, c.tolerance)
        elif c.signature == "github":
            signing.github_verify(secrets, h, body)
        elif c.signature == "shopify":
            signing.hmac_verify(secrets, h, body, header="X-Shopify-Hmac-Sha256", encoding="base64")
        elif c.signature == "hmac-sha256":
            signing.hmac_verify(
                secrets,
                h,
                body,
                header=c.header,
                encoding=c.encoding,
                prefix=c.prefix,
                timestamp_header=c.timestamp_header,
                now=now,
                tolerance=c.tolerance,
            )

    def parse(self, request: WebhookRequest) -> list[Event]:
        ct = request.content_type
        if not (ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))):
            raise UnsupportedMediaType(f"Content-Type must be application/json, got {ct or 'none'!r}")
        try:
            data = orjson.loads(request.body)
        except orjson.JSONDecodeError as e:
            raise PayloadError(f"body is not valid JSON: {e}") from None
        c, h = self.config, request.headers
        scheme = c.signature
        ev_id = type_ = entity = entity_id = version = occurred = None
        meta: dict[str, Any] = {}
        if scheme == "standard-webhooks":
            ev_id = h.get("webhook-id")
            type_ = _text(dig(data, "type"))
            occurred = _text(dig(data, "timestamp"))
        elif scheme == "stripe":
            ev_id = _text(dig(data, "id"))
            type_ = _text(dig(data, "type"))
            entity = _text(dig(data, "data.object.object"))
            entity_id = _text(dig(data, "data.object.id"))
            created = dig(data, "created")
            if isinstance(created, int):
                # Not a version: `created` dates the event, not the object, and Stripe events are a log
                # (invoice.paid after invoice.updated), so none may be dropped as "stale". Ordering per
                # object still holds through entity/entity_id; set version_field to opt in to versions.
                occurred = datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z")
        elif scheme == "github":
            ev_id = h.get("X-GitHub-Delivery")
            gh_event = h.get("X-GitHub-Event")
            action = _text(dig(data, "action"))
            type_ = f"{gh_event}.{action}" if gh_event and action else gh_event
            meta["hook_id"] = h.get("X-GitHub-Hook-ID")
        elif scheme == "shopify":
            ev_id = h.get("X-Shopify-Webhook-Id")
            topic = h.get("X-Shopify-Topic")
            type_ = topic
            entity = topic.split("/", 1)[0] if topic else None
            entity_id = _text(dig(data, "id"))
            occurred = h.get("X-Shopify-Triggered-At")
        if c.id_header:
            ev_id = h.get(c.id_header) or ev_id
        if c.type_field:
            type_ = _text(dig(data, c.type_field)) or type_
        if c.entity_field:
            entity = _text(dig(data, c.entity_field)) or entity
        if c.entity_id_field:
            entity_id = _text(dig(data, c.entity_id_field)) or entity_id
        if c.version_field:
            version = _text(dig(data, c.version_field)) or version
        if not ev_id:
            ev_id = content_id(request.source, request.body)
        if meta:
            meta = {k: v for k, v in meta.items() if v is not None}
        return [
            Event(
                id=ev_id,
                source=request.source,
                type=type_ or "webhook",
                data=data,
                received_at=request.received_at,
                entity=entity,
                entity_id=entity_id,
                version=version,
                occurred_at=occurred,
                meta=meta,
            )
        ]

    def sign(self, body: bytes, now: float, delivery_id: str) -> dict[str, str] | None:
        c = self.config
        ts = int(now)
        secret = c.secrets[0] if c.secrets else ""
        if c.signature == "standard-webhooks":
            return {
                "webhook-id": delivery_id,
                "webhook-timestamp": str(ts),
                "webhook-signature": signing.standard_sign(secret, delivery_id, ts, body),
            }
        if c.signature == "stripe":
            return {"Stripe-Signature": signing.stripe_sign(secret, ts, body)}
        if c.signature == "github":
            return {
                "X-Hub-Signature-256": signing.github_sign(secret, body),
                "X-GitHub-Delivery": delivery_id,
                "X-GitHub-Event": "integrand_test",
            }
        if c.signature == "shopify":
            return {
                "X-Shopify-Hmac-Sha256": signing.hmac_sign(secret, body, encoding="base64"),
                "X-Shopify-Webhook-Id": delivery_id,
                "X-Shopify-Topic": "integrand/test",
            }
        headers: dict[str, str] = {}
        if c.id_header:
            headers[c.id_header] = delivery_id
        if c.signature == "hmac-sha256":
            stamp = ts if c.timestamp_header else None
            headers[c.header] = signing.hmac_sign(secret, body, encoding=c.encoding, prefix=c.prefix, timestamp=stamp)
            if c.timestamp_header:
                headers[c.timestamp_header] = str(ts)
        return headers


__all__ = ["SignatureError", "WebhookConfig", "WebhookConnector", "dig"]
