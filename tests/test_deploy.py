"""What a deployment meets first: `integrand check` on paths the service cannot write, startup failures
as one line and a non-zero exit, the shipped and production configs, the systemd units."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from integrand.cli import main as cli_main
from integrand.config import load_config
from integrand.connector import WebhookRequest
from integrand.paths import check_paths

ROOT = Path(__file__).resolve().parent.parent


def test_check_refuses_a_relative_sink_path_outside_the_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The operator's first try: the shipped config copied to /etc/integrand with only state_dir changed.
    etc = tmp_path / "etc" / "integrand"
    etc.mkdir(parents=True)
    state = tmp_path / "var" / "lib" / "integrand"
    text = (ROOT / "config.toml").read_text().replace('state_dir = "var"', f'state_dir = "{state}"')
    (etc / "config.toml").write_text(text)
    assert cli_main(["check", "--config", str(etc / "config.toml")]) == 1
    err = capsys.readouterr().err
    assert f"sinks.events.path: {etc / 'var' / 'events.jsonl'} (a relative path" in err
    assert f"is outside daemon.state_dir {state}" in err
    assert "Traceback" not in err


def test_check_refuses_a_path_that_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\n[sinks.out]\nconnector = "jsonl"\npath = "{tmp_path}/afile/out.jsonl"\n'
    )
    assert cli_main(["check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert (
        f"sinks.out.path: integrand cannot write {tmp_path}/afile/out.jsonl: {tmp_path}/afile is not a directory" in err
    )


def test_run_with_an_unwritable_path_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    config = tmp_path / "config.toml"
    config.write_text(
        '[daemon]\nlisten = "127.0.0.1:0"\nstate_dir = "var"\n[admin]\nenabled = false\n'
        '[sinks.out]\nconnector = "jsonl"\npath = "afile/out.jsonl"\n'
    )
    res = subprocess.run(
        [sys.executable, "-m", "integrand.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "ERROR" in lines[0] and "cannot start: sinks.out.path: integrand cannot write" in lines[0]


def test_a_bind_failure_is_one_line_naming_the_key_and_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.toml"
        config.write_text(f'[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "var"\n[admin]\nenabled = false\n')
        res = subprocess.run(
            [sys.executable, "-m", "integrand.cli", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"cannot start: daemon.listen: cannot listen on 127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in res.stderr


def test_production_example_writes_only_under_var_lib_integrand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "demo").write_text("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    s = load_config(ROOT / "examples" / "production" / "config.toml")
    assert s.daemon.state_dir == Path("/var/lib/integrand")
    assert s.db_path.is_relative_to("/var/lib/integrand")
    problems = check_paths(s, raw_relative=set())
    assert problems.errors == [] and problems.warnings == []
    assert s.sinks["events"].options.path == Path("/var/lib/integrand/events.jsonl")  # type: ignore[attr-defined]


def test_shipped_demo_events_have_an_entity() -> None:
    s = load_config(ROOT / "config.toml")
    cs = s.sources["demo"]
    from integrand.connector import ConnectorContext

    inst = cs.cls(cs.options, ConnectorContext(name="demo", role="source", base_dir=s.base_dir, state=None))  # type: ignore[arg-type]
    body = b'{"type": "customer.created", "data": {"id": "c_1"}}'  # the README's example
    req = WebhookRequest(
        "demo",
        "POST",
        "http://x/hooks/demo",
        {"webhook-id": "m1"},
        body,
        "2026-01-01T00:00:00Z",
        "application/json",
        None,
    )
    [ev] = inst.parse(req)
    assert ev.entity_id == "c_1"
    assert ev.entity_key == "demo/:c_1"


def test_check_of_the_production_config_in_an_operators_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Outside systemd there is no $CREDENTIALS_DIRECTORY: everything else is checked, the credential named.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = str(ROOT / "examples" / "production" / "config.toml")
    assert cli_main(["check", "--config", config]) == 0
    captured = capsys.readouterr()
    assert "credential demo needs $CREDENTIALS_DIRECTORY" in captured.err and "not read here" in captured.err
    assert "OK" in captured.out
    # Under systemd (the directory is set) a missing credential is an error, as at start.
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert cli_main(["check", "--config", config]) == 1
    assert "sources.demo.secret" in capsys.readouterr().err
