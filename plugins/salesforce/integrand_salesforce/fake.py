"""A local Salesforce that behaves like the documented API, for tests, the demo and benchmarks.

It follows /work/shared/reference/third-party-apis.md (Salesforce section) and Salesforce's docs:

- two hosts, as in real life: a *login* host (``login.salesforce.com``) and the org's *My Domain*
  host, which is also the ``instance_url`` every token answer names and where the REST API lives;
- ``POST /services/oauth2/token`` with the three daemon grants: JWT bearer (RS256, ``iss`` = consumer
  key, ``sub`` = username, ``aud`` = the login host, ``exp`` at most a few minutes ahead), client
  credentials (refused on the login host: "request not supported on this domain", accepted on My
  Domain), and refresh token (optionally rotated: the old one stops working). Answers carry
  ``access_token, instance_url, id, token_type, issued_at, signature`` and no ``expires_in``;
  sessions expire after ``session_lifetime`` and then answer 401 ``INVALID_SESSION_ID``;
- REST: ``query`` / ``queryAll`` (a SOQL subset: field list or ``FIELDS(STANDARD)``, ``WHERE`` with
  ``AND`` of comparisons and ``IN``, ``ORDER BY``, ``LIMIT``) paged by ``nextRecordsUrl`` (query
  locators that expire), sObject read / upsert by external id (201 / 200 / 300 with the matching
  record URLs) / delete, sObject Collections upsert (≤ 200, one type, ``allOrNone``) and retrieve,
  ``updated`` / ``deleted`` (with ``earliestDateAvailable``);
- errors as Salesforce sends them: a JSON array ``[{"message","errorCode","fields"}]``; per-record
  collection errors ``{"statusCode","message","fields"}``;
- ``Sforce-Limit-Info: api-usage=N/LIMIT`` on every API answer and the rolling daily allocation:
  past it, 403 ``REQUEST_LIMIT_EXCEEDED`` (no Retry-After), until ``reset_usage()``;
- injectable faults (a status for the next N requests, per-record errors by rule);
- Outbound Messages sent as Salesforce sends them: unsigned SOAP, up to 100 notifications, kept and
  re-sent (same notification ids, the records' *latest* data) until the answer is ``<Ack>true</Ack>``.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
import orjson
from aiohttp import web

from ._time import parse_time, record_time
from .outbound import envelope

PREFIXES = {"Account": "001", "Contact": "003", "Opportunity": "006", "Lead": "00Q", "Case": "500"}
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SYSTEM_FIELDS = ("Id", "IsDeleted", "CreatedDate", "LastModifiedDate", "SystemModstamp")
# Who is writing: "" for a user in the UI, "com/salesforce/api/rest/62.0;client=X" for an API client
# that sent Sforce-Call-Options: client=X (what CDC reports as changeOrigin).
CHANGE_ORIGIN: contextvars.ContextVar[str] = contextvars.ContextVar("change_origin", default="")

# A change listener: (sObject, record id, change type, record after the change, changed fields, nulled fields).
ChangeListener = Callable[[str, str, str, dict[str, Any], list[str], list[str]], None]


def sf_error(code: str, message: str, fields: list[str] | None = None) -> list[dict[str, Any]]:
    """The REST API's error body: always an array."""
    return [{"message": message, "errorCode": code, "fields": fields or []}]


@dataclass
class Session:
    token: str
    expires_at: float
    grant: str


@dataclass
class Fault:
    status: int
    remaining: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class FakeSalesforce:
    """An org: records, sessions and limits; ``await start()`` opens its login and My Domain hosts."""

    def __init__(
        self,
        *,
        org_id: str = "00D5g000004FAKEEAA",
        client_id: str = "3MVG9fake.consumer.key",
        client_secret: str = "fake-consumer-secret",
        username: str = "integration@acme.example",
        public_key_pem: str | None = None,
        session_lifetime: float = 7200.0,
        rotate_refresh_tokens: bool = True,
        api_limit: int = 100_000,
        page_size: int = 2000,
        locator_lifetime: float = 900.0,
        deleted_retention: timedelta = timedelta(days=15),
        clock: Callable[[], float] = time.time,
        api_versions: tuple[str, ...] = ("58.0", "59.0", "60.0", "61.0", "62.0", "63.0", "64.0", "65.0", "66.0"),
    ):
        self.org_id = org_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.username = username
        self.public_key_pem = public_key_pem
        self.session_lifetime = session_lifetime
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.api_limit = api_limit
        self.api_usage = 0
        self.page_size = page_size
        self.locator_lifetime = locator_lifetime
        self.deleted_retention = deleted_retention
        self.clock = clock
        self.api_versions = api_versions
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        # Deleted records (the recycle bin): queryAll sees them, getDeleted lists them until purged.
        self.recycle: dict[str, dict[str, dict[str, Any]]] = {}
        self.purged_before: datetime | None = None
        self.sessions: dict[str, Session] = {}
        self.refresh_tokens: set[str] = set()
        # The web-server flow: codes handed out by /services/oauth2/authorize → (redirect_uri, code_challenge).
        self.auth_codes: dict[str, tuple[str, str]] = {}
        self.callback_urls: set[str] = {"http://localhost:8765/salesforce/callback"}
        self.token_requests: list[dict[str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        # Per-record rules for collections and single upserts: a callable (type, record) → (statusCode, message) or None.
        self.record_rules: list[Callable[[str, dict[str, Any]], tuple[str, str] | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.latency: float = 0.0
        self._locators: dict[str, tuple[list[dict[str, Any]], int, float]] = {}
        self._ids = itertools.count(1)
        self._runners: list[web.AppRunner] = []
        self.login_url = ""
        self.my_domain_url = ""
        # Outbound Messages not yet acknowledged: (url, action id, [(notification id, sObject, record id)]).
        self.outbound_pending: list[tuple[str, str, list[tuple[str, str, str]]]] = []
        self.outbound_sent = 0
        self.last_answer = ""
        self.on_change: list[ChangeListener] = []  # the Pub/Sub fake subscribes here

    # --- test controls --------------------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(int(self.clock()), UTC)  # SystemModstamp has one-second resolution

    def issue_refresh_token(self) -> str:
        """A refresh token as the authorization-code flow would have left (the operator's bootstrap)."""
        tok = "5Aep8" + secrets.token_urlsafe(24)
        self.refresh_tokens.add(tok)
        return tok

    def expire_sessions(self) -> None:
        """Every access token stops working (a session timeout, an admin revoking sessions)."""
        self.sessions.clear()

    def fail(self, status: int, times: int = 1, body: Any = None, headers: dict[str, str] | None = None) -> None:
        """Answer the next ``times`` API requests with ``status`` (and a Salesforce error body)."""
        self.faults.append(Fault(status, times, body, headers or {}))

    def reset_usage(self) -> None:
        """The rolling 24 hours moved on: the daily allocation is available again."""
        self.api_usage = 0

    def new_id(self, sobject: str) -> str:
        prefix = PREFIXES.get(sobject, "a0X")
        return f"{prefix}5g{next(self._ids):010d}AAA"[:18]

    def create(self, sobject: str, **fields: Any) -> dict[str, Any]:
        """A record created by a user in Salesforce (sets Id and the system date-times)."""
        rid = self.new_id(sobject)
        now = record_time(self.now())
        rec = {"Id": rid, "IsDeleted": False, "CreatedDate": now, "LastModifiedDate": now, "SystemModstamp": now}
        rec.update(fields)
        self.records.setdefault(sobject, {})[rid] = rec
        self._notify(sobject, rid, "CREATE", rec, [k for k, v in rec.items() if v is not None], [])
        return dict(rec)

    def update(self, sobject: str, rid: str, **fields: Any) -> dict[str, Any]:
        rec = self.records[sobject][rid]
        changed = [k for k, v in fields.items() if rec.get(k) != v]
        rec.update(fields)
        now = record_time(self.now())
        rec["LastModifiedDate"] = rec["SystemModstamp"] = now
        nulled = [k for k in changed if fields[k] is None]
        self._notify(sobject, rid, "UPDATE", rec, [*changed, "LastModifiedDate"], nulled)
        return dict(rec)

    def _notify(
        self, sobject: str, rid: str, ctype: str, rec: dict[str, Any], changed: list[str], nulled: list[str]
    ) -> None:
        for listener in self.on_change:
            listener(sobject, rid, ctype, dict(rec), changed, nulled)

    def delete(self, sobject: str, rid: str) -> None:
        rec = self.records.get(sobject, {}).pop(rid)
        now = record_time(self.now())
        rec.update(IsDeleted=True, SystemModstamp=now, LastModifiedDate=now)
        self.recycle.setdefault(sobject, {})[rid] = rec
        self._notify(sobject, rid, "DELETE", {"Id": rid}, [], [])

    def purge(self, before: datetime) -> None:
        """Empty the recycle bin of what was deleted before ``before`` (getDeleted can no longer list it)."""
        for bin_ in self.recycle.values():
            for rid in [r for r, rec in bin_.items() if parse_time(rec["SystemModstamp"]) < before]:
                del bin_[rid]
        self.purged_before = before

    def get(self, sobject: str, rid: str) -> dict[str, Any] | None:
        rec = self.records.get(sobject, {}).get(rid)
        return dict(rec) if rec else None

    def find(self, sobject: str, field_name: str, value: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in self.records.get(sobject, {}).values() if r.get(field_name) == value]

    # --- Outbound Messages ---------------------------------------------------------------------------

    async def send_outbound(
        self,
        url: str,
        sobject: str,
        ids: list[str],
        *,
        action_id: str = "04k5g000000FAKEAAA",
        fields: list[str] | None = None,
        drop: bool = False,
        duplicate: bool = False,
    ) -> int | None:
        """Send one message for ``ids`` to ``url``; a message not acked stays pending. ``drop``: it never
        arrives; ``duplicate``: it arrives twice (the first ack was lost on its way back)."""
        notes = [("04l5g" + secrets.token_hex(6).upper() + "AAA", sobject, rid) for rid in ids]
        self.outbound_pending.append((url, action_id, notes))
        if drop:
            return None
        if duplicate:
            self.outbound_pending.append((url, action_id, notes))
            await self._post_outbound(len(self.outbound_pending) - 1, fields)
        return await self._post_outbound(len(self.outbound_pending) - 1, fields)

    async def retry_outbound(self, fields: list[str] | None = None) -> list[int | None]:
        """Salesforce's retry: every pending message again, same notification ids, the records' latest data."""
        return [await self._post_outbound(i, fields) for i in range(len(self.outbound_pending) - 1, -1, -1)]

    async def _post_outbound(self, index: int, fields: list[str] | None) -> int | None:
        url, action_id, notes = self.outbound_pending[index]
        items = []
        for nid, sobject, rid in notes:
            rec = self.records.get(sobject, {}).get(rid) or {"Id": rid}
            shown = {k: rec.get(k) for k in (fields or list(rec))}
            shown["Id"] = rid
            items.append((nid, sobject, shown))
        body = envelope(
            self.org_id, action_id, items, enterprise_url=self.my_domain_url, partner_url=self.my_domain_url
        )
        self.outbound_sent += 1
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.post(url, data=body, headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}) as r,
            ):
                text = await r.text()
                status = r.status
                self.last_answer = text
        except aiohttp.ClientError:
            return None
        if status == 200 and "<Ack>true</Ack>" in text:
            del self.outbound_pending[index]
        return status

    # --- serving --------------------------------------------------------------------------------

    def login_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/services/oauth2/token", self._token_login)
        app.router.add_get("/services/oauth2/authorize", self._authorize)
        return app

    def instance_app(self) -> web.Application:
        app = web.Application(middlewares=[self._api_middleware])
        app.router.add_post("/services/oauth2/token", self._token_my_domain)
        app.router.add_get("/services/oauth2/authorize", self._authorize)
        app.router.add_get("/services/data/", self._versions)
        app.router.add_route("*", "/services/data/{version}/{rest:.*}", self._api)
        return app

    async def start(self) -> tuple[str, str]:
        """Serve both hosts on 127.0.0.1; returns (login_url, my_domain_url)."""
        urls = []
        for app in (self.login_app(), self.instance_app()):
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None
            port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            urls.append(f"http://127.0.0.1:{port}")
            self._runners.append(runner)
        self.login_url, self.my_domain_url = urls
        return self.login_url, self.my_domain_url

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    # --- OAuth ----------------------------------------------------------------------------------

    async def _token_login(self, request: web.Request) -> web.Response:
        return await self._token(request, my_domain=False)

    async def _token_my_domain(self, request: web.Request) -> web.Response:
        return await self._token(request, my_domain=True)

    @staticmethod
    def _oauth_error(error: str, description: str, status: int = 400) -> web.Response:
        return web.json_response({"error": error, "error_description": description}, status=status)

    async def _authorize(self, request: web.Request) -> web.Response:
        """The web-server flow's consent page, with a user who approves at once: 302 to the callback with a code.

        As Salesforce does: the client id must be the app's and the redirect_uri one of its callback
        URLs (else an error page, no redirect); PKCE's code_challenge is remembered for the token request."""
        q = request.query
        if q.get("response_type") != "code":
            return web.Response(status=400, text="error=unsupported_response_type")
        if q.get("client_id") != self.client_id:
            return web.Response(status=400, text="error=invalid_client_id&error_description=client identifier invalid")
        redirect = q.get("redirect_uri", "")
        if redirect not in self.callback_urls:
            return web.Response(status=400, text="error=redirect_uri_mismatch")
        code = "aPrx" + secrets.token_urlsafe(32) + "=="  # real codes end in ==, so they arrive %3D%3D-encoded
        self.auth_codes[code] = (redirect, q.get("code_challenge", ""))
        params = {"code": code, **({"state": q["state"]} if "state" in q else {})}
        raise web.HTTPFound(f"{redirect}?{urlencode(params)}")

    def _code_grant(self, form: dict[str, str]) -> str | None:
        """The problem with an ``authorization_code`` token request, or None (the code is spent either way)."""
        if form.get("client_id") != self.client_id:
            return "invalid_client_id"
        if form.get("client_secret") not in (None, self.client_secret):
            return "invalid_client"
        found = self.auth_codes.pop(form.get("code", ""), None)
        if found is None:
            return "invalid_grant"
        redirect, challenge = found
        if form.get("redirect_uri") != redirect:
            return "redirect_uri_mismatch"
        if challenge:
            digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != challenge:
                return "invalid_grant"
        return None

    async def _token(self, request: web.Request, *, my_domain: bool) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.token_requests.append(form)
        grant = form.get("grant_type", "")
        refresh: str | None = None
        if grant == JWT_BEARER:
            problem = self._check_assertion(form.get("assertion", ""), request)
            if problem:
                return self._oauth_error("invalid_grant", problem)
        elif grant == "client_credentials":
            if not my_domain:
                return self._oauth_error("invalid_grant", "request not supported on this domain")
            if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
                return self._oauth_error("invalid_client", "invalid client credentials")
        elif grant == "refresh_token":
            if form.get("client_id") != self.client_id:
                return self._oauth_error("invalid_client_id", "client identifier invalid")
            if form.get("client_secret") not in (None, self.client_secret):
                return self._oauth_error("invalid_client", "invalid client credentials")
            old = form.get("refresh_token", "")
            if old not in self.refresh_tokens:
                return self._oauth_error("invalid_grant", "expired access/refresh token")
            if self.rotate_refresh_tokens:
                self.refresh_tokens.discard(old)
                refresh = self.issue_refresh_token()
        elif grant == "authorization_code":
            problem = self._code_grant(form)
            if problem:
                return self._oauth_error(problem, "authorization code invalid or expired, or a parameter differs")
            refresh = self.issue_refresh_token()
        else:
            return self._oauth_error("unsupported_grant_type", "grant type not supported")
        token = f"{self.org_id}!AR" + secrets.token_urlsafe(48)
        self.sessions[token] = Session(token, self.clock() + self.session_lifetime, grant)
        body: dict[str, Any] = {
            "access_token": token,
            "scope": "api",
            "instance_url": self.my_domain_url,
            "id": f"{self.login_url}/id/{self.org_id}/0055g00000FAKEUSER",
            "token_type": "Bearer",
            "issued_at": str(int(self.clock() * 1000)),
            "signature": secrets.token_urlsafe(32),
        }
        if refresh:
            body["refresh_token"] = refresh
        return web.json_response(body)

    def _check_assertion(self, assertion: str, request: web.Request) -> str | None:
        if not self.public_key_pem:
            return "no certificate uploaded for this app"
        try:
            claims = jwt.decode(
                assertion,
                self.public_key_pem,
                algorithms=["RS256"],
                # exp is checked below against this org's clock (tests move it), not the machine's.
                options={"require": ["iss", "sub", "aud", "exp"], "verify_aud": False, "verify_exp": False},
            )
        except jwt.InvalidTokenError:
            return "invalid assertion"
        if float(claims["exp"]) < self.clock():
            return "expired authorization code"  # what Salesforce answers for an expired assertion
        if claims["iss"] != self.client_id:
            return "invalid client credentials"
        if claims["sub"] != self.username:
            return "user hasn't approved this consumer"
        audiences = {self.login_url, self.my_domain_url, "https://login.salesforce.com", "https://test.salesforce.com"}
        if claims["aud"] not in audiences:
            return "audience is invalid"
        if float(claims["exp"]) > self.clock() + 300:
            return "expiration time is too far in the future"
        return None

    # --- the REST API ---------------------------------------------------------------------------

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if not request.path.startswith("/services/data/"):
            return await handler(request)  # type: ignore[no-any-return]
        self.requests.append((request.method, request.path_qs))
        opts = request.headers.get("Sforce-Call-Options", "")
        client = next((p.split("=", 1)[1] for p in opts.split(",") if p.strip().startswith("client=")), None)
        version = request.path.split("/")[3] if request.path.count("/") >= 3 else ""
        CHANGE_ORIGIN.set(f"com/salesforce/api/rest/{version.lstrip('v')};client={client}" if client else "")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            auth = request.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else ""
            sess = self.sessions.get(token)
            if sess is None or sess.expires_at <= self.clock():
                self.sessions.pop(token, None)
                return self._json(sf_error("INVALID_SESSION_ID", "Session expired or invalid"), 401, counted=False)
            if self.api_usage >= self.api_limit:
                return self._json(sf_error("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."), 403)
            self.api_usage += 1
            if self.faults:
                f = self.faults[0]
                f.remaining -= 1
                if f.remaining <= 0:
                    self.faults.pop(0)
                body = f.body if f.body is not None else sf_error("SERVER_ERROR", f"injected HTTP {f.status}")
                return self._json(body, f.status, headers=f.headers)
            resp: web.StreamResponse = await handler(request)
            resp.headers["Sforce-Limit-Info"] = f"api-usage={self.api_usage}/{self.api_limit}"
            return resp
        finally:
            self.in_flight -= 1

    def _json(
        self, body: Any, status: int = 200, *, counted: bool = True, headers: dict[str, str] | None = None
    ) -> web.Response:
        hdrs = dict(headers or {})
        if counted:
            hdrs["Sforce-Limit-Info"] = f"api-usage={self.api_usage}/{self.api_limit}"
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=hdrs)

    async def _versions(self, request: web.Request) -> web.Response:
        return self._json([{"version": v, "url": f"/services/data/v{v}"} for v in self.api_versions], counted=False)

    async def _api(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        if not version.startswith("v") or version[1:] not in self.api_versions:
            return self._json(sf_error("NOT_FOUND", "The requested resource does not exist"), 404)
        parts = [p for p in request.match_info["rest"].split("/") if p]
        m = request.method
        try:
            if parts[:1] in (["query"], ["queryAll"]):
                if len(parts) == 2:
                    return self._next_page(parts[1], version)
                return self._query(request.query.get("q", ""), version, all_rows=parts[0] == "queryAll")
            if parts[:2] == ["composite", "sobjects"]:
                if m == "PATCH" and len(parts) == 4:
                    return await self._collection_upsert(request, parts[2], parts[3], version)
                if m == "GET" and len(parts) == 3:
                    return self._collection_get(request, parts[2], version)
                if m == "DELETE" and len(parts) == 2:
                    return self._collection_delete(request)
            if parts[:1] == ["sobjects"] and len(parts) >= 2:
                sobject = parts[1]
                if len(parts) == 3 and parts[2] in ("updated", "deleted") and m == "GET":
                    return self._changed(request, sobject, parts[2])
                if len(parts) == 3 and parts[2] == "describe" and m == "GET":
                    return self._describe(sobject)
                if len(parts) == 3 and m == "GET":
                    return self._read(sobject, parts[2], version, request.query.get("fields"))
                if len(parts) == 3 and m == "DELETE":
                    return self._delete(sobject, parts[2])
                if len(parts) == 4 and m == "DELETE":
                    return self._delete_by_external_id(sobject, parts[2], parts[3], version)
                if len(parts) == 4 and m == "PATCH":
                    return await self._upsert_one(request, sobject, parts[2], parts[3], version)
        except SoqlError as e:
            return self._json(sf_error("MALFORMED_QUERY", str(e)), 400)
        return self._json(sf_error("NOT_FOUND", "The requested resource does not exist"), 404)

    def _shape(
        self, sobject: str, rec: dict[str, Any], version: str, fields: list[str] | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attributes": {"type": sobject, "url": f"/services/data/{version}/sobjects/{sobject}/{rec['Id']}"}
        }
        if fields is None:
            out.update(rec)
        else:
            for f in fields:
                out[f] = rec.get(f)
        return out

    def _read(self, sobject: str, rid: str, version: str, fields: str | None) -> web.Response:
        rec = self.records.get(sobject, {}).get(rid)
        if rec is None:
            if rid in self.recycle.get(sobject, {}):
                return self._json(sf_error("ENTITY_IS_DELETED", "entity is deleted"), 404)
            return self._json(sf_error("NOT_FOUND", "The requested resource does not exist"), 404)
        wanted = [f.strip() for f in fields.split(",")] if fields else None
        return self._json(self._shape(sobject, rec, version, wanted))

    def _describe(self, sobject: str) -> web.Response:
        names = dict.fromkeys(SYSTEM_FIELDS)
        for rec in self.records.get(sobject, {}).values():
            names.update(dict.fromkeys(rec))
        return self._json({"name": sobject, "fields": [{"name": n} for n in names]})

    def _delete(self, sobject: str, rid: str) -> web.Response:
        if rid not in self.records.get(sobject, {}):
            if rid in self.recycle.get(sobject, {}):
                return self._json(sf_error("ENTITY_IS_DELETED", "entity is deleted"), 404)
            return self._json(sf_error("NOT_FOUND", "The requested resource does not exist"), 404)
        self.delete(sobject, rid)
        return web.Response(status=204, headers={"Sforce-Limit-Info": f"api-usage={self.api_usage}/{self.api_limit}"})

    def _delete_by_external_id(self, sobject: str, ext_field: str, value: str, version: str) -> web.Response:
        matches = [r["Id"] for r in self.records.get(sobject, {}).values() if str(r.get(ext_field)) == value]
        if not matches:
            return self._json(
                sf_error("NOT_FOUND", "Provided external ID field does not exist or is not accessible: " + value), 404
            )
        if len(matches) > 1:
            return self._json([f"/services/data/{version}/sobjects/{sobject}/{rid}" for rid in matches], 300)
        return self._delete(sobject, matches[0])

    def _rule_error(self, sobject: str, rec: dict[str, Any]) -> tuple[str, str] | None:
        for rule in self.record_rules:
            err = rule(sobject, rec)
            if err:
                return err
        return None

    def _apply_upsert(self, sobject: str, ext_field: str, body: dict[str, Any]) -> dict[str, Any]:
        """One record's upsert; the UpsertResult shape (``statusCode`` in errors, as collections answer)."""
        value = body.get(ext_field)
        fields = {k: v for k, v in body.items() if k != "attributes"}
        bad = [k for k in fields if k in ("Id", "IsDeleted", "CreatedDate", "SystemModstamp", "LastModifiedDate")]
        if bad:
            return _failed("INVALID_FIELD_FOR_INSERT_UPDATE", f"Unable to create/update fields: {', '.join(bad)}", bad)
        if value in (None, ""):
            return _failed("MISSING_ARGUMENT", f"{ext_field} not specified", [ext_field])
        err = self._rule_error(sobject, fields)
        if err:
            return _failed(err[0], err[1], [])
        matches = [r for r in self.records.get(sobject, {}).values() if r.get(ext_field) == value]
        if len(matches) > 1:
            ids = ", ".join(r["Id"] for r in matches)
            return _failed(
                "DUPLICATE_EXTERNAL_ID",
                f"{ext_field}: more than one record found for external id field: [{ids}]",
                [ext_field],
                matches=[r["Id"] for r in matches],
            )
        if matches:
            rid = matches[0]["Id"]
            self.update(sobject, rid, **fields)
            return {"id": rid, "success": True, "errors": [], "created": False}
        rec = self.create(sobject, **fields)
        return {"id": rec["Id"], "success": True, "errors": [], "created": True}

    async def _json_body(self, request: web.Request) -> Any:
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return None

    async def _upsert_one(
        self, request: web.Request, sobject: str, ext_field: str, value: str, version: str
    ) -> web.Response:
        body = await self._json_body(request)
        if not isinstance(body, dict):
            return self._json(sf_error("JSON_PARSER_ERROR", "The request body is not a JSON object"), 400)
        if ext_field in body and body[ext_field] != value:
            return self._json(sf_error("INVALID_FIELD", f"{ext_field} in the body does not match the URL"), 400)
        res = self._apply_upsert(sobject, ext_field, {**body, ext_field: value})
        if res["success"]:
            return self._json(
                {"id": res["id"], "success": True, "errors": [], "created": res["created"]},
                201 if res["created"] else 200,
            )
        err = res["errors"][0]
        if err["statusCode"] == "DUPLICATE_EXTERNAL_ID":
            # Several records share the value: 300 Multiple Choices, the matching records' URLs, nothing changed.
            return self._json([f"/services/data/{version}/sobjects/{sobject}/{rid}" for rid in res["_matches"]], 300)
        return self._json(sf_error(err["statusCode"], err["message"], err["fields"]), 400)

    async def _collection_upsert(
        self, request: web.Request, sobject: str, ext_field: str, version: str
    ) -> web.Response:
        body = await self._json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            return self._json(sf_error("JSON_PARSER_ERROR", 'expected {"allOrNone": …, "records": [...]}'), 400)
        records = body["records"]
        if len(records) > 200:
            return self._json(
                sf_error(
                    "EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 200 records into this call"
                ),
                400,
            )
        for r in records:
            if not isinstance(r, dict) or (r.get("attributes") or {}).get("type") != sobject:
                return self._json(sf_error("INVALID_TYPE", f"every record needs attributes.type = {sobject}"), 400)
        all_or_none = bool(body.get("allOrNone", False))
        snapshot = ({k: dict(v) for k, v in self.records.get(sobject, {}).items()}, next(self._ids))
        results = [self._apply_upsert(sobject, ext_field, r) for r in records]
        if all_or_none and not all(r["success"] for r in results):
            self.records[sobject] = snapshot[0]
            results = [
                r
                if not r["success"]
                else _failed(
                    "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                    "Record rolled back because not all records were valid and the request was using AllOrNone header",
                    [],
                )
                for r in results
            ]
        for r in results:
            r.pop("_matches", None)
        return self._json(results)

    def _collection_get(self, request: web.Request, sobject: str, version: str) -> web.Response:
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        fields = [f for f in request.query.get("fields", "").split(",") if f]
        if not ids or not fields:
            return self._json(sf_error("MISSING_ARGUMENT", "ids and fields are required"), 400)
        if len(ids) > 2000:
            return self._json(sf_error("EXCEEDED_ID_LIMIT", "too many ids"), 400)
        out: list[Any] = []
        for rid in ids:
            rec = self.records.get(sobject, {}).get(rid)
            out.append(self._shape(sobject, rec, version, fields) if rec else None)
        return self._json(out)

    def _collection_delete(self, request: web.Request) -> web.Response:
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        if len(ids) > 200:
            return self._json(sf_error("EXCEEDED_ID_LIMIT", "cannot delete more than 200 records"), 400)
        out = []
        for rid in ids:
            sobject = next((s for s, recs in self.records.items() if rid in recs), None)
            if sobject is None:
                deleted = any(rid in b for b in self.recycle.values())
                code = "ENTITY_IS_DELETED" if deleted else "INVALID_CROSS_REFERENCE_KEY"
                out.append(_failed(code, "entity is deleted" if deleted else "invalid cross reference id", []))
            else:
                self.delete(sobject, rid)
                out.append({"id": rid, "success": True, "errors": []})
        return self._json(out)

    def _changed(self, request: web.Request, sobject: str, which: str) -> web.Response:
        try:
            start = parse_time(request.query["start"])
            end = parse_time(request.query["end"])
        except (KeyError, ValueError):
            return self._json(sf_error("MISSING_ARGUMENT", "start and end are required date-times"), 400)
        if end <= start:
            return self._json(sf_error("INVALID_REPLICATION_DATE", "end date must be after the start date"), 400)
        now = self.now()
        window = timedelta(days=30)
        if start < now - window:
            return self._json(sf_error("INVALID_REPLICATION_DATE", "start date cannot be more than 30 days ago"), 400)
        # Minute resolution: Salesforce truncates the seconds of both ends.
        start, end = start.replace(second=0, microsecond=0), min(end, now).replace(second=0, microsecond=0)
        latest = record_time(end)
        if which == "updated":
            ids = [
                r["Id"]
                for r in self.records.get(sobject, {}).values()
                if start <= parse_time(r["SystemModstamp"]) < end
            ]
            return self._json({"ids": ids, "latestDateCovered": latest})
        earliest = now - self.deleted_retention
        if self.purged_before is not None:
            earliest = max(earliest, self.purged_before)
        gone = [
            {"id": r["Id"], "deletedDate": r["SystemModstamp"]}
            for r in self.recycle.get(sobject, {}).values()
            if start <= parse_time(r["SystemModstamp"]) < end and parse_time(r["SystemModstamp"]) >= earliest
        ]
        return self._json(
            {"deletedRecords": gone, "earliestDateAvailable": record_time(earliest), "latestDateCovered": latest}
        )

    def _query(self, soql: str, version: str, *, all_rows: bool) -> web.Response:
        q = parse_soql(soql)
        live = list(self.records.get(q.sobject, {}).values())
        if all_rows:
            live += list(self.recycle.get(q.sobject, {}).values())
        rows = [r for r in live if q.matches(r)]
        for key, desc in reversed(q.order):
            rows.sort(key=lambda r, k=key: _sort_key(r.get(k)), reverse=desc)  # type: ignore[misc]
        if q.limit is not None:
            rows = rows[: q.limit]
        if q.fields == ["FIELDS(STANDARD)"]:
            shaped = [self._shape(q.sobject, r, version, [f for f in r if not f.endswith("__c")]) for r in rows]
        else:
            shaped = [self._shape(q.sobject, r, version, q.fields) for r in rows]
        return self._page(shaped, 0, version)

    def _page(self, rows: list[dict[str, Any]], start: int, version: str, locator: str | None = None) -> web.Response:
        page = rows[start : start + self.page_size]
        done = start + len(page) >= len(rows)
        body: dict[str, Any] = {"totalSize": len(rows), "done": done, "records": page}
        if not done:
            locator = locator or ("01g5g" + secrets.token_hex(6))
            nxt = start + len(page)
            self._locators[f"{locator}-{nxt}"] = (rows, nxt, self.clock() + self.locator_lifetime)
            body["nextRecordsUrl"] = f"/services/data/{version}/query/{locator}-{nxt}"
        return self._json(body)

    def _next_page(self, locator: str, version: str) -> web.Response:
        entry = self._locators.pop(locator, None)
        if entry is None or entry[2] < self.clock():
            return self._json(sf_error("INVALID_QUERY_LOCATOR", "invalid query locator"), 400)
        rows, start, _ = entry
        return self._page(rows, start, version, locator.rsplit("-", 1)[0])


def _failed(code: str, message: str, fields: list[str], matches: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": None,
        "success": False,
        "errors": [{"statusCode": code, "message": message, "fields": fields}],
    }
    if matches is not None:
        out["_matches"] = matches
    return out


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, "") if v is None else (1, v if not isinstance(v, bool) else int(v))


# --- a SOQL subset ------------------------------------------------------------------------------


class SoqlError(ValueError):
    """A query the fake (and Salesforce) would refuse as MALFORMED_QUERY."""


_SOQL = re.compile(
    r"^\s*SELECT\s+(?P<fields>.+?)\s+FROM\s+(?P<sobject>\w+)"
    r"(?:\s+WHERE\s+(?P<where>.+?))?(?:\s+ORDER\s+BY\s+(?P<order>.+?))?(?:\s+LIMIT\s+(?P<limit>\d+))?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_COND = re.compile(r"^\s*(\w+)\s*(=|!=|>=|<=|>|<|\s+IN\s+|\s+NOT\s+IN\s+)\s*(.+?)\s*$", re.IGNORECASE | re.DOTALL)
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})$")


@dataclass
class Soql:
    fields: list[str]
    sobject: str
    conds: list[tuple[str, str, Any]]
    order: list[tuple[str, bool]]
    limit: int | None

    def matches(self, rec: dict[str, Any]) -> bool:
        for fname, op, value in self.conds:
            have = rec.get(fname)
            if isinstance(value, datetime):
                have = parse_time(have) if isinstance(have, str) else None
            if op == "in":
                if have not in value:
                    return False
                continue
            if op == "not in":
                if have in value:
                    return False
                continue
            if op == "=":
                ok = have == value
            elif op == "!=":
                ok = have != value
            elif have is None or value is None:
                ok = False
            else:
                ok = {">": have > value, ">=": have >= value, "<": have < value, "<=": have <= value}[op]
            if not ok:
                return False
        return True


def _literal(text: str) -> Any:
    t = text.strip()
    if t.startswith("'") and t.endswith("'") and len(t) >= 2:
        return t[1:-1].replace("\\'", "'").replace("\\\\", "\\")
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    if _DATETIME.match(t):
        return parse_time(t)
    try:
        return float(t) if "." in t else int(t)
    except ValueError:
        raise SoqlError(f"unexpected token: {t!r}") from None


def parse_soql(soql: str) -> Soql:
    m = _SOQL.match(soql)
    if not m:
        raise SoqlError(f"unexpected query: {soql[:200]!r}")
    fields = [f.strip() for f in m.group("fields").split(",") if f.strip()]
    conds: list[tuple[str, str, Any]] = []
    if m.group("where"):
        for part in re.split(r"\s+AND\s+", m.group("where"), flags=re.IGNORECASE):
            c = _COND.match(part)
            if not c:
                raise SoqlError(f"cannot read condition {part!r}")
            op = " ".join(c.group(2).lower().split())
            if op in ("in", "not in"):
                inner = c.group(3).strip()
                if not (inner.startswith("(") and inner.endswith(")")):
                    raise SoqlError(f"IN needs a parenthesised list: {part!r}")
                values = [_literal(v) for v in inner[1:-1].split(",") if v.strip()]
                conds.append((c.group(1), op, values))
            else:
                conds.append((c.group(1), op, _literal(c.group(3))))
    order: list[tuple[str, bool]] = []
    if m.group("order"):
        for part in m.group("order").split(","):
            words = part.split()
            order.append((words[0], len(words) > 1 and words[1].upper() == "DESC"))
    limit = int(m.group("limit")) if m.group("limit") else None
    if fields in (["FIELDS(ALL)"], ["FIELDS(CUSTOM)"]) and (limit is None or limit > 200):
        raise SoqlError("The SOQL FIELDS function must have a LIMIT of at most 200")
    return Soql(fields, m.group("sobject"), conds, order, limit)
