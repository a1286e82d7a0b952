"""The shipped crm-sync example: its config is valid as written, and the demo runs it end to end."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

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
    assert set(s.sources) == {"salesforce", "hubspot", "crm"}
    assert s.sinks["sf_confirm"].state_scope == s.sources["salesforce"].state_scope == "connection:sf"
    assert all(r.validate_ is not None for r in s.routes if r.from_ == "salesforce")


async def test_the_demo_syncs_a_contact_and_confirms_both_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("demo_crm_sync", ROOT / "plugins" / "demo_crm_sync.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert await demo.main(tmp_path / "demo") == 0
    out = capsys.readouterr().out
    assert "CRM_Id__c = crm-1001, HubSpot_Id__c = 101" in out
    assert "(CRM upserts: 1, HubSpot contacts: 1)" in out, "the loop guard let a write bounce"
