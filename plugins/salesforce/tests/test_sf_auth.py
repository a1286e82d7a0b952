"""Sessions for a daemon: the three grants, instance_url, one re-auth on 401, rotated refresh tokens at rest."""

from __future__ import annotations

from pathlib import Path

import pytest
from integrand_salesforce import SalesforceConfig, SalesforceConnector
from integrand_salesforce.testing import TEST_TOKEN_KEY, rsa_key_pair
from sf_support import sf_env

from integrand.app import ScopedState
from integrand.connector import AuthError
from integrand.errors import ConfigError
from integrand.testing import validate_config


@pytest.mark.parametrize("grant", ["jwt", "client_credentials", "refresh_token"])
async def test_each_grant_gets_a_session_and_calls_go_to_its_instance_url(tmp_path: Path, grant: str) -> None:
    async with sf_env(tmp_path) as env:
        env.fake.create("Account", Name="Acme")
        conn = await env.connector(auth=grant, initial_lookback="all")
        res = await conn.poll(None)
        assert [e.data["Name"] for e in res.events] == ["Acme"]
        # The token came from the login host (or My Domain for client credentials), the query from
        # the instance_url of the answer: the fake serves the REST API only on its My Domain host.
        session = await conn.sessions.session(conn.ctx.http)
        assert session.instance_url == env.fake.my_domain_url
        assert env.fake.token_requests[-1]["grant_type"].endswith({"jwt": "jwt-bearer"}.get(grant, grant))
        await conn.close()


@pytest.mark.parametrize("grant", ["jwt", "client_credentials", "refresh_token"])
async def test_an_expired_session_is_renewed_once_and_the_call_retried(tmp_path: Path, grant: str) -> None:
    async with sf_env(tmp_path, session_lifetime=60) as env:
        env.fake.create("Account", Name="Acme")
        conn = await env.connector(f"sf-{grant}", auth=grant, initial_lookback="all")
        await conn.poll(None)
        assert conn.sessions.grants == 1
        env.fake.expire_sessions()
        res = await conn.poll(None)  # 401 INVALID_SESSION_ID → one new session → the same query again
        assert len(res.events) == 1
        assert conn.sessions.grants == 2
        assert [r["grant_type"].rsplit(":", 1)[-1] for r in env.fake.token_requests] == [
            {"jwt": "jwt-bearer"}.get(grant, grant)
        ] * 2
        await conn.close()


async def test_a_session_refused_twice_is_an_auth_error(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        conn = await env.connector()
        env.fake.fail(401, times=5, body=[{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])
        with pytest.raises(AuthError, match="401 twice"):
            await conn.poll(None)
        assert conn.sessions.grants == 2
        await conn.close()


async def test_rotated_refresh_token_is_stored_encrypted_and_used_after_a_restart(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        bootstrap = env.fake.issue_refresh_token()
        conn = await env.connector("crm", auth="refresh_token", refresh_token=bootstrap)
        await conn.poll(None)
        assert bootstrap not in env.fake.refresh_tokens, "the fake rotates: the bootstrap token is spent"
        [current] = env.fake.refresh_tokens
        raw = await ScopedState(env.store, "source:crm").get("salesforce_tokens")
        assert current not in str(raw) and bootstrap not in str(raw), "stored in the clear"
        await conn.close()
        del conn
        # A new process: the configured bootstrap token no longer works; the stored, rotated one does.
        import gc

        gc.collect()
        again = await env.connector("crm", auth="refresh_token", refresh_token=bootstrap)
        env.fake.expire_sessions()
        await again.poll(None)
        assert current not in env.fake.refresh_tokens
        assert len(env.fake.refresh_tokens) == 1
        await again.close()


async def test_client_credentials_are_refused_on_the_login_host(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        # Pointing my_domain_url at the login host is the classic mistake; Salesforce's answer is named.
        conn = await env.connector(auth="client_credentials", my_domain_url=env.fake.login_url)
        with pytest.raises(AuthError, match="request not supported on this domain"):
            await conn.poll(None)
        await conn.close()


async def test_a_jwt_signed_with_the_wrong_key_says_what_to_check(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        wrong, _ = rsa_key_pair()
        conn = await env.connector(private_key=wrong)
        with pytest.raises(AuthError, match="certificate uploaded to the External Client App"):
            await conn.poll(None)
        await conn.close()


async def test_an_expired_assertion_is_refused(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        conn = await env.connector()
        claims_exp = conn.sessions.assertion()
        env.fake.clock = lambda: 10**10  # the org's clock far ahead of the assertion's exp
        import jwt as pyjwt

        assert pyjwt.decode(claims_exp, options={"verify_signature": False})["aud"] == env.fake.login_url
        with pytest.raises(AuthError, match="expired"):
            await conn.poll(None)
        await conn.close()


def test_each_grant_names_what_it_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        validate_config(SalesforceConnector, {"client_id": "x"}, base_dir=tmp_path)
    assert "auth = 'jwt' needs username and private_key" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_config(
            SalesforceConnector,
            {"client_id": "x", "auth": "client_credentials", "client_secret": "s"},
            base_dir=tmp_path,
        )
    assert "needs my_domain_url" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_config(
            SalesforceConnector, {"client_id": "x", "auth": "refresh_token", "token_key": "nope"}, base_dir=tmp_path
        )
    assert "sources.contract.token_key" in str(e.value)


def test_production_defaults_and_sandbox() -> None:
    cfg = SalesforceConfig.model_validate({"client_id": "x", "username": "u", "private_key": "k"})
    assert cfg.login_host == "https://login.salesforce.com"
    assert cfg.audience == "https://login.salesforce.com"
    assert cfg.api_version == "62.0"
    sandbox = SalesforceConfig.model_validate(
        {"client_id": "x", "username": "u", "private_key": "k", "environment": "sandbox"}
    )
    assert sandbox.login_host == sandbox.audience == "https://test.salesforce.com"
    mine = SalesforceConfig.model_validate(
        {
            "client_id": "x",
            "auth": "client_credentials",
            "client_secret": "s",
            "my_domain_url": "https://acme.my.salesforce.com/",
        }
    )
    assert mine.login_host == "https://acme.my.salesforce.com"
    assert TEST_TOKEN_KEY
