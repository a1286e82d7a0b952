"""The shipped crm-sync example: its config is valid as written, and the demo runs it end to end."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from typing import Any

import pytest

from integrand.config import parse_config

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "crm-sync"


def test_the_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SF_CONSUMER_KEY", "HUBSPOT_TOKEN", "CRM_WEBHOOK_SECRET"):
        monkeypatch.setenv(var, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" if var == "CRM_WEBHOOK_SECRET" else "x")
    raw = tomllib.loads((EXAMPLE / "config.toml").read_text())
    raw["connections"]["sf"]["private_key"] = "-----BEGIN PRIVATE KEY-----"  # the config names a file in /etc
    s = parse_config(raw, base_dir=EXAMPLE)
    assert set(s.sources) == {"salesforce"}
    assert s.sinks["sf_confirm"].state_scope == s.sources["salesforce"].state_scope == "connection:sf"
    [saga] = s.sagas
    assert [st.name for st in saga.steps] == ["hubspot", "crm", "confirm"]
    assert all(st.validate_ is not None for st in saga.steps[:2])
    assert [st.compensate is not None for st in saga.steps] == [True, True, False]


def load_demo() -> Any:
    spec = importlib.util.spec_from_file_location("demo_crm_sync", ROOT / "plugins" / "demo_crm_sync.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


async def test_the_demo_syncs_a_contact_and_confirms_both_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = load_demo()
    assert await demo.main(tmp_path / "demo") == 0
    out = capsys.readouterr().out
    assert "CRM_Id__c = crm-1001, HubSpot_Id__c = 101" in out
    assert "CRM customer crm-1001 with hubspot_id 101" in out  # step 2 mapped step 1's result
    assert "(CRM upserts: 1, HubSpot contacts: 1)" in out, "the loop guard let a write bounce"
    assert "status done" in out and "run confirm" in out


async def test_the_crm_refusing_a_customer_archives_the_hubspot_contact_and_confirms_nothing(tmp_path: Path) -> None:
    """The saga's compensation against the real fakes: step 2 fails for good (422), step 1 is undone."""
    from integrand_hubspot.fake import FakeHubSpot
    from integrand_salesforce.testing import fake_salesforce

    from integrand.testing import fake_api_server, wait_for

    demo = load_demo()
    hs = FakeHubSpot()
    await hs.start()
    crm = demo.FakeCRM(demo.CRM_SECRET)
    async with fake_salesforce(pubsub=True) as sf, fake_api_server(crm.app()) as crm_url:
        assert sf.pubsub is not None
        sf.pubsub.enable("Contact", demo.CONTACT_FIELDS)
        cfg = tmp_path / "config.toml"
        cfg.write_text(demo.config(sf, hs, crm_url))
        proc, _ = await demo.start_integrand(cfg)
        try:
            await wait_for(lambda: sf.pubsub is not None and sf.pubsub.subscribes >= 1, timeout=30)
            crm.refuse.add("C-666")  # the CRM answers 422: a permanent failure of step 2
            rec = sf.fake.create(
                "Contact", FirstName="Bad", LastName="Luck", Email="bad@example.com", Integration_Key__c="C-666"
            )
            await wait_for(lambda: bool(hs.objects.get("contacts")), timeout=20)
            [contact] = hs.objects["contacts"].values()
            await wait_for(lambda: contact["archived"], timeout=20)
            assert hs.find("contacts", "email", "bad@example.com") is None
            assert crm.customers == {}
            final = sf.fake.get("Contact", rec["Id"]) or {}
            assert not final.get("HubSpot_Id__c") and not final.get("CRM_Id__c")  # nothing confirmed
        finally:
            await demo.stop_integrand(proc)
            await hs.stop()
        story = await demo.saga_story(cfg)
        assert "status compensated" in story and "undo hubspot" in story, story
        assert "legal hold" in story and "run confirm" not in story
