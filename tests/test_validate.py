"""Route validation: JSON Schema 2020-12, every violation with its path, checked at startup, never half-delivered."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
import pytest

from integrand.errors import ConfigError
from integrand.events import Event
from integrand.validate import ValidateSettings, ValidationFailed, compile_validator

from .helpers import BASE, DEMO_SECRET, hook_url, post_signed, read_jsonl, running, settings_for, wait_for

CUSTOMER = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["email", "name"],
    "properties": {
        "email": {"type": "string", "format": "email"},
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
    },
    "additionalProperties": False,
}


def ev(data: object, type_: str = "customer.updated") -> Event:
    return Event(id="e1", source="crm", type=type_, data=data)


def test_every_violation_is_reported_with_its_json_path() -> None:
    v, problems = compile_validator(ValidateSettings.model_validate({"schema": CUSTOMER}), "routes[0]")
    assert problems == [] and v is not None
    v.check(ev({"email": "a@example.com", "name": "A"}))
    bad = {"email": "not-an-email", "age": -1, "tags": ["ok", 7], "address": {"zip": "12"}, "extra": 1}
    with pytest.raises(ValidationFailed) as e:
        v.check(ev(bad))
    paths = [x.split(":", 1)[0] for x in e.value.violations]
    assert sorted(paths) == sorted(["$", "$", "$.address.zip", "$.age", "$.email", "$.tags[1]"])
    text = str(e.value)
    assert "6 violations" in text
    assert "'name' is a required property" in text and "'extra' was unexpected" in text
    assert "$.tags[1]: 7 is not of type 'string'" in text


def test_schemas_per_event_type_apply_by_glob() -> None:
    settings = ValidateSettings.model_validate(
        {"types": {"customer.*": {"required": ["email"]}, "invoice.*": {"required": ["amount"]}}}
    )
    v, _ = compile_validator(settings, "routes[0]")
    assert v is not None
    v.check(ev({"email": "x"}, "customer.created"))
    v.check(ev({"amount": 1}, "invoice.paid"))
    v.check(ev({}, "payment.made"))  # no schema for this type
    with pytest.raises(ValidationFailed, match=r"\$: 'amount' is a required property"):
        v.check(ev({"email": "x"}, "invoice.voided"))


def test_broken_schemas_are_config_errors_with_their_key_path(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "wrong.json").write_text(orjson.dumps({"type": "strnig"}).decode())
    (tmp_path / "draft7.json").write_text(orjson.dumps({"$schema": "http://json-schema.org/draft-07/schema#"}).decode())
    body = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "demo"
to = ["out"]
validate = {{ schema = "bad.json", types = {{ "a.*" = "wrong.json", "b.*" = "draft7.json", "c.*" = "missing.json" }} }}
"""
    with pytest.raises(ConfigError) as e:
        settings_for(tmp_path, body, BASE)
    problems = e.value.problems
    assert any(p.startswith("routes[0].validate.schema: ") and "bad.json is not valid JSON" in p for p in problems)
    assert any(
        p.startswith("routes[0].validate.types.a.*: wrong.json is not a valid JSON Schema at type") for p in problems
    )
    assert any("routes[0].validate.types.b.*: draft7.json declares $schema" in p for p in problems)
    assert any(p.startswith("routes[0].validate.types.c.*: cannot read") for p in problems)


async def test_an_invalid_event_is_dead_lettered_with_its_violations_and_never_reaches_the_sink(tmp_path: Path) -> None:
    (tmp_path / "customer.json").write_bytes(orjson.dumps(CUSTOMER))
    body = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "demo"
to = ["out"]

[routes.validate]
schema = "customer.json"
"""
    settings = settings_for(tmp_path, body, BASE)
    async with running(settings) as d, aiohttp.ClientSession() as http:
        assert (await post_signed(http, hook_url(d), {"email": "ok@example.com", "name": "Ok"}, "msg_ok"))[0] == 200
        assert (await post_signed(http, hook_url(d), {"email": "nope", "age": "x"}, "msg_bad"))[0] == 200

        async def dead() -> bool:
            return len(await d.store.dead_letters("out")) == 1

        await wait_for(dead)
        await wait_for(lambda: len(read_jsonl(tmp_path / "var" / "out.jsonl")) == 1)
        [letter] = await d.store.dead_letters("out")
        assert letter.event_id == "msg_bad" and letter.attempts <= 1
        assert "3 violations" in letter.last_error
        for part in (
            "$: 'name' is a required property",
            "$.email: 'nope' is not a 'email'",
            "$.age: 'x' is not of type 'integer'",
        ):
            assert part in letter.last_error
    assert [e["id"] for e in read_jsonl(tmp_path / "var" / "out.jsonl")] == ["msg_ok"]
