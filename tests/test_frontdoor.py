"""The webhook port's front: no software banner, X-Forwarded-For believed only from trusted proxies;
and `send --url` saying what URL it needs."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from integrand.cli import main as cli_main
from integrand.errors import ConfigError
from integrand.frontdoor import client_address, parse_networks
from integrand.store import Rejection

from .helpers import BASE, DEMO, hook_url, running, settings_for, signed_headers, wait_for

PROXY_BASE = BASE.replace('shutdown_grace = "5s"', 'shutdown_grace = "5s"\ntrusted_proxies = ["127.0.0.1"]')


async def test_no_server_banner(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path)) as d, aiohttp.ClientSession() as s:
        body = orjson.dumps({"type": "t.x"})
        async with s.post(hook_url(d), data=body, headers=signed_headers(body, "m1")) as resp:
            assert resp.status == 200
            assert resp.headers["Server"] == "integrand"
        async with s.get(f"http://127.0.0.1:{d.ports['webhooks']}/nothing") as resp:
            assert resp.status == 404
            assert resp.headers["Server"] == "integrand"
            assert not any("aiohttp" in v or "Python" in v for v in resp.headers.values())


async def refused_from(tmp_path: Path, base: str, forwarded: str) -> str | None:
    """The client address recorded for a refused (badly signed) webhook sent with this X-Forwarded-For."""
    async with running(settings_for(tmp_path, DEMO, base)) as d, aiohttp.ClientSession() as s:
        headers = {**signed_headers(b"{}", "m1"), "webhook-signature": "v1,AAAA", "X-Forwarded-For": forwarded}
        async with s.post(hook_url(d), data=b"{}", headers=headers) as resp:
            assert resp.status == 401
        rows: list[Rejection] = []

        async def recorded() -> bool:
            rows[:] = await d.store.rejections()
            return bool(rows)

        await wait_for(recorded, timeout=10)
        return rows[0].remote


async def test_refusals_behind_a_trusted_proxy_record_the_client(tmp_path: Path) -> None:
    # The client claims 6.6.6.6 at the left; only the hop our proxy added (rightmost) is believed.
    assert await refused_from(tmp_path, PROXY_BASE, "6.6.6.6, 203.0.113.7") == "203.0.113.7"


async def test_x_forwarded_for_is_ignored_unless_the_peer_is_trusted(tmp_path: Path) -> None:
    assert await refused_from(tmp_path, BASE, "203.0.113.7") == "127.0.0.1"


NETS = parse_networks(["127.0.0.1", "10.0.0.0/8"])


def test_client_address_reads_the_chain_from_the_right() -> None:
    assert client_address("127.0.0.1", ["198.51.100.1, 10.1.2.3"], NETS) == "198.51.100.1"
    assert client_address("127.0.0.1", ["198.51.100.1", "10.1.2.3"], NETS) == "198.51.100.1"  # two headers
    assert client_address("198.51.100.9", ["1.2.3.4"], NETS) == "198.51.100.9"  # untrusted peer
    assert client_address("127.0.0.1", ["garbage"], NETS) == "garbage"  # what the proxy said, unparsed
    assert client_address("127.0.0.1", [], NETS) == "127.0.0.1"


@given(st.lists(st.ip_addresses(v=4).map(str), max_size=5), st.ip_addresses(v=4).map(str))
def test_a_client_cannot_spoof_past_the_first_untrusted_hop(spoofed: list[str], client: str) -> None:
    # Whatever the client puts in the header, the answer is the address our trusted proxy saw.
    chain = ", ".join([*spoofed, client])
    got = client_address("127.0.0.1", [chain], NETS)
    if not any(ipaddress.ip_address(client) in n for n in NETS):
        assert got == client


def test_trusted_proxies_must_be_addresses(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        settings_for(tmp_path, DEMO, BASE.replace("[daemon]", '[daemon]\ntrusted_proxies = ["10.0.0.0/8", "proxy"]'))
    assert any(p.startswith("daemon.trusted_proxies") and "'proxy' is not an IP address" in p for p in e.value.problems)


def test_send_url_must_be_the_full_hooks_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(BASE + DEMO)
    assert cli_main(["send", "--config", str(config), "--url", "http://127.0.0.1:8080", "demo", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert "--url needs the full webhook URL of the source, ending in /hooks/demo" in err


async def posted_request_ids(tmp_path: Path, base: str, sent: str | None) -> tuple[str, str, str | None]:
    """(the X-Request-Id answered to a stored webhook, to a refused one, the one its event was stored with)."""
    async with running(settings_for(tmp_path, DEMO, base)) as d, aiohttp.ClientSession() as s:
        extra = {"X-Request-Id": sent} if sent is not None else {}
        body = orjson.dumps({"type": "t.x"})
        async with s.post(hook_url(d), data=body, headers={**signed_headers(body, "m1"), **extra}) as resp:
            assert resp.status == 200
            stored = resp.headers["X-Request-Id"]
        bad = {**signed_headers(body, "m2"), "webhook-signature": "v1,AAAA", **extra}
        async with s.post(hook_url(d), data=body, headers=bad) as resp:
            assert resp.status == 401
            refused = resp.headers["X-Request-Id"]
        [event] = await d.store.find_events("demo:m1")
        return stored, refused, event.request_id


async def test_every_webhook_gets_a_request_id_stored_with_its_events(tmp_path: Path) -> None:
    stored, refused, kept = await posted_request_ids(tmp_path, BASE, None)
    assert len(stored) == 32 and int(stored, 16) >= 0  # integrand's own: a UUID's hex
    assert refused != stored and kept == stored


async def test_a_trusted_proxys_request_id_is_kept(tmp_path: Path) -> None:
    rid = "Root=1-67891233-abcdef012345678912345678"
    assert await posted_request_ids(tmp_path, PROXY_BASE, rid) == (rid, rid, rid)


async def test_a_clients_request_id_is_not_believed(tmp_path: Path) -> None:
    # From a peer that is not a trusted proxy (and from a trusted one, an id that is not id-like): ours.
    for i, (base, sent) in enumerate(((BASE, "chosen-by-the-client"), (PROXY_BASE, "has spaces, <and> more"))):
        (tmp_path / str(i)).mkdir()
        stored, _refused, kept = await posted_request_ids(tmp_path / str(i), base, sent)
        assert stored != sent and len(stored) == 32 and kept == stored


async def test_a_refusal_is_logged_with_its_request_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="integrand.listener")
    _stored, refused, _kept = await posted_request_ids(tmp_path, BASE, None)
    [line] = [r for r in caplog.records if "refused webhook" in r.getMessage()]
    assert getattr(line, "request_id", None) == refused
