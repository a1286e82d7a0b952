"""``integrand auth sf``: the refresh-token grant's first token, by the web-server flow (PKCE) in a terminal."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import aiohttp
from integrand_salesforce import SalesforceConfig, SalesforceConnector, auth, client
from integrand_salesforce.testing import RunningFake, _toml, fake_salesforce

from integrand.app import ScopedState
from integrand.connector import ConnectorContext, HttpPool
from integrand.store import Store


def config(tmp_path: Path, sf: RunningFake) -> Path:
    table = sf.table("refresh_token", objects=["Account"], refresh_token="")
    del table["refresh_token"]  # nothing to bootstrap from: `integrand auth` obtains it
    lines = "\n".join(f"{k} = {_toml(v)}" for k, v in table.items())
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"

[admin]
enabled = false

[sources.sf]
connector = "salesforce"
{lines}

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "sf"
to = ["out"]
"""
    )
    return path


async def run_auth(cfg: Path, sf: RunningFake, forge_state: bool = False) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "integrand.cli",
        "auth",
        "sf",
        "--config",
        str(cfg),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    url = ""
    while not url:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, "integrand auth ended before printing the URL"
        if line.startswith(sf.fake.login_url + "/services/oauth2/authorize?"):
            url = line.strip()
    assert "code_challenge=" in url and "state=" in url and "refresh_token" in url
    # The user logs in and allows access; the browser lands on the callback URL, which they paste.
    async with aiohttp.ClientSession() as s, s.get(url, allow_redirects=False) as r:
        assert r.status == 302
        redirected = r.headers["Location"]
    if forge_state:
        redirected = redirected.replace("state=", "state=forged")
    proc.stdin.write(redirected.encode() + b"\n")
    await proc.stdin.drain()
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_integrand_auth_obtains_and_stores_the_first_refresh_token(tmp_path: Path) -> None:
    async with fake_salesforce() as sf:
        cfg = config(tmp_path, sf)
        rc, out, err = await run_auth(cfg, sf)
        assert rc == 0, err
        assert f"refresh token for org {sf.fake.org_id}" in out and "stored (encrypted" in out
        [code_grant] = [f for f in sf.fake.token_requests if f["grant_type"] == "authorization_code"]
        assert code_grant["code_verifier"] and code_grant["redirect_uri"] == "http://localhost:8765/salesforce/callback"
        [issued] = sf.fake.refresh_tokens
        db = tmp_path / "var" / "integrand.db"
        assert issued.encode() not in db.read_bytes() + (
            db.with_suffix(".db-wal").read_bytes() if db.with_suffix(".db-wal").exists() else b""
        )
        # The daemon's connector (same store, same scope) signs in with the stored token: a refresh grant.
        client._CLIENTS.clear()
        auth._MANAGERS.clear()
        store = Store(db)
        await store.open()
        pool = HttpPool(timeout=10.0)
        await pool.start()
        try:
            table = sf.table("refresh_token", objects=["Account"], refresh_token="")
            del table["refresh_token"]
            ctx = ConnectorContext(
                name="sf",
                role="source",
                base_dir=tmp_path,
                state=ScopedState(store, "source:sf"),
                http=pool.for_connector(logging.getLogger("integrand.source.sf.http")),
                clock=sf.fake.clock,
            )
            conn = SalesforceConnector(SalesforceConfig.model_validate(table), ctx)
            await conn.start()
            sf.fake.create("Account", Name="After auth")
            res = await conn.poll(None)
            assert res is not None
            assert sf.fake.token_requests[-1]["grant_type"] == "refresh_token"
            assert sf.fake.token_requests[-1]["refresh_token"] == issued
        finally:
            await pool.close()
            await store.close()


async def test_integrand_auth_refuses_a_redirect_with_the_wrong_state(tmp_path: Path) -> None:
    async with fake_salesforce() as sf:
        cfg = config(tmp_path, sf)
        rc, _, err = await run_auth(cfg, sf, forge_state=True)
        assert rc == 1
        assert "state does not match" in err and "Traceback" not in err
        assert not any(f["grant_type"] == "authorization_code" for f in sf.fake.token_requests)
