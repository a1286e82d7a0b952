"""EventTemplate, envelope_event and message_event: what broker connectors share from integrand.connector."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from integrand.connector import Event, EventTemplate, PayloadError, envelope_event, message_event


def test_template_renders_event_fields_as_safe_tokens() -> None:
    ev = Event(id="e1", source="shop", type="order.created", data={}, entity="order", entity_id="a b*")
    assert EventTemplate("{source}.{entity}.{type}").render(ev) == "shop.order.order.created"
    assert EventTemplate("orders.{entity_id}.{id}").render(ev) == "orders.a_b_.e1"
    assert EventTemplate("x.{entity}").render(Event(id="1", source="s", type="t", data=None)) == "x._"


def test_template_names_the_unknown_field() -> None:
    with pytest.raises(ValueError, match=r"unknown field \{customer\} \(use entity, entity_id, id, source, type\)"):
        EventTemplate("{source}.{customer}")
    with pytest.raises(ValueError, match=r"unknown field \{type\}"):
        EventTemplate.check("{type!r}")


def test_envelope_round_trip_and_malformed_envelopes() -> None:
    ev = Event(id="e1", source="shop", type="t", data={"n": 1}, entity="order", entity_id="7", version="3")
    assert envelope_event(orjson.loads(ev.to_json())) == ev
    assert envelope_event({"order": 1}) is None
    assert envelope_event([1, 2]) is None
    assert envelope_event({"id": "1", "source": "s", "type": "t", "data": 1, "colour": "red"}) is not None
    with pytest.raises(PayloadError, match="meta an object"):
        envelope_event({"id": "1", "source": "s", "type": "t", "data": 1, "meta": "x"})
    with pytest.raises(PayloadError, match="must be strings"):
        envelope_event({"id": 1, "source": "s", "type": "t", "data": 1})


def test_message_event_keeps_an_envelope_and_wraps_other_json() -> None:
    ev = Event(id="e1", source="shop", type="order.created", data={"n": 1}, entity="order", entity_id="7", version="3")

    def mk(raw: bytes, **extra: Any) -> Event:
        return message_event(
            raw, source="bus", fallback_id=lambda: "s:9", type="subject.x", meta={"b": {"q": 1}}, **extra
        )

    got = mk(ev.to_json())
    assert (got.id, got.source, got.type, got.data) == ("shop:e1", "bus", "order.created", {"n": 1})
    assert (got.entity, got.entity_id, got.version) == ("order", "7", "3")
    assert got.meta == {"origin": "shop", "b": {"q": 1}}
    assert mk(ev.to_json(), message_id="m1").id == "m1"
    plain = mk(b'{"order": 5}', entity="order", entity_id="5", version="2")
    assert (plain.id, plain.type, plain.data, plain.entity_id, plain.meta) == (
        "s:9",
        "subject.x",
        {"order": 5},
        "5",
        {"b": {"q": 1}},
    )
    as_json = mk(ev.to_json(), format="json")
    assert as_json.type == "subject.x" and as_json.data["id"] == "e1"  # the envelope is only data here
    with pytest.raises(PayloadError, match="not JSON"):
        mk(b"{nope")
    with pytest.raises(PayloadError, match="not an integrand envelope"):
        mk(b'{"order": 5}', format="envelope")
    with pytest.raises(PayloadError, match="meta an object"):
        mk(b'{"id": "1", "source": "s", "type": "t", "data": 1, "meta": 3}')
