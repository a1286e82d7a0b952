"""EventTemplate and envelope_event: what broker connectors share from integrand.connector."""

from __future__ import annotations

import pytest

from integrand.connector import Event, EventTemplate, PayloadError, envelope_event


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
    import orjson

    assert envelope_event(orjson.loads(ev.to_json())) == ev
    assert envelope_event({"order": 1}) is None
    assert envelope_event([1, 2]) is None
    assert envelope_event({"id": "1", "source": "s", "type": "t", "data": 1, "colour": "red"}) is not None
    with pytest.raises(PayloadError, match="meta an object"):
        envelope_event({"id": "1", "source": "s", "type": "t", "data": 1, "meta": "x"})
    with pytest.raises(PayloadError, match="must be strings"):
        envelope_event({"id": 1, "source": "s", "type": "t", "data": 1})
