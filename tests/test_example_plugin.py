"""A third-party connector built from its own distribution folder: discovered, contract-tested, run by the daemon."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from integrand.config import load_config
from integrand.plugins import Registry

from .helpers import BASE, DEMO_SECRET, hook_url, post_signed, running, wait_for, write_config

EXAMPLE = Path(__file__).resolve().parent / "example_plugin"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a copy of the source folder, the folder pip installed the built distribution into)."""
    root = tmp_path_factory.mktemp("example")
    src = root / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [*pip, "--target", str(target), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return src, target


def test_installed_distribution_is_discovered_by_its_entry_point(
    example: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, target = example
    monkeypatch.syspath_prepend(str(target))
    [info] = Registry.default(allow="integrand-example-notes").describe()
    assert (info.name, info.distribution, info.version, info.error) == (
        "notes",
        "integrand-example-notes",
        "0.1.0",
        None,
    )
    assert info.capabilities == ("fetch", "poll", "reconcile", "sink", "webhook")
    assert info.config_keys[:4] == ("base_url", "account", "refresh_token", "webhook_secret")


def test_the_authors_few_line_contract_module_passes(example: tuple[Path, Path]) -> None:
    src, target = example
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [str(BIN / "pytest"), "-q", "-p", "no:randomly", "tests"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "9 passed" in proc.stdout, proc.stdout
    # The module under test came from the installed distribution, not from the source folder.
    assert (target / "integrand_example_notes" / "connector.py").exists()


async def test_the_daemon_runs_the_third_party_sink(
    example: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integrand.testing import fake_api_server

    _, target = example
    monkeypatch.syspath_prepend(str(target))
    fake_mod: Any = importlib.import_module("integrand_example_notes.fake")
    notes = fake_mod.FakeNotes()
    async with fake_api_server(notes.app()) as url:
        body = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_field = "entity"
entity_id_field = "id"

[sinks.notes]
connector = "notes"
base_url = "{url}"
account = "acme"
refresh_token = "rt-0"
webhook_secret = "w"

[[routes]]
from = "demo"
to = ["notes"]
"""
        reg = Registry.default(allow="integrand,integrand-example-notes")
        settings = load_config(write_config(tmp_path, body, BASE), registry=reg)
        async with running(settings) as d, aiohttp.ClientSession() as s:
            payload = {"entity": "note", "id": "n9", "text": "from the webhook"}
            assert (await post_signed(s, hook_url(d), payload, "m1"))[0] == 200
            await wait_for(lambda: "n9" in notes.notes)
            # The rotated refresh token was kept in the store, not in a file.
            assert await d.store.state_get("sink:notes", "refresh_token") == notes.refresh_token
    assert notes.notes["n9"]["text"] == "from the webhook"
    assert notes.writes == 1
