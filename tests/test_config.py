"""Config: every problem at once with its key path; secrets by reference; the shipped config is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from integrand.cli import main
from integrand.config import load_config
from integrand.errors import ConfigError

from .helpers import BASE, DEMO, write_config

ROOT = Path(__file__).resolve().parent.parent


def problems(tmp_path: Path, body: str, base: str = BASE) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, body, base))
    return err.value.problems


def test_shipped_config_is_valid() -> None:
    s = load_config(ROOT / "config.toml")
    assert list(s.sources) == ["demo"]
    assert list(s.sinks) == ["events"]
    assert s.db_path == ROOT / "var" / "integrand.db"
    assert s.store.synchronous == "full"
    assert str(s.daemon.listen) == "127.0.0.1:8080"
    assert str(s.admin.listen) == "127.0.0.1:8081"


def test_defaults_and_durations(tmp_path: Path) -> None:
    s = load_config(write_config(tmp_path, DEMO + '\n[store]\nretention = "2d"\nbusy_timeout = "250ms"\n'))
    assert s.store.retention == 2 * 86400
    assert s.store.busy_timeout == 0.25
    assert s.dispatcher.retry.max_attempts == 25
    assert s.daemon.max_body_bytes == 1024 * 1024
    assert s.sinks["out"].options.path == tmp_path / "var" / "out.jsonl"  # type: ignore[attr-defined]


def test_every_problem_at_once_with_key_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QBO_SECRET", raising=False)
    body = """
[dispatcher]
workers = 0
[dispatcher.retry]
base = "soon"

[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = { env = "QBO_SECRET" }
sigature = "typo"

[sources.gh]
connector = "webhook"
signature = "github"

[sources.bad]
connector = "nope"

[sinks.out]
connector = "jsonl"

[sinks.web]
connector = "http"
url = "ftp://x"
retry = { max_attempts = 0 }

[[routes]]
from = "demo"
to = ["out", "missing"]

[[routes]]
from = "demoo"
to = ["out"]

[bogus]
"""
    got = problems(tmp_path, body)
    expected = [
        "bogus: unknown table",
        "dispatcher.workers: Input should be greater than or equal to 1",
        "dispatcher.retry.base: expected seconds or a duration like '30s', '5m', '7d', got 'soon'",
        "sources.demo.secret: environment variable QBO_SECRET is not set",
        "sources.demo.sigature: unknown key (did you mean 'signature'?)",
        "sources.gh: signature = 'github' needs a secret",
        "sources.bad.connector: no connector named 'nope' is installed",
        "sinks.out.path: required key is missing",
        "sinks.web.retry.max_attempts: Input should be greater than or equal to 1",
        "routes[0].to[1]: no sink named 'missing'",
        "routes[1].from: no source named 'demoo' (did you mean 'demo'?)",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in got), f"{line!r} not in {got}"
    assert not any("ftp" in p for p in got)  # sinks.web failed on its core keys first; no cascade
    assert len(got) == len(expected)


def test_secret_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hook.secret").write_text("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "gh").write_text("github-secret")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("STRIPE_WHSEC", "whsec_abc")
    body = """
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = { file = "hook.secret" }
[sources.gh]
connector = "webhook"
signature = "github"
secret = [{ credential = "gh" }, "old-secret"]
[sources.st]
connector = "webhook"
signature = "stripe"
secret = { env = "STRIPE_WHSEC" }
"""
    s = load_config(write_config(tmp_path, body))
    demo = s.sources["demo"].options
    assert demo.secrets == ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]  # type: ignore[attr-defined]
    assert s.sources["gh"].options.secrets == ["github-secret", "old-secret"]  # type: ignore[attr-defined]
    assert s.sources["st"].options.secrets == ["whsec_abc"]  # type: ignore[attr-defined]
    # A secret never shows itself in a repr (and so in a log line or a traceback).
    assert "whsec" not in repr(demo)
    assert "file:" in repr(demo.secret)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ('{ file = "absent" }', "secret file"),
        ('{ credential = "x" }', "needs $CREDENTIALS_DIRECTORY"),
        ('{ vault = "x" }', "unknown secret reference 'vault'"),
        ('{ env = "A", file = "b" }', "a secret is a string or one of"),
        ('""', "secret is empty"),
        ('"not-whsec!"', "Standard Webhooks secret is 'whsec_' followed by base64"),
    ],
)
def test_bad_secret_references(tmp_path: Path, secret: str, message: str) -> None:
    body = f'[sources.demo]\nconnector = "webhook"\nsignature = "standard-webhooks"\nsecret = {secret}\n'
    [p] = problems(tmp_path, body)
    assert p.startswith("sources.demo")
    assert message in p


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nlisten = "127.0.0.1:8080\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "not valid TOML" in err.value.problems[0]
    assert "line 2" in err.value.problems[0]


def test_admin_must_not_share_the_webhook_port(tmp_path: Path) -> None:
    base = '[daemon]\nlisten = "127.0.0.1:9000"\n[admin]\nlisten = "127.0.0.1:9000"\n'
    [p] = problems(tmp_path, DEMO, base=base)
    assert p.startswith("admin.listen: must differ from daemon.listen")


def test_duplicate_route_pair_and_bad_source_name(tmp_path: Path) -> None:
    body = DEMO + '[[routes]]\nfrom = "demo"\nto = ["out"]\n[sources."bad name"]\nconnector = "webhook"\n'
    got = problems(tmp_path, body)
    assert any("a route from 'demo' to 'out' is already defined" in p for p in got)
    assert any(p.startswith("sources.bad name: name must be") for p in got)


def test_check_command_prints_all_problems_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, DEMO.replace('path = "var/out.jsonl"', 'pth = "x"') + "[daemon2]\n")
    assert main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "sinks.out.path: required key is missing" in err
    assert "sinks.out.pth: unknown key (did you mean 'path'?)" in err
    assert "daemon2: unknown table (did you mean 'daemon'?)" in err


def test_check_command_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(write_config(tmp_path))]) == 0
    assert "OK — 1 source(s), 1 sink(s), 1 route(s)" in capsys.readouterr().out


def test_config_path_falls_back_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path)
    monkeypatch.setenv("INTEGRAND_CONFIG", str(path))
    assert main(["check"]) == 0


@pytest.mark.parametrize("key", ["none", "str", "list", "int"])
def test_unknown_key_named_like_a_type(key: str) -> None:
    """A user's key that happens to be a pydantic union tag (found by the config fuzzer) is still reported."""
    from integrand.config import parse_config

    with pytest.raises(ConfigError) as e:
        parse_config({"daemon": {key: {}}}, base_dir=Path("/nonexistent"))
    assert [p for p in e.value.problems if p.startswith(f"daemon.{key}: unknown key")], e.value.problems


def test_the_default_state_dir_is_beside_the_config_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc" / "config.toml"
    conf.parent.mkdir()
    conf.write_text('[sources.x]\nconnector = "webhook"\nsignature = "none"\nallow_unsigned = true\n')
    monkeypatch.chdir(tmp_path)  # a CLI command run from elsewhere finds the same store as the daemon
    s = load_config(Path("etc/config.toml"))
    assert s.daemon.state_dir == tmp_path / "etc" / "var"
    assert s.db_path == tmp_path / "etc" / "var" / "integrand.db"


def test_check_command_names_a_postgres_store_without_its_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL store is reported as such (not as an SQLite path nobody uses), and its DSN never printed."""
    monkeypatch.setenv("INTEGRAND_TEST_CHECK_DSN", "postgresql://app:s3cret-pw@127.0.0.1:5432/integrand")
    body = DEMO + '\n[store]\nbackend = "postgres"\ndsn = {env = "INTEGRAND_TEST_CHECK_DSN"}\n'
    assert main(["check", "--config", str(write_config(tmp_path, body))]) == 0
    out = capsys.readouterr().out
    assert "store postgres (store.dsn from env:INTEGRAND_TEST_CHECK_DSN)" in out
    assert ".db" not in out and "s3cret-pw" not in out
