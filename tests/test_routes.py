"""Route mappings: conversions, validation with key paths, the shipped QuickBooks ⇄ HubSpot example."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from integrand.config import load_config
from integrand.connector import Connector, ConnectorConfig, Enricher, Event, PollingSource, PollResult, Sink
from integrand.errors import ConfigError
from integrand.routes import CONVERSIONS, MappingError, RouteSettings, dig, load_mapping

from .connectors import registry_with
from .helpers import BASE, write_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "quickbooks-hubspot"

# A Customer as the QuickBooks Online API returns it (Intuit Accounting API, Customer entity; read response).
QBO_CUSTOMER = {
    "Id": "58",
    "SyncToken": "3",
    "DisplayName": "Amy's Bird Sanctuary",
    "GivenName": " Amy ",
    "FamilyName": "Lauterbach",
    "CompanyName": "Amy's Bird Sanctuary",
    "PrimaryEmailAddr": {"Address": "Birds@Intuit.com "},
    "PrimaryPhone": {"FreeFormNumber": "(650) 555-3311"},
    "BillAddr": {
        "Line1": "4581 Finch St.",
        "City": "Bayshore",
        "CountrySubDivisionCode": "CA",
        "PostalCode": "94326",
        "Country": "USA",
    },
    "Balance": 239.0,
    "Active": True,
    "MetaData": {"CreateTime": "2024-09-11T16:48:43-07:00", "LastUpdatedTime": "2024-09-19T13:16:17-07:00"},
}


def qbo_event(customer: dict[str, Any]) -> Event:
    """As the quickbooks source's enriched events look: the notification, with the object under data.object."""
    data = {
        "realm": "1185883450",
        "entity": "Customer",
        "id": customer["Id"],
        "operation": "Update",
        "object": customer,
    }
    return Event(id="q1", source="quickbooks", type="customer.updated", data=data, entity="Customer", entity_id="58")


def mapping_route(name: str, **extra: Any) -> RouteSettings:
    return RouteSettings.model_validate(
        {"from": "a", "to": ["b"], "mapping": str(EXAMPLE / name), **extra}, context={"base_dir": EXAMPLE}
    )


def test_conversions() -> None:
    c = CONVERSIONS
    assert c["date"]("2015-10-05T14:42:19-0700") == "2015-10-05"  # the date as written, not shifted to UTC
    assert c["datetime"]("2015-10-05T14:42:19-0700") == "2015-10-05T21:42:19Z"
    assert c["datetime"](1427997766000) == "2015-04-02T18:02:46Z"  # HubSpot's own example, epoch ms
    assert c["datetime"]("1427997766") == "2015-04-02T18:02:46Z"
    assert c["epoch_ms"]("2015-05-01") == 1430438400000  # midnight UTC, as HubSpot date properties need
    assert c["date"]("2025-09-10T21:31:25.179851517Z") == "2025-09-10"
    assert c["int"]("1,250") == 1250
    assert c["number"]("239.00") == 239
    assert c["number"]("239.5") == 239.5
    assert c["float"](3) == 3.0
    assert c["bool"]("Yes") is True
    assert c["bool"]("false") is False
    assert c["str"](True) == "true"
    assert (c["lower"]("AbC"), c["upper"]("ca"), c["title"]("amy lauterbach"), c["strip"](" x ")) == (
        "abc",
        "CA",
        "Amy Lauterbach",
        "x",
    )
    for name, bad in (("int", "4.5"), ("number", "n/a"), ("bool", "maybe"), ("date", "yesterday"), ("int", True)):
        with pytest.raises(ValueError):  # noqa: PT011 - each message names the value; any ValueError will do
            c[name](bad)


def test_dig_follows_dots_and_list_positions() -> None:
    doc = {"data": {"Line": [{"Amount": 5}, {"Amount": 7}], "x": None}}
    assert dig(doc, "data.Line.1.Amount") == 7
    assert dig(doc, "data.Line.-1.Amount") == 7
    assert dig(doc, "data.Line.2.Amount") is None
    assert dig(doc, "data.x.y") is None
    assert dig(doc, "data.Line.Amount") is None


def test_qbo_customer_to_hubspot_contact() -> None:
    m, problems = load_mapping(mapping_route("qbo-customer-to-hubspot-contact.toml"), "routes[0]")
    assert problems == []
    assert m is not None
    contact = m.apply(qbo_event(QBO_CUSTOMER))
    assert contact == {
        "email": "birds@intuit.com",
        "firstname": "Amy",
        "lastname": "Lauterbach",
        "company": "Amy's Bird Sanctuary",
        "phone": "(650) 555-3311",
        "address": "4581 Finch St.",
        "city": "Bayshore",
        "state": "CA",
        "zip": "94326",
        "country": "United States",
        "lifecyclestage": "customer",
        "qbo_customer_since": 1726012800000,  # 2024-09-11T00:00:00Z
        "qbo_balance": 239,
        "qbo_customer_id": "58",
    }
    # Optional fields that are absent are left out; an unknown country falls back to its default.
    sparse = {"Id": "9", "PrimaryEmailAddr": {"Address": "a@b.co"}, "BillAddr": {"Country": "Narnia"}}
    assert m.apply(qbo_event(sparse)) == {
        "email": "a@b.co",
        "country": "",
        "lifecyclestage": "customer",
        "qbo_customer_id": "9",
    }
    with pytest.raises(MappingError, match=r"map\.email: required, but data\.object\.PrimaryEmailAddr\.Address"):
        m.apply(qbo_event({"Id": "10", "GivenName": "No Email"}))
    with pytest.raises(MappingError, match=r"map\.qbo_balance: cannot convert 'lots'"):
        m.apply(qbo_event({**QBO_CUSTOMER, "Balance": "lots"}))


def test_hubspot_contact_to_qbo_customer_and_back_is_stable() -> None:
    to_hs, _ = load_mapping(mapping_route("qbo-customer-to-hubspot-contact.toml"), "r")
    to_qbo, problems = load_mapping(mapping_route("hubspot-contact-to-qbo-customer.toml"), "r")
    assert problems == []
    assert to_hs is not None and to_qbo is not None
    contact = to_hs.apply(qbo_event(QBO_CUSTOMER))
    # HubSpot's CRM API returns every property as a string.
    hs_object = {"id": "501", "properties": {k: str(v) for k, v in contact.items()}}
    hs_event = Event(
        id="h1", source="hubspot", type="contact.propertyChange", data={"object": hs_object}, entity="contact"
    )
    customer = to_qbo.apply(hs_event)
    assert customer == {
        "PrimaryEmailAddr": {"Address": "birds@intuit.com"},
        "DisplayName": "Amy Lauterbach",
        "GivenName": "Amy",
        "FamilyName": "Lauterbach",
        "CompanyName": "Amy's Bird Sanctuary",
        "PrimaryPhone": {"FreeFormNumber": "(650) 555-3311"},
        "BillAddr": {
            "Line1": "4581 Finch St.",
            "City": "Bayshore",
            "CountrySubDivisionCode": "CA",
            "PostalCode": "94326",
            "Country": "United States",
        },
    }
    # A template with a missing part leaves no stray space; with every part missing the field is missing.
    hs_object["properties"] = {"email": "x@y.z", "lastname": "Solo"}
    assert to_qbo.apply(hs_event)["DisplayName"] == "Solo"
    hs_object["properties"] = {"email": "x@y.z"}
    with pytest.raises(MappingError, match=r"map\.DisplayName: required"):
        to_qbo.apply(hs_event)


class _AnySource(Connector[ConnectorConfig], PollingSource):
    """A source with no options, standing in for a real one in config tests."""

    async def poll(self, cursor: Any) -> PollResult:
        return PollResult([], cursor)


class _AnySink(Connector[ConnectorConfig], Sink):
    """A sink with no options."""

    async def deliver(self, event: Event) -> None:
        return None


def _problems(tmp_path: Path, routes: str, files: dict[str, str] | None = None) -> list[str]:
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    body = f"""
[sources.a]
connector = "src"
[sources.b]
connector = "src"
[sinks.x]
connector = "snk"
{routes}
"""
    reg = registry_with(src="tests.test_routes:_AnySource", snk="tests.test_routes:_AnySink")
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, body, BASE), registry=reg)
    return err.value.problems


def test_mapping_problems_are_reported_at_startup_with_key_paths(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        """
[[routes]]
from = "a"
to = ["x"]
enrich = true
loop_guard = { key = "mail", echo_source = "bb" }
[routes.map]
email = { path = "data.email", convert = ["strip", "lowr"] }
name = { path = "data.name", const = "x" }
country = { path = "data.country", lookup = "countrys" }
bad = { path = "data..x" }
[routes.lookups.countries]
US = "United States"

[[routes]]
from = "b"
to = ["x"]
mapping = "missing.toml"
""",
    )
    assert problems == [
        "routes[0].map.email.convert: unknown conversion 'lowr' (did you mean 'lower'?); "
        "known: " + ", ".join(CONVERSIONS),
        "routes[0].map.name: give exactly one of path, const or template",
        "routes[0].map.bad.path: 'data..x' is not a dotted path such as 'data.customer.email'",
        f"routes[1].mapping: cannot read {tmp_path / 'missing.toml'}: No such file or directory",
    ]
    problems = _problems(
        tmp_path,
        """
[[routes]]
from = "a"
to = ["x"]
enrich = true
loop_guard = { key = "mail", echo_source = "bb" }
[routes.map]
email = "data.email"
country = { path = "data.country", lookup = "countrys" }
[routes.lookups.countries]
US = "United States"

[[routes]]
from = "b"
to = ["x"]
mapping = "bad.toml"
""",
        {"bad.toml": '[map]\nemail = { path = "data.email", convert = "upper", extra = 1 }\n'},
    )
    assert problems == [
        "routes[0].loop_guard.echo_source: no source named 'bb' (did you mean 'b'?)",
        "routes[0].enrich: source 'a' (connector 'src') cannot fetch records",
        "routes[0].map.country.lookup: no lookup table 'countrys' (tables: countries)",
        "routes[0].loop_guard.key: 'mail' is not a target of the mapping (targets: email, country)",
        "routes[1].mapping(bad.toml).map.email.extra: unknown key",
    ]


def test_shipped_example_config_is_valid() -> None:
    """Routes, mappings and loop guards of the example, with stand-ins for the two plugins' own keys.

    The plugins validate their own tables (their tests); this checks everything the example adds.
    """
    from integrand.config import parse_config

    raw = tomllib.loads((EXAMPLE / "config.toml").read_text())
    assert {t["connector"] for t in (*raw["sources"].values(), *raw["sinks"].values())} == {"quickbooks", "hubspot"}
    for table in (*raw["sources"].values(), *raw["sinks"].values()):
        for k in [k for k in table if k != "connector"]:
            del table[k]
    reg = registry_with(quickbooks="tests.test_routes:_StandIn", hubspot="tests.test_routes:_StandIn")
    settings = parse_config(raw, base_dir=EXAMPLE, path=EXAMPLE / "config.toml", registry=reg)
    [to_hs, to_qbo] = settings.routes
    assert (to_hs.from_, to_hs.to, to_hs.enrich) == ("quickbooks", ["hubspot_contacts"], True)
    assert to_hs.loop_guard is not None and to_hs.loop_guard.echo_source == "hubspot"
    assert to_qbo.loop_guard is not None and to_qbo.loop_guard.key == "PrimaryEmailAddr.Address"
    assert settings.warnings == ()


class _StandIn(Connector[ConnectorConfig], PollingSource, Enricher, Sink):
    """Stands in for a plugin that is not installed here: a source (with fetch) and a sink."""

    async def poll(self, cursor: Any) -> PollResult:
        return PollResult([], cursor)

    async def deliver(self, event: Event) -> None:
        return None

    async def fetch(self, event: Event) -> Event:
        return event


def test_the_mapping_root_has_every_field_of_the_event() -> None:
    import dataclasses

    from integrand.events import Event
    from integrand.routes import envelope

    ev = Event(id="a", source="s", type="t", data={"x": 1}, entity="e", entity_id="1", version="2", meta={"m": 1})
    assert envelope(ev) == ev.to_dict()
    assert set(envelope(ev)) == {f.name for f in dataclasses.fields(Event)}
