"""Run the Salesforce connector against its fake: for this plugin's tests and anyone building on it.

``async with fake_salesforce() as sf:`` starts a :class:`FakeSalesforce` on 127.0.0.1 with a fresh RSA
key pair for the JWT grant; ``sf.table(...)`` is a connector config table pointing at it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .fake import FakeSalesforce
from .fake_pubsub import FakePubSub

# A fixed Fernet key for tests (32 url-safe base64 bytes), never used anywhere real.
TEST_TOKEN_KEY = "Jm6cgdGn1HBvYBMXFXoYzCAQzUrCBWFSrX8Ko-4f4nw="


def rsa_key_pair() -> tuple[str, str]:
    """A new 2048-bit RSA key as (private PEM, public PEM): the app's certificate key, for tests."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


_KEYS: tuple[str, str] | None = None


def shared_key_pair() -> tuple[str, str]:
    """One key pair per process (RSA generation costs ~50 ms; tests need not pay it each time)."""
    global _KEYS
    if _KEYS is None:
        _KEYS = rsa_key_pair()
    return _KEYS


@dataclass
class RunningFake:
    fake: FakeSalesforce
    private_key: str
    pubsub: FakePubSub | None = None

    def cdc_table(self, topic: str = "/data/ChangeEvents", auth: str = "jwt", **extra: Any) -> dict[str, Any]:
        """A ``salesforce-cdc`` table subscribing to this org's fake Pub/Sub API."""
        assert self.pubsub is not None, "start the fake with fake_salesforce(pubsub=True)"
        return self.table(auth, pubsub_url=self.pubsub.target, pubsub_tls=False, cdc_topic=topic, **extra)

    def table(self, auth: str = "jwt", **extra: Any) -> dict[str, Any]:
        """A ``salesforce`` connector table for this org (secrets inline, as tests may give them)."""
        f = self.fake
        base: dict[str, Any] = {
            "auth": auth,
            "client_id": f.client_id,
            "login_url": f.login_url,
            "test_login_url": f.login_url,
            "org_id": f.org_id,
            "timeout": 10,
        }
        if auth == "jwt":
            base.update(username=f.username, private_key=self.private_key)
        elif auth == "client_credentials":
            base.update(client_secret=f.client_secret, my_domain_url=f.my_domain_url)
        else:
            base.update(client_secret=f.client_secret, token_key=TEST_TOKEN_KEY)
            if "refresh_token" not in extra:
                base["refresh_token"] = f.issue_refresh_token()
        base.update(extra)
        return base

    def toml(self, auth: str = "jwt", *, cdc: bool = False, **extra: Any) -> str:
        """The same table as TOML lines (for a daemon config file); ``cdc``: a ``salesforce-cdc`` source."""
        table = self.cdc_table(auth=auth, **extra) if cdc else self.table(auth, **extra)
        lines = [f'connector = "{"salesforce-cdc" if cdc else "salesforce"}"']
        for k, v in table.items():
            lines.append(f"{k} = {_toml(v)}")
        return "\n".join(lines) + "\n"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if "\n" in s:
        return "'''\n" + s + "'''"
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@asynccontextmanager
async def fake_salesforce(*, pubsub: bool = False, keepalive: float = 0.5, **kw: Any) -> AsyncIterator[RunningFake]:
    """A started fake org (login host and My Domain host, and with ``pubsub`` its gRPC Pub/Sub API)."""
    private, public = shared_key_pair()
    kw.setdefault("public_key_pem", public)
    fake = FakeSalesforce(**kw)
    await fake.start()
    bus = FakePubSub(fake, keepalive=keepalive) if pubsub else None
    if bus is not None:
        await bus.start()
    try:
        yield RunningFake(fake, private, bus)
    finally:
        if bus is not None:
            await bus.stop()
        await fake.stop()
