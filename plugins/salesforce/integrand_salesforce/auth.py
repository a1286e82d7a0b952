"""Sessions for a daemon: OAuth 2.0 JWT bearer, client credentials, or a rotated refresh token.

Salesforce's token answers carry ``access_token`` and ``instance_url`` and no ``expires_in``: a
session lasts as long as the org's session timeout says, and the API answers 401
``INVALID_SESSION_ID`` once it is over. So a session is used until that 401, then a new one is
obtained exactly once (concurrent callers share it) and the request is retried.

- JWT bearer (the recommended server-to-server flow): an RS256 assertion with ``iss`` = consumer
  key, ``sub`` = the integration user, ``aud`` = the login host, ``exp`` three minutes ahead,
  signed with the app's private key (a secret reference; PyJWT + cryptography do the signing).
  No refresh token and nothing to store: a new assertion whenever a session is needed.
- Client credentials: consumer key and secret posted to the org's **My Domain** URL (Salesforce
  refuses this grant on login.salesforce.com); the app's run-as user acts.
- Refresh token: the token from a one-time authorization. If the app rotates refresh tokens the
  answer carries a new one and the old one stops working, so the new one is stored (encrypted with
  Fernet, committed) before the new session is used — as the QuickBooks connector does.

(Reference: third-party-apis.md "Salesforce"; help.salesforce.com "OAuth 2.0 JWT Bearer Flow for
Server-to-Server Integration" and "OAuth 2.0 Client Credentials Flow".)
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import jwt
import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from integrand.connector import AuthError, Http, RetryableError, StateStore

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
STATE_KEY = "salesforce_tokens"
ASSERTION_LIFETIME = 180.0  # Salesforce accepts an exp at most a few minutes ahead

Grant = Literal["jwt", "client_credentials", "refresh_token"]


@dataclass(frozen=True)
class Session:
    """One access token and the instance it belongs to (every later call goes to ``instance_url``)."""

    access_token: str
    instance_url: str
    issued_at: float
    id_url: str = ""

    @property
    def org_id(self) -> str | None:
        """The org id from the identity URL (``…/id/<org>/<user>``), when the answer gave one."""
        parts = self.id_url.rstrip("/").split("/")
        return parts[-2] if len(parts) >= 3 and parts[-3] == "id" else None


def make_cipher(keys: Sequence[str]) -> MultiFernet:
    """A cipher from one or more Fernet keys (the first encrypts; all decrypt, so keys can rotate)."""
    try:
        return MultiFernet([Fernet(k.encode()) for k in keys])
    except (ValueError, TypeError) as e:
        raise ValueError(
            "token_key must be a Fernet key: 32 url-safe base64-encoded bytes "
            '(python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())")'
        ) from e


@dataclass(frozen=True)
class AuthSettings:
    """What a grant needs, resolved from the connector's config (secrets already revealed)."""

    grant: Grant
    token_url: str
    client_id: str
    audience: str = ""
    client_secret: str | None = None
    username: str | None = None
    private_key: str | None = None
    refresh_token: str | None = None
    token_keys: tuple[str, ...] = ()


class SessionManager:
    """Hands out the current session; ``renew(stale)`` replaces it once however many callers saw the 401."""

    def __init__(self, settings: AuthSettings, state: StateStore, clock: Callable[[], float] = time.time):
        self.settings = settings
        self._states: list[StateStore] = [state]
        self._cipher = make_cipher(settings.token_keys) if settings.token_keys else None
        self._clock = clock
        self._lock = asyncio.Lock()
        self._session: Session | None = None
        self.grants = 0  # token requests made (tests and metrics read it)

    @property
    def states(self) -> tuple[StateStore, ...]:
        """The state stores of every connector of this org (each keeps the shared tokens and pauses)."""
        return tuple(self._states)

    def attach(self, state: StateStore) -> None:
        """Share the session and the stored refresh token with another connector of the same org."""
        if all(s is not state for s in self._states):
            self._states.append(state)

    async def session(self, http: Http) -> Session:
        if self._session is not None:
            return self._session
        return await self.renew(http, stale=None)

    async def renew(self, http: Http, stale: Session | None) -> Session:
        """A new session unless another caller already replaced ``stale`` (the one that got the 401)."""
        async with self._lock:
            if self._session is not None and self._session is not stale:
                return self._session
            self._session = await self._grant(http)
            return self._session

    # --- grants ---------------------------------------------------------------------------------

    def assertion(self) -> str:
        s = self.settings
        claims = {
            "iss": s.client_id,
            "sub": s.username,
            "aud": s.audience,
            "exp": int(self._clock() + ASSERTION_LIFETIME),
        }
        try:
            return jwt.encode(claims, s.private_key or "", algorithm="RS256")
        except (ValueError, TypeError, jwt.PyJWTError) as e:
            raise AuthError(f"cannot sign the JWT assertion with private_key: {type(e).__name__}") from None

    async def _grant(self, http: Http) -> Session:
        s = self.settings
        form: dict[str, str]
        if s.grant == "jwt":
            form = {"grant_type": JWT_BEARER, "assertion": self.assertion()}
        elif s.grant == "client_credentials":
            form = {
                "grant_type": "client_credentials",
                "client_id": s.client_id,
                "client_secret": s.client_secret or "",
            }
        else:
            refresh = await self._stored_refresh_token() or s.refresh_token
            if not refresh:
                raise AuthError(
                    "no Salesforce refresh token: run `integrand auth NAME` once (or set refresh_token, a secret reference)"
                )
            form = {"grant_type": "refresh_token", "refresh_token": refresh, "client_id": s.client_id}
            if s.client_secret:
                form["client_secret"] = s.client_secret
        body = await self._post(http, form)
        session = Session(
            access_token=str(body["access_token"]),
            instance_url=str(body["instance_url"]).rstrip("/"),
            issued_at=float(body.get("issued_at", self._clock() * 1000)) / 1000,
            id_url=str(body.get("id", "")),
        )
        http.add_secret(session.access_token)
        new_refresh = body.get("refresh_token")
        if s.grant == "refresh_token" and isinstance(new_refresh, str) and new_refresh:
            http.add_secret(new_refresh)
            # Durable first: with rotation the old refresh token is spent, the new one exists only here.
            await self._store_refresh_token(new_refresh)
        self.grants += 1
        return session

    async def _post(self, http: Http, form: dict[str, str], grant: str | None = None) -> dict[str, Any]:
        s = self.settings
        res = await http.post(
            s.token_url,
            data=form,
            headers={"Accept": "application/json"},
            check=False,
            retries=0,  # a token request is not idempotent under rotation: never resend it blindly
        )
        if res.status >= 500 or res.status == 429:
            raise RetryableError(
                f"Salesforce token endpoint answered {res.status}",
                retry_after=res.retry_after,
                request_id=res.request_id,
            )
        try:
            body: Any = orjson.loads(res.body)
        except orjson.JSONDecodeError:
            body = None
        if res.status != 200 or not isinstance(body, dict) or "access_token" not in body or "instance_url" not in body:
            err = body.get("error") if isinstance(body, dict) else None
            desc = body.get("error_description") if isinstance(body, dict) else None
            hint = {
                "jwt": "check client_id, username, the certificate uploaded to the External Client App and its pre-authorized users",
                "client_credentials": "check client_id/client_secret, my_domain_url and the app's run-as user",
                "refresh_token": "the refresh token was revoked or expired: run `integrand auth NAME` again",
            }[s.grant]
            if grant is not None:  # the authorization code
                hint = "check client_secret and that redirect_uri is the app's callback URL, then authorize again"
            raise AuthError(
                f"Salesforce refused the {grant or s.grant} token request ({res.status} {err}: {desc}); {hint}",
                request_id=res.request_id,
            )
        return body

    async def exchange_code(self, http: Http, code: str, redirect_uri: str, verifier: str) -> Session:
        """The web-server flow's last step (``integrand auth``): the code for a session and a refresh token,
        which is stored encrypted before this returns; later sessions come from the refresh-token grant."""
        s = self.settings
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": s.client_id,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        if s.client_secret:
            form["client_secret"] = s.client_secret
        body = await self._post(http, form, grant="authorization code")
        refresh = body.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            raise AuthError(
                "Salesforce issued no refresh token: give the External Client App the scopes "
                "refresh_token and offline_access, and include them in oauth_scopes"
            )
        http.add_secret(str(body["access_token"]))
        http.add_secret(refresh)
        await self._store_refresh_token(refresh)
        async with self._lock:
            self._session = Session(
                access_token=str(body["access_token"]),
                instance_url=str(body["instance_url"]).rstrip("/"),
                issued_at=float(body.get("issued_at", self._clock() * 1000)) / 1000,
                id_url=str(body.get("id", "")),
            )
            self.grants += 1
            return self._session

    # --- the refresh token at rest ----------------------------------------------------------------

    async def _stored_refresh_token(self) -> str | None:
        if self._cipher is None:
            return None
        best: tuple[float, str] | None = None
        undecryptable = False
        for state in self._states:
            raw = await state.get(STATE_KEY)
            if not isinstance(raw, dict):
                continue
            try:
                plain = orjson.loads(self._cipher.decrypt(str(raw["enc"]).encode()))
            except (InvalidToken, KeyError, TypeError, orjson.JSONDecodeError):
                undecryptable = True
                continue
            saved = float(raw.get("saved_at", 0))
            if best is None or saved > best[0]:
                best = (saved, str(plain["refresh_token"]))
        if best is None and undecryptable:
            raise AuthError(
                "the stored Salesforce refresh token cannot be decrypted with token_key (was the key replaced "
                "without keeping the old one in the list?); set refresh_token again"
            )
        return best[1] if best else None

    async def _store_refresh_token(self, token: str) -> None:
        if self._cipher is None:
            raise AuthError("refresh tokens rotate but no token_key is configured to store them encrypted")
        enc = self._cipher.encrypt(orjson.dumps(asdict(_Stored(token)))).decode()
        for state in self._states:
            await state.set(STATE_KEY, {"v": 1, "enc": enc, "saved_at": self._clock()})


@dataclass(frozen=True)
class _Stored:
    refresh_token: str


# One manager per org identity in this process, so a source and a sink of one org share one session
# and never rotate the refresh token out from under each other.
_MANAGERS: weakref.WeakValueDictionary[tuple[str, ...], SessionManager] = weakref.WeakValueDictionary()


def shared_manager(key: tuple[str, ...], state: StateStore, make: Callable[[], SessionManager]) -> SessionManager:
    mgr = _MANAGERS.get(key)
    if mgr is None:
        mgr = make()
        _MANAGERS[key] = mgr
    else:
        mgr.attach(state)
    return mgr
