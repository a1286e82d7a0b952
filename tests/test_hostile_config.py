"""A careless operator's config: keys anyone could guess, unsigned sources, bad JSONPaths — refused at ``check``."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from integrand.cli import main as cli_main
from integrand.config import load_config
from integrand.errors import ConfigError

SINK = '\n[sinks.out]\nconnector = "jsonl"\npath = "var/out.jsonl"\n\n[[routes]]\nfrom = "hook"\nto = ["out"]\n'


def key(n: int) -> str:
    return "whsec_" + base64.b64encode(bytes(range(n))).decode()


def write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(source + SINK)
    return path


def standard(secret: str) -> str:
    return f'[sources.hook]\nconnector = "webhook"\nsignature = "standard-webhooks"\nsecret = "{secret}"\n'


@pytest.mark.parametrize(("secret", "size"), [("whsec_", 0), ("whsec_AA==", 1), (key(23), 23)])
def test_standard_webhooks_keys_under_24_bytes_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secret: str, size: int
) -> None:
    path = write(tmp_path, standard(secret))
    assert cli_main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert (
        f"sources.hook.secret: a Standard Webhooks key must be at least 24 random bytes (this one decodes to {size})"
        in err
    )
    assert "Traceback" not in err
    with pytest.raises(ConfigError):
        load_config(path)  # what `integrand run` loads: it refuses to start too


def test_a_24_byte_key_is_accepted(tmp_path: Path) -> None:
    load_config(write(tmp_path, standard(key(24))))


def test_a_short_key_in_a_rotation_list_is_refused_too(tmp_path: Path) -> None:
    body = f'[sources.hook]\nconnector = "webhook"\nsignature = "standard-webhooks"\nsecret = ["{key(32)}", "whsec_"]\n'
    with pytest.raises(ConfigError, match="at least 24 random bytes"):
        load_config(write(tmp_path, body))


def test_http_sink_signing_key_has_the_same_floor(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[sources.hook]\nconnector = "webhook"\nsignature = "github"\nsecret = "gh-secret"\n'
        '[sinks.out]\nconnector = "http"\nurl = "http://127.0.0.1:1/x"\nsecret = "whsec_AA=="\n'
        '[[routes]]\nfrom = "hook"\nto = ["out"]\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems[0].startswith("sinks.out.secret: a Standard Webhooks key must be at least 24")


def test_unsigned_needs_allow_unsigned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[sources.hook]\nconnector = "webhook"\nsignature = "none"\n')
    assert cli_main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "sources.hook: signature = 'none' accepts events from anyone" in err
    assert "allow_unsigned = true" in err


def test_unsigned_with_allow_unsigned_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[sources.hook]\nconnector = "webhook"\nsignature = "none"\nallow_unsigned = true\n')
    assert cli_main(["check", "--config", str(path)]) == 0
    assert "warning: sources.hook: signature = 'none': webhooks are accepted unauthenticated" in capsys.readouterr().err
    assert any("unauthenticated" in w for w in load_config(path).warnings)  # `integrand run` logs these at start


@pytest.mark.parametrize("field", ["id", "items", "updated", "next_page"])
def test_bad_jsonpath_on_http_poll_is_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    paths = {"items": "$.items[*]", "id": "$.id", "updated": "$.updated_at"}
    paths[field] = "{id}"
    lines = "\n".join(f'{k} = "{v}"' for k, v in paths.items())
    body = f'[sources.hook]\nconnector = "http-poll"\nurl = "http://127.0.0.1:1/items"\n{lines}\n'
    path = write(tmp_path, body)
    assert cli_main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"sources.hook.{field}: not a valid JSONPath: '{{id}}'" in err
