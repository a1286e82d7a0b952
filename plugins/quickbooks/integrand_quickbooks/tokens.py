"""OAuth 2.0 tokens for one QuickBooks company: refreshed before expiry, rotated, stored encrypted.

Intuit's refresh token can change on *any* refresh and the old value stops working, so the new
pair is written to the connector's durable state (one SQLite commit) before the new access token
is used; a crash after the refresh and before the write is the only window, and it is as short as
one commit. (Reference: third-party-apis.md, "OAuth 2.0"; Intuit: "always store the latest refresh
token", https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/faq)

Encryption at rest: Fernet from ``cryptography``. Why Fernet rather than raw AES-GCM: it is
authenticated encryption with the IV chosen for us (no nonce bookkeeping to get wrong), the key is
one printable string a secret reference can hold (``Fernet.generate_key()``), and ``MultiFernet``
decrypts with any of several keys while encrypting with the first, which is key rotation for free.
"""

from __future__ import annotations

import asyncio
import base64
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from integrand.connector import AuthError, Http, RetryableError, StateStore

STATE_KEY = "oauth_tokens"
EARLY = 300.0  # refresh this long before the access token's expiry


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_at: float
    refresh_expires_at: float
    realm_id: str | None = None


def make_cipher(keys: Sequence[str]) -> MultiFernet:
    """A cipher from one or more Fernet keys (the first encrypts; all decrypt, for rotation)."""
    try:
        return MultiFernet([Fernet(k.encode()) for k in keys])
    except (ValueError, TypeError) as e:
        raise ValueError(
            "token_key must be a Fernet key: 32 url-safe base64-encoded bytes "
            '(python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())")'
        ) from e


class TokenManager:
    """Gives a valid access token, refreshing (once at a time) and persisting the rotated pair first."""

    def __init__(
        self,
        *,
        state: StateStore | Sequence[StateStore],
        cipher: MultiFernet,
        token_url: str,
        client_id: str,
        client_secret: str,
        bootstrap_refresh_token: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._states: list[StateStore] = [state] if not isinstance(state, Sequence) else list(state)
        self._cipher = cipher
        self._token_url = token_url
        self._basic = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        self._bootstrap = bootstrap_refresh_token
        self._clock = clock
        self._lock = asyncio.Lock()
        self._tokens: Tokens | None = None

    def attach(self, state: StateStore) -> None:
        """Share this company's tokens with another connector's state (a source and a sink of one realm)."""
        if all(s is not state for s in self._states):
            self._states.append(state)

    async def load(self) -> Tokens | None:
        """The newest stored pair across the attached states, decrypted; None if nothing was stored yet."""
        best: tuple[float, Tokens] | None = None
        undecryptable = False
        for state in self._states:
            raw = await state.get(STATE_KEY)
            if raw is None:
                continue
            try:
                plain = self._cipher.decrypt(str(raw["enc"]).encode())
            except (InvalidToken, KeyError, TypeError):
                undecryptable = True
                continue
            saved = float(raw.get("saved_at", 0))
            if best is None or saved > best[0]:
                best = (saved, Tokens(**orjson.loads(plain)))
        if best is None and undecryptable:
            raise AuthError(
                "stored QuickBooks tokens cannot be decrypted with token_key (was the key changed without "
                "keeping the old one in the list?); run `integrand auth` again"
            )
        return best[1] if best else None

    async def save(self, tokens: Tokens) -> None:
        """Encrypt and commit the pair to every attached state; returns only once it is durable."""
        enc = self._cipher.encrypt(orjson.dumps(asdict(tokens))).decode()
        for state in self._states:
            await state.set(STATE_KEY, {"v": 1, "enc": enc, "saved_at": self._clock()})
        self._tokens = tokens

    async def access_token(self, http: Http) -> str:
        tokens = self._tokens or await self.load()
        self._tokens = tokens
        if tokens is not None and tokens.expires_at - EARLY > self._clock():
            return tokens.access_token
        return await self.refresh(http, stale=tokens.access_token if tokens else None)

    async def refresh(self, http: Http, stale: str | None = None) -> str:
        """Refresh unless another caller already did since ``stale`` was handed out."""
        async with self._lock:
            # Re-read: `integrand auth` or another connector of this realm may have stored a newer pair.
            tokens = await self.load() or self._tokens
            self._tokens = tokens
            if tokens is not None and tokens.access_token != stale and tokens.expires_at - EARLY > self._clock():
                return tokens.access_token
            refresh_token = tokens.refresh_token if tokens else self._bootstrap
            if not refresh_token:
                raise AuthError("no QuickBooks tokens yet: run `integrand auth SOURCE_OR_SINK` once")
            realm = tokens.realm_id if tokens else None
            new = await self._grant(http, {"grant_type": "refresh_token", "refresh_token": refresh_token}, realm)
            return new.access_token

    async def exchange_code(self, http: Http, code: str, redirect_uri: str, realm_id: str | None) -> Tokens:
        """The authorization-code grant (``integrand auth``): the first token pair, stored encrypted."""
        async with self._lock:
            return await self._grant(
                http, {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}, realm_id
            )

    async def _grant(self, http: Http, form: dict[str, str], realm_id: str | None) -> Tokens:
        """One token request through integrand's HTTP helper (its logs hide the form and the answer's tokens)."""
        now = self._clock()
        res = await http.post(
            self._token_url,
            data=form,
            headers={"Authorization": self._basic, "Accept": "application/json"},
            check=False,
        )
        status = res.status
        if status >= 500 or status == 429:
            raise RetryableError(
                f"QuickBooks token endpoint answered {status}",
                retry_after=60 if status == 429 else None,
                request_id=res.request_id,
            )
        try:
            body: Any = orjson.loads(res.body)
        except orjson.JSONDecodeError:
            body = None
        if status != 200 or not isinstance(body, dict) or "access_token" not in body:
            err = body.get("error") if isinstance(body, dict) else None
            raise AuthError(
                f"QuickBooks refused the token request ({status} {err}); run `integrand auth` again",
                request_id=res.request_id,
            )
        http.add_secret(str(body["access_token"]))
        http.add_secret(str(body.get("refresh_token", "")))
        tokens = Tokens(
            access_token=body["access_token"],
            refresh_token=body["refresh_token"],
            expires_at=now + float(body.get("expires_in", 3600)),
            refresh_expires_at=now + float(body.get("x_refresh_token_expires_in", 8726400)),
            realm_id=realm_id,
        )
        # Durable first: the old refresh token is spent now, the new one exists only in this object.
        await self.save(tokens)
        return tokens


# One manager per (token endpoint, client id, realm) in this process, so a source and a sink of the
# same company never rotate the refresh token out from under each other.
_MANAGERS: weakref.WeakValueDictionary[tuple[str, ...], TokenManager] = weakref.WeakValueDictionary()


def shared_manager(key: tuple[str, ...], state: StateStore, make: Callable[[], TokenManager]) -> TokenManager:
    mgr = _MANAGERS.get(key)
    if mgr is None:
        mgr = make()
        _MANAGERS[key] = mgr
    else:
        mgr.attach(state)
    return mgr
