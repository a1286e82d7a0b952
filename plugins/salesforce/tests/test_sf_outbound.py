"""Outbound Messages: SOAP parsing, org check, thin events fetched, dedup, and the Ack only after the commit."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from integrand_salesforce.outbound import envelope, parse_notifications
from integrand_salesforce.testing import fake_salesforce
from multidict import CIMultiDict
from sf_support import sf_env

from integrand.connector import PayloadError, SignatureError, UnsupportedMediaType, WebhookRequest
from integrand.testing import daemon_config, running_daemon, wait_for

ORG = "00D5g000004FAKEEAA"


def request(body: bytes, url: str = "http://127.0.0.1/hooks/sf", ct: str = "text/xml") -> WebhookRequest:
    return WebhookRequest(
        source="sf",
        method="POST",
        url=url,
        headers=CIMultiDict({"Content-Type": ct}),
        body=body,
        received_at="2026-12-07T00:00:00.000000Z",
        content_type=ct,
    )


def test_parses_notifications_with_typed_sobjects_and_nil_fields() -> None:
    body = envelope(ORG, "04kA", [("04l1", "Account", {"Id": "001A", "Name": "Acme & Co", "Phone": None})])
    msg = parse_notifications(body)
    assert msg.organization_id == ORG and msg.action_id == "04kA"
    [n] = msg.notifications
    assert (n.id, n.sobject, n.fields) == ("04l1", "Account", {"Id": "001A", "Name": "Acme & Co", "Phone": None})


@pytest.mark.parametrize(
    ("body", "ct", "error", "text"),
    [
        (b"not xml", "text/xml", PayloadError, "not well-formed XML"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>', "text/xml", PayloadError, "DOCTYPE"),
        (b"<x/>", "text/xml", PayloadError, "SOAP 1.1 Envelope"),
        (envelope(ORG, "a", []), "text/xml", PayloadError, "no Notification"),
        (
            envelope(ORG, "a", [(f"n{i}", "Account", {"Id": f"001{i}"}) for i in range(101)]),
            "text/xml",
            PayloadError,
            "at most 100",
        ),
        (envelope(ORG, "a", [("n", "Account", {"Name": "x"})]), "text/xml", PayloadError, "lacks its Id"),
        (envelope(ORG, "a", [("n", "Account", {"Id": "1"})]), "application/json", UnsupportedMediaType, "SOAP"),
    ],
)
def test_bad_messages_get_a_precise_refusal(body: bytes, ct: str, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        parse_notifications(body, ct)


async def test_verify_checks_the_org_and_the_url_token(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        conn = await env.connector(outbound_token="s3cret", org_id=env.fake.org_id[:15])
        good = envelope(env.fake.org_id, "04k", [("04l", "Account", {"Id": "001"})])
        conn.verify(request(good, "http://h/hooks/sf?token=s3cret"), 0)
        with pytest.raises(SignatureError, match="token"):
            conn.verify(request(good, "http://h/hooks/sf?token=wrong"), 0)
        other = envelope("00D5g000009OTHERAA", "04k", [("04l", "Account", {"Id": "001"})])
        with pytest.raises(SignatureError, match="organization 00D5g000009OTHERAA"):
            conn.verify(request(other, "http://h/hooks/sf?token=s3cret"), 0)
        await conn.close()


async def test_outbound_messages_through_the_daemon_ack_after_commit_dedup_and_fetch(tmp_path: Path) -> None:
    async with fake_salesforce() as sf:
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.sf]
{sf.toml(objects=["Account"], fields={"Account": ["Name", "Phone"]})}

[sources.sf.poll]
enabled = false

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "sf"
to = ["out"]
enrich = true
""",
        )
        out = tmp_path / "var" / "out.jsonl"

        def lines() -> list[dict[str, object]]:
            return [orjson.loads(x) for x in out.read_bytes().splitlines()] if out.exists() else []

        async with running_daemon(cfg) as d:
            url = f"http://127.0.0.1:{d.ports['webhooks']}/hooks/sf"
            recs = [sf.fake.create("Account", Name=f"A{i}", Phone="555") for i in range(3)]
            # The message carries only the Id (a thin notification); the record is fetched.
            assert await sf.fake.send_outbound(url, "Account", [r["Id"] for r in recs], fields=["Id"]) == 200
            assert sf.fake.outbound_pending == [], "acked, so Salesforce forgets it"
            await wait_for(lambda: len(lines()) == 3, timeout=20)
            assert {e["data"]["Name"] for e in lines()} == {"A0", "A1", "A2"}  # type: ignore[index]
            assert all(e["data"]["Phone"] == "555" for e in lines())  # type: ignore[index]
            # A message that never arrived is re-sent by Salesforce: stored then.
            assert await sf.fake.send_outbound(url, "Account", [recs[0]["Id"]], fields=["Id"], drop=True) is None
            assert await sf.fake.retry_outbound(fields=["Id"]) == [200]
            await wait_for(lambda: len(lines()) == 4, timeout=20)
            # The same message twice (an ack lost on the way back): acked again, stored once.
            assert await sf.fake.send_outbound(url, "Account", [recs[2]["Id"]], fields=["Id"], duplicate=True) == 200
            # The store cannot commit (integrand stopping): no Ack but a SOAP Fault, so Salesforce keeps it.
            d.listener.stopping = True
            assert await sf.fake.send_outbound(url, "Account", [recs[1]["Id"]], fields=["Id"]) == 503
            assert len(sf.fake.outbound_pending) == 1
            assert "<faultstring>integrand is shutting down</faultstring>" in sf.fake.last_answer
            d.listener.stopping = False
            assert await sf.fake.retry_outbound(fields=["Id"]) == [200]
            await wait_for(lambda: len(lines()) == 6, timeout=20)
            assert sf.fake.outbound_pending == []
        # One line per notification id that was new; the retried one produced no second event.
        ids = [e["id"] for e in lines()]
        assert len(ids) == len(set(ids)) == 6
