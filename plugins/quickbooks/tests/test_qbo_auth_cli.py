"""``integrand auth qbo``: the authorization-code flow on the command line, as a real subprocess."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
from integrand_quickbooks import QuickBooksConfig, QuickBooksConnector
from qbo_support import TOKEN_KEY, qbo_env

from integrand.app import ScopedState
from integrand.connector import ConnectorContext
from integrand.store import Store


def qbo_config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"

[admin]
enabled = false

[sources.qbo]
connector = "quickbooks"
realm_id = "9130350000000001"
client_id = "fake-client-id"
client_secret = "fake-client-secret"
verifier_token = "fake-verifier-token"
token_key = "{TOKEN_KEY}"
api_base = "{url}"
token_url = "{url}/oauth2/v1/tokens/bearer"
authorize_url = "{url}/connect/oauth2"
redirect_uri = "http://localhost:8765/quickbooks/callback"
{extra}

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "qbo"
to = ["out"]
"""
    )
    return path


async def test_integrand_auth_runs_the_code_flow_and_stores_tokens(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        cfg = qbo_config(tmp_path, env.fake.url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "integrand.cli",
            "auth",
            "qbo",
            "--config",
            str(cfg),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdin is not None
        url = ""
        while not url:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "integrand auth ended before printing the URL"
            if line.startswith(env.fake.url + "/connect/oauth2?"):
                url = line.strip()
        # The user opens the URL and consents; the browser lands on the redirect URI, which they paste.
        async with aiohttp.ClientSession() as s, s.get(url, allow_redirects=False) as r:
            redirected = r.headers["Location"]
        proc.stdin.write(redirected.encode() + b"\n")
        await proc.stdin.drain()
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert b"stored (encrypted)" in out
        # The daemon's connector (same store, same scope) finds the tokens and uses them without refreshing.
        store = Store(tmp_path / "var" / "integrand.db")
        await store.open()
        try:
            ctx = ConnectorContext("qbo", "source", tmp_path, ScopedState(store, "source:qbo"), http=env.http("qbo"))
            conf = QuickBooksConfig.model_validate(
                {
                    "realm_id": env.fake.realm_id,
                    "client_id": env.fake.client_id,
                    "client_secret": env.fake.client_secret,
                    "token_key": TOKEN_KEY,
                    "api_base": env.fake.url,
                    "token_url": env.fake.url + "/oauth2/v1/tokens/bearer",
                }
            )
            qbo = QuickBooksConnector(conf, ctx)
            await qbo.start()
            try:
                assert await qbo.query("select * from Customer") == []
                assert env.fake.refreshes == 0
            finally:
                await qbo.close()
        finally:
            await store.close()


async def test_integrand_auth_refuses_a_forged_redirect(tmp_path: Path) -> None:
    async with qbo_env(tmp_path) as env:
        cfg = qbo_config(tmp_path, env.fake.url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "integrand.cli",
            "auth",
            "qbo",
            "--config",
            str(cfg),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        forged = b"http://localhost:8765/quickbooks/callback?code=abc&state=not-yours&realmId=9130350000000001\n"
        _out, err = await asyncio.wait_for(proc.communicate(forged), 30)
        assert proc.returncode == 1
        assert b"state does not match" in err
