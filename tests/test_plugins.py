"""Connector discovery: entry points, clear errors for broken or missing plugins, stray plugins kept out."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from integrand.cli import main
from integrand.config import load_config
from integrand.errors import ConfigError
from integrand.plugins import GROUP, PluginError, Registry

from .connectors import registry_with
from .helpers import BASE, write_config


def fake_distribution(root: Path, dist: str, module: str, source: str, connectors: dict[str, str]) -> None:
    """A real installed distribution as pip lays it out: a module and its .dist-info with entry points."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    eps = "".join(f"{name} = {target}\n" for name, target in connectors.items())
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{eps}")


GOOD = """
from integrand.connector import Connector, ConnectorConfig, Event, Sink

class Cfg(ConnectorConfig):
    url: str
    batch: int = 10

class Good(Connector[Cfg], Sink):
    Config = Cfg

    async def deliver(self, event: Event) -> None:
        pass
"""


def test_a_plugin_that_fails_to_import_names_the_plugin_and_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_plugin.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry([EntryPoint("broken", "broken_plugin:Broken", GROUP)])
    with pytest.raises(PluginError) as err:
        reg.load("broken")
    msg = str(err.value)
    assert "'broken'" in msg
    assert "broken_plugin:Broken" in msg
    assert "ModuleNotFoundError" in msg
    assert "no_such_dependency_xyz" in msg


def test_a_plugin_that_is_not_a_connector_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "not_a_connector.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry([EntryPoint("thing", "not_a_connector:Thing", GROUP)])
    with pytest.raises(PluginError, match=r"not a subclass of integrand\.connector\.Connector"):
        reg.load("thing")


def test_config_naming_a_missing_or_broken_connector_reports_each_with_its_key_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('needs OPENSSL 9')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    body = """
[sinks.a]
connector = "hubspto"

[sinks.b]
connector = "broken"

[sinks.c]
connector = "jsonl"
path = "out.jsonl"
"""
    reg = registry_with(broken="broken_plugin:Broken")
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, body, BASE), registry=reg)
    problems = err.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("sinks.a.connector: no connector named 'hubspto' is installed (installed: ")
    assert "broken, http, jsonl, webhook" in problems[0]
    assert problems[1].startswith("sinks.b.connector: connector 'broken'")
    assert "RuntimeError: needs OPENSSL 9" in problems[1]


def test_describe_lists_capabilities_and_config_keys_and_keeps_broken_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_distribution(tmp_path, "integrand-goodsink", "good_plugin", GOOD, {"good": "good_plugin:Good"})
    (tmp_path / "broken_plugin.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry.default(allow="integrand*")
    infos = {i.name: i for i in reg.describe()}
    good = infos["good"]
    assert (good.distribution, good.version) == ("integrand-goodsink", "1.2.3")
    assert good.capabilities == ("sink",)
    assert good.config_keys == ("url", "batch")
    assert good.error is None
    assert infos["webhook"].distribution == "integrand"
    assert infos["webhook"].capabilities == ("webhook",)
    assert "signature" in infos["webhook"].config_keys
    broken = Registry([EntryPoint("broken", "broken_plugin:X", GROUP)]).describe()
    assert broken[0].error is not None
    assert "no_such_dependency_xyz" in broken[0].error


def test_stray_installed_plugins_are_kept_out_by_the_allow_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_distribution(tmp_path, "someone-elses-plugin", "stray_plugin", GOOD, {"stray": "stray_plugin:Good"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "stray" in Registry.default(allow="*").names()
    # The test suite's own setting (conftest): only integrand's distributions.
    assert "stray" not in Registry.default().names()
    assert {"webhook", "jsonl", "http"} <= set(Registry.default().names())
    with pytest.raises(ConfigError, match="no connector named 'stray'"):
        load_config(write_config(tmp_path, '[sinks.x]\nconnector = "stray"\nurl = "u"\n', BASE))
    # By connector name as well as by distribution.
    assert Registry.default(allow="jsonl,stray").names() == ["jsonl", "stray"]


def test_two_distributions_registering_one_name_is_an_error_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_distribution(tmp_path, "integrand-one", "one_plugin", GOOD, {"crm": "one_plugin:Good"})
    fake_distribution(tmp_path, "integrand-two", "two_plugin", GOOD, {"crm": "two_plugin:Good"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as err:
        Registry.default().load("crm")
    assert "integrand-one" in str(err.value)
    assert "integrand-two" in str(err.value)


def test_integrand_plugins_command_lists_connectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_distribution(tmp_path, "integrand-goodsink", "good_plugin", GOOD, {"good": "good_plugin:Good"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    good = next(line for line in out.splitlines() if line.startswith("good "))
    assert "integrand-goodsink 1.2.3" in good
    assert "sink" in good
    assert "keys: url, batch" in good
    assert any(line.startswith("jsonl ") and "keys: path, fsync" in line for line in out.splitlines())
    more = tmp_path / "more"
    more.mkdir()
    fake_distribution(more, "integrand-bad", "bad_plugin", "import nope_nope\n", {"bad": "bad_plugin:X"})
    monkeypatch.syspath_prepend(str(more))
    assert main(["plugins"]) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out
    assert "nope_nope" in out
