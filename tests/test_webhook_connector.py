"""The built-in webhook source: what each scheme makes of a body, and what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from integrand.builtin.webhook import WebhookConfig, WebhookConnector, dig
from integrand.connector import ConnectorContext, WebhookRequest
from integrand.errors import PayloadError, SignatureError, UnsupportedMediaType


class _NoState:
    async def get(self, key: str) -> Any:
        return None

    async def set(self, key: str, value: Any) -> None:
        return None


def connector(**cfg: Any) -> WebhookConnector:
    ctx = ConnectorContext(name="src", role="source", base_dir=Path("."), state=_NoState())
    return WebhookConnector(WebhookConfig.model_validate(cfg), ctx)


def request(body: bytes, headers: dict[str, str], content_type: str = "application/json") -> WebhookRequest:
    return WebhookRequest(
        source="src",
        method="POST",
        url="http://127.0.0.1/hooks/src",
        headers=CIMultiDict(headers),
        body=body,
        received_at="2026-01-01T00:00:00Z",
        content_type=content_type,
    )


def roundtrip(c: WebhookConnector, payload: Any, extra: dict[str, str] | None = None) -> WebhookRequest:
    """Sign as the provider would (the connector's own ``sign``), verify, and return the request."""
    now = 1_700_000_000
    body = orjson.dumps(payload)
    headers = c.sign(body, now, "dlv-1")
    assert headers is not None
    req = request(body, {**headers, **(extra or {})})
    c.verify(req, now)
    return req


def test_stripe_event_fields() -> None:
    c = connector(signature="stripe", secret="whsec_x")
    payload = {
        "id": "evt_1",
        "type": "customer.updated",
        "created": 1700000000,
        "data": {"object": {"id": "cus_9", "object": "customer"}},
    }
    [ev] = c.parse(roundtrip(c, payload))
    assert (ev.id, ev.type, ev.entity, ev.entity_id, ev.version) == (
        "evt_1",
        "customer.updated",
        "customer",
        "cus_9",
        None,  # an event's time is no version of its object: late Stripe events must not be dropped as stale
    )
    assert ev.occurred_at == "2023-11-14T22:13:20Z"


def test_github_event_fields() -> None:
    c = connector(signature="github", secret="gh")
    req = roundtrip(c, {"action": "opened", "number": 5}, {"X-GitHub-Event": "pull_request"})
    [ev] = c.parse(req)
    assert (ev.id, ev.type) == ("dlv-1", "pull_request.opened")


def test_shopify_event_fields() -> None:
    c = connector(signature="shopify", secret="shp", entity_id_field="id")
    req = roundtrip(c, {"id": 820982911946154508}, {"X-Shopify-Topic": "orders/create"})
    [ev] = c.parse(req)
    assert (ev.id, ev.type, ev.entity, ev.entity_id) == ("dlv-1", "orders/create", "orders", "820982911946154508")


def test_configured_paths_override_and_content_hash_id() -> None:
    c = connector(
        signature="none",
        allow_unsigned=True,
        type_field="kind",
        entity_field="obj.type",
        entity_id_field="obj.id",
        version_field="v",
    )
    payload = {"kind": "upd", "obj": {"type": "Customer", "id": 42}, "v": 3}
    [ev] = c.parse(request(orjson.dumps(payload), {}))
    assert (ev.type, ev.entity, ev.entity_id, ev.version) == ("upd", "Customer", "42", "3")
    [again] = c.parse(request(orjson.dumps(payload), {}))
    assert ev.id == again.id  # a redelivered identical body is a duplicate
    assert ev.id.startswith("h_")
    [other] = c.parse(request(orjson.dumps({**payload, "v": 4}), {}))
    assert other.id != ev.id


def test_id_header_for_generic_hmac() -> None:
    c = connector(signature="hmac-sha256", secret="s", header="X-Sig", prefix="sha256=", id_header="X-Delivery")
    [ev] = c.parse(roundtrip(c, {"a": 1}))
    assert ev.id == "dlv-1"


@pytest.mark.parametrize("ct", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_non_json_content_type_is_415(ct: str) -> None:
    c = connector(signature="none", allow_unsigned=True)
    with pytest.raises(UnsupportedMediaType, match="Content-Type must be application/json"):
        c.parse(request(b"{}", {}, content_type=ct))


def test_vendor_json_types_are_accepted() -> None:
    c = connector(signature="none", allow_unsigned=True)
    assert len(c.parse(request(b"{}", {}, content_type="application/cloudevents+json"))) == 1


def test_malformed_json_is_400_with_the_parser_message() -> None:
    c = connector(signature="none", allow_unsigned=True)
    with pytest.raises(PayloadError, match="body is not valid JSON"):
        c.parse(request(b'{"a": ', {}))


def test_verify_refuses_a_wrong_secret() -> None:
    good = connector(signature="stripe", secret="whsec_good")
    bad = connector(signature="stripe", secret="whsec_bad")
    body = b'{"id":"evt"}'
    headers = bad.sign(body, 1_700_000_000, "x")
    assert headers is not None
    with pytest.raises(SignatureError):
        good.verify(request(body, headers), 1_700_000_000)


def test_config_rules() -> None:
    with pytest.raises(ValueError, match="needs a secret"):
        WebhookConfig.model_validate({"signature": "github"})
    with pytest.raises(ValueError, match="takes no secret"):
        WebhookConfig.model_validate({"signature": "none", "secret": "x"})
    assert WebhookConfig.model_validate({"signature": "github", "secret": ["a", "b"]}).secrets == ["a", "b"]


def test_dig() -> None:
    data = {"a": {"b": [{"c": 1}]}}
    assert dig(data, "a.b.0.c") == 1
    assert dig(data, "a.x") is None
    assert dig(data, "a.b.5") is None
    assert dig(data, None) is None
