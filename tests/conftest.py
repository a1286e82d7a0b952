from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .pgdb import session_database


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read the developer's config or systemd credentials."""
    monkeypatch.delenv("INTEGRAND_CONFIG", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    # Only integrand's own distributions (the core and plugins/*); a stray installed plugin is never loaded.
    monkeypatch.setenv("INTEGRAND_PLUGINS", "integrand,integrand-*")
    os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The DSN of a PostgreSQL database of this session's own (tests/pgdb.py), dropped at its end."""
    yield from session_database()


# The example third-party plugin has its own tests, run from its installed distribution by
# tests/test_example_plugin.py; collecting them here would import it from the source folder.
collect_ignore = ["example_plugin"]
pytest_plugins = ["pytester"]
