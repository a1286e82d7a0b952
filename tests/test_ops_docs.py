"""The operator's docs cannot drift: every command, admin and alert key, alert rule and metric is documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from integrand.cli import build_parser
from integrand.config import AdminSettings, AlertSettings, DaemonSettings
from integrand.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
CONFIG = (ROOT / "config.toml").read_text()


def _commands() -> list[str]:
    """``status``, ``dlq list``, ``events show`` …: every command and action the parser knows."""
    out: list[str] = []

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    full = f"{prefix} {name}".strip()
                    subs = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                    if subs:
                        walk(sub, full)
                    else:
                        out.append(full)

    walk(build_parser(), "")
    return out


def test_every_command_is_in_the_readme() -> None:
    missing = [c for c in _commands() if f"`integrand {c}" not in README and f"`{c} " not in README]
    assert not missing, f"commands not in README.md's table: {missing}"


def test_every_admin_alert_and_log_key_is_in_config_toml() -> None:
    keys = [*AdminSettings.model_fields, *AlertSettings.model_fields, "log_levels", "log_format"]
    assert "log_levels" in DaemonSettings.model_fields
    missing = [k for k in keys if not re.search(rf"^#?\s*{k}\s*=", CONFIG, re.M)]
    assert not missing, f"keys not shown in config.toml: {missing}"
    assert "[alerts]" in CONFIG


def test_every_alert_rule_is_explained() -> None:
    rules = re.findall(r"- alert: (\w+)", (ROOT / "docs" / "alerts.yml").read_text())
    assert len(rules) == 6
    assert [r for r in rules if f"`{r}`" not in OPERATIONS] == []


def test_every_metric_is_in_operations_md() -> None:
    from prometheus_client import generate_latest

    m = Metrics()
    names = {f.name for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    ours = sorted(n for n in names if n.startswith("integrand_"))
    missing = [n for n in ours if n not in OPERATIONS]
    assert not missing, f"metrics not in docs/operations.md: {missing}"
    assert "process_resident_memory_bytes" in OPERATIONS
