"""A source and a sink for one QuickBooks company on one [connections.NAME]: one setup, one token store."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from qbo_support import TOKEN_KEY, qbo_env

from integrand.app import ScopedState
from integrand.config import parse_config
from integrand.errors import ConfigError
from integrand.testing import daemon_config, running_daemon, wait_for

CONN = f"""
[connections.acme]
connector = "quickbooks"
realm_id = "123"
client_id = "id"
client_secret = "secret"
token_key = "{TOKEN_KEY}"
"""


def parse(text: str, tmp_path: Path) -> object:
    return parse_config(tomllib.loads(text), base_dir=tmp_path)


def test_a_connection_is_merged_into_each_table_that_names_it(tmp_path: Path) -> None:
    s = parse(
        CONN
        + """
[sources.books]
connection = "acme"
entities = ["Customer"]

[sinks.books_out]
connection = "acme"
entity = "Customer"
match_field = "DisplayName"

[[routes]]
from = "books"
to = ["books_out"]
""",
        tmp_path,
    )
    src, sink = s.sources["books"], s.sinks["books_out"]  # type: ignore[attr-defined]
    assert src.connector == sink.connector == "quickbooks"
    assert src.options.realm_id == sink.options.realm_id == "123"
    assert src.options.entities == ["Customer"] and sink.options.match_field == "DisplayName"
    assert src.state_scope == sink.state_scope == "connection:acme"


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        (
            '[sources.books]\nconnection = "acne"\n',
            "sources.books.connection: no connection named 'acne' (connections: acme)",
        ),
        (
            '[sources.books]\nconnection = "acme"\nrealm_id = "9"\n',
            "sources.books.realm_id: already set by connection 'acme'",
        ),
        (
            '[sources.books]\nconnection = "acme"\nconnector = "hubspot"\n',
            "sources.books.connector: 'hubspot' differs from connection 'acme'",
        ),
    ],
)
def test_connection_mistakes_name_the_key(tmp_path: Path, table: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(CONN + table, tmp_path)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_source_keys_do_not_belong_in_a_connection(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse(CONN + '[connections.acme.poll]\nmin_interval = "1s"\n[sources.books]\nconnection = "acme"\n', tmp_path)
    assert "connections.acme.poll: belongs in the source table, not the connection" in e.value.problems


async def test_source_and_sink_of_one_company_keep_one_token_store(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        refresh = env.fake.issue_refresh_token()
        cfg = daemon_config(
            tmp_path,
            f"""
[connections.acme]
connector = "quickbooks"
realm_id = "{env.fake.realm_id}"
client_id = "{env.fake.client_id}"
client_secret = "{env.fake.client_secret}"
verifier_token = "{env.fake.verifier_token}"
token_key = "{TOKEN_KEY}"
api_base = "{env.fake.url}"
token_url = "{env.fake.url}/oauth2/v1/tokens/bearer"
refresh_token = "{refresh}"

[sources.books]
connection = "acme"
entities = ["Customer"]
initial_lookback = "1m"

[sources.books.poll]
min_interval = "100ms"
max_interval = "500ms"
target_latency = "500ms"

[sinks.books_out]
connection = "acme"
entity = "Vendor"

[[routes]]
from = "books"
to = ["books_out"]

[routes.map]
DisplayName = "data.object.DisplayName"
""",
        )
        async with running_daemon(cfg) as d:
            env.fake.create("Customer", {"DisplayName": "Shared"})
            await wait_for(
                lambda: any(
                    v.get("DisplayName") == "Shared"
                    for v in env.fake.realms[env.fake.realm_id].objects.get("Vendor", {}).values()
                ),
                timeout=20,
            )
            assert await ScopedState(d.store, "connection:acme").get("oauth_tokens") is not None
            assert await ScopedState(d.store, "source:books").get("oauth_tokens") is None
            assert await ScopedState(d.store, "sink:books_out").get("oauth_tokens") is None
        assert len(env.fake.refresh_tokens) == 1, "one rotation chain, not two"
