"""Test helpers: a config in tmp_path, an in-process daemon on free ports, waiting with a deadline."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from integrand.app import Daemon
from integrand.config import Settings, load_config
from integrand.testing import running_daemon, standard_webhook_headers
from integrand.testing import wait_for as wait_for  # re-exported for the tests

DEMO_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

BASE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "debug"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:0"
"""

DEMO = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "demo"
to = ["out"]
"""


def write_config(tmp_path: Path, body: str = DEMO, base: str = BASE) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(base + body)
    return path


def settings_for(tmp_path: Path, body: str = DEMO, base: str = BASE) -> Settings:
    return load_config(write_config(tmp_path, body, base))


def running(settings: Settings) -> AbstractAsyncContextManager[Daemon]:
    """Run the daemon in this event loop until the block ends, then stop it cleanly."""
    return running_daemon(settings)


def hook_url(d: Daemon, source: str = "demo") -> str:
    return f"http://127.0.0.1:{d.ports['webhooks']}/hooks/{source}"


def admin_url(d: Daemon, path: str) -> str:
    return f"http://127.0.0.1:{d.ports['admin']}{path}"


def signed_headers(body: bytes, msg_id: str, secret: str = DEMO_SECRET, ts: int | None = None) -> dict[str, str]:
    return standard_webhook_headers(body, msg_id, secret, ts)


async def post_signed(
    session: aiohttp.ClientSession, url: str, payload: Any, msg_id: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps(payload)
    async with session.post(url, data=body, headers=signed_headers(body, msg_id, **kw)) as resp:
        return resp.status, await resp.json()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
