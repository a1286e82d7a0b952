"""A local QuickBooks Online that behaves like the documented API, for tests and the demo.

Follows /work/shared/reference/third-party-apis.md (QuickBooks section) and Intuit's docs:
- OAuth 2.0 token endpoint with Basic client auth, 1-hour access tokens and a refresh token
  that rotates on every refresh (the old one stops working), plus an authorize endpoint
  that redirects with ``code``, ``state`` and ``realmId``
  (https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/oauth-2.0);
- webhooks signed with ``intuit-signature`` = base64 HMAC-SHA256(verifier token, body), in the
  legacy ``eventNotifications`` shape or as a CloudEvents array;
- read, query (``STARTPOSITION``/``MAXRESULTS`` ≤ 1000, ``ORDERBY MetaData.LastUpdatedTime``),
  CDC (30-day look-back, 1,000 objects per response, deleted stubs);
- create / sparse update with ``SyncToken`` (stale → 400 Fault 5010), ``requestid`` replay,
  ``minorversion`` ≥ 75;
- 500 requests/min and 10/s per realm, 429 with a Fault body when exceeded
  (https://developer.intuit.com/app/developer/qbo/docs/learn/limits-and-throttles), and
  injectable faults (a Fault inside HTTP 200, 5xx).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
from aiohttp import web

from ._time import parse_time, qbo_time

ENTITIES = ("Customer", "Invoice", "Item", "Payment", "Vendor", "Estimate")
# Name-list entities are deactivated, not deleted; a query leaves inactive ones out unless it filters
# on Active (Intuit: "By default, inactive objects are not returned by queries … add `Active IN (true,
# false)`"; Accounting API, Customer / Item / Vendor "Query" notes). Transactions have no Active field.
HAS_ACTIVE = ("Customer", "Item", "Vendor")
VERBS = {
    "Create": "created",
    "Update": "updated",
    "Delete": "deleted",
    "Merge": "merged",
    "Void": "voided",
    "Emailed": "emailed",
}


def sign(verifier_token: str, body: bytes) -> str:
    """``intuit-signature``: base64 HMAC-SHA256 of the raw body keyed with the verifier token."""
    return base64.b64encode(hmac.new(verifier_token.encode(), body, hashlib.sha256).digest()).decode()


def fault(
    code: str, message: str, kind: str = "ValidationFault", detail: str = "", element: str = ""
) -> dict[str, Any]:
    err: dict[str, Any] = {"Message": message, "Detail": detail or message, "code": code}
    if element:
        err["element"] = element
    return {"Fault": {"Error": [err], "type": kind}}


@dataclass
class Change:
    """One change a webhook will announce."""

    realm: str
    entity: str
    id: str
    operation: str
    last_updated: datetime
    merged_id: str | None = None


@dataclass
class Realm:
    objects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    deleted: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    next_id: int = 1
    sent: deque[float] = field(default_factory=deque)
    replies: dict[str, tuple[int, bytes]] = field(default_factory=dict)


class FakeQuickBooks:
    """In-process fake of the QuickBooks Online Accounting API; ``await start()`` gives its base URL."""

    def __init__(
        self,
        *,
        client_id: str = "fake-client-id",
        client_secret: str = "fake-client-secret",
        verifier_token: str = "fake-verifier-token",
        realm_id: str = "9130350000000001",
        per_second: int = 10,
        per_minute: int = 500,
        access_ttl: float = 3600.0,
        refresh_ttl: float = 8726400.0,
        max_page: int = 1000,
        clock: Callable[[], float] = time.time,
    ):
        self.client_id = client_id
        self.client_secret = client_secret
        self.verifier_token = verifier_token
        self.realm_id = realm_id
        self.per_second = per_second
        self.per_minute = per_minute
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.max_page = max_page
        self._clock = clock
        self.offset = 0.0
        self.realms: dict[str, Realm] = {realm_id: Realm()}
        self.access_tokens: dict[str, float] = {}
        self.refresh_tokens: dict[str, float] = {}
        self.codes: dict[str, str] = {}
        self.pending: list[Change] = []
        self.webhook_url: str | None = None
        self.webhook_format = "legacy"
        self.auto_webhooks = False
        self.injected: deque[tuple[int, Any, dict[str, str]]] = deque()
        self.requests: list[tuple[float, str, str]] = []
        self.throttled = 0
        self.refreshes = 0
        self.webhook_statuses: list[int] = []
        self.latency = 0.0  # seconds every read/query waits before answering (a slow API)
        self.failing: tuple[int, dict[str, str]] | None = None
        self._seq = itertools.count()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- control ------------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock() + self.offset

    def advance(self, seconds: float) -> None:
        """Move the fake's clock: tokens expire, CDC windows close."""
        self.offset += seconds

    def issue_refresh_token(self) -> str:
        """A refresh token as the authorization-code exchange would give (for bootstrapping tests)."""
        token = "RT1-" + secrets.token_hex(16)
        self.refresh_tokens[token] = self.now() + self.refresh_ttl
        return token

    def _stamp(self) -> datetime:
        return datetime.fromtimestamp(int(self.now()), UTC)

    def _realm(self, realm: str | None) -> Realm:
        return self.realms.setdefault(realm or self.realm_id, Realm())

    def create(self, entity: str, body: dict[str, Any], realm: str | None = None) -> dict[str, Any]:
        """Create an object as a QuickBooks user would (announced by the next webhook)."""
        r = self._realm(realm)
        stamp = self._stamp()
        obj = {
            **body,
            "Id": str(r.next_id),
            "SyncToken": "0",
            "domain": "QBO",
            "sparse": False,
            "MetaData": {"CreateTime": qbo_time(stamp), "LastUpdatedTime": qbo_time(stamp)},
        }
        if entity in HAS_ACTIVE:
            obj.setdefault("Active", True)
        r.next_id += 1
        obj["_seq"] = next(self._seq)
        r.objects.setdefault(entity, {})[obj["Id"]] = obj
        self.pending.append(Change(realm or self.realm_id, entity, obj["Id"], "Create", stamp))
        return self._public(obj)

    def update(self, entity: str, id_: str, fields: dict[str, Any], realm: str | None = None) -> dict[str, Any]:
        """Change fields as a QuickBooks user would; bumps SyncToken and LastUpdatedTime."""
        r = self._realm(realm)
        obj = r.objects[entity][id_]
        stamp = self._stamp()
        obj.update(fields)
        obj["SyncToken"] = str(int(obj["SyncToken"]) + 1)
        obj["MetaData"] = {**obj["MetaData"], "LastUpdatedTime": qbo_time(stamp)}
        obj["_seq"] = next(self._seq)
        self.pending.append(Change(realm or self.realm_id, entity, id_, "Update", stamp))
        return self._public(obj)

    def delete(self, entity: str, id_: str, realm: str | None = None) -> None:
        """Delete an object (invoices, payments; customers are only deactivated in real QuickBooks)."""
        r = self._realm(realm)
        r.objects[entity].pop(id_)
        stamp = self._stamp()
        r.deleted.setdefault(entity, {})[id_] = {
            "Id": id_,
            "status": "Deleted",
            "domain": "QBO",
            "MetaData": {"LastUpdatedTime": qbo_time(stamp)},
            "_seq": next(self._seq),
        }
        self.pending.append(Change(realm or self.realm_id, entity, id_, "Delete", stamp))

    def get(self, entity: str, id_: str, realm: str | None = None) -> dict[str, Any] | None:
        obj = self._realm(realm).objects.get(entity, {}).get(id_)
        return None if obj is None else self._public(obj)

    def all(self, entity: str, realm: str | None = None) -> list[dict[str, Any]]:
        return [self._public(o) for o in self._realm(realm).objects.get(entity, {}).values()]

    def fail_with(self, status: int | None, headers: dict[str, str] | None = None) -> None:
        """Every API request (not OAuth) answers ``status`` with Intuit's Fault body for it, until ``fail_with(None)``."""
        self.failing = None if status is None else (status, dict(headers or {}))

    def _failure(self, status: int, headers: dict[str, str]) -> web.Response:
        if status == 429:
            body = fault("3001", "message=ThrottleExceeded; errorCode=003001; statusCode=429", "ThrottleExceeded")
        elif status == 401:
            body = fault(
                "3200", "message=AuthenticationFailed; errorCode=003200; statusCode=401", "AuthenticationFault"
            )
        elif status == 403:
            body = fault("120", "Authorization Failure", "AuthorizationFault")
        elif status >= 500:
            body = fault("10000", "An application error has occurred while processing your request", "SystemFault")
        else:
            body = fault("2010", "Request has invalid or unsupported property", "ValidationFault")
        return self._json(status, body, headers)

    def inject(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        """The next API request (not OAuth) answers this instead, e.g. a Fault inside HTTP 200."""
        self.injected.append((status, body, headers or {}))

    @staticmethod
    def _public(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    # --- webhooks -----------------------------------------------------------------------------

    def webhook_body(self, changes: list[Change], fmt: str | None = None) -> bytes:
        """The body Intuit would POST for these changes, in the legacy or the CloudEvents format."""
        fmt = fmt or self.webhook_format
        if fmt == "cloudevents":
            out = []
            for c in changes:
                ce: dict[str, Any] = {
                    "specversion": "1.0",
                    "id": str(uuid.uuid4()),
                    "source": "intuit.dsnBgbseACLLRZNxo2dfc4evmEJdxde58xeeYcZliOU=",
                    "type": f"qbo.{c.entity.lower()}.{VERBS[c.operation]}.v1",
                    "datacontenttype": "application/json",
                    "time": c.last_updated.strftime("%Y-%m-%dT%H:%M:%S.000000000Z"),
                    "intuitentityid": c.id,
                    "intuitaccountid": c.realm,
                    "data": {},
                }
                if c.merged_id:
                    ce["data"] = {"deletedId": c.merged_id}
                out.append(ce)
            return orjson.dumps(out)
        by_realm: dict[str, list[dict[str, Any]]] = {}
        for c in changes:
            ent: dict[str, Any] = {
                "name": c.entity,
                "id": c.id,
                "operation": c.operation,
                # As in Intuit's sample: local offset without a colon, e.g. 2015-10-05T14:42:19-0700.
                "lastUpdated": c.last_updated.astimezone(timezone(timedelta(hours=-7))).strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            if c.merged_id:
                ent["deletedId"] = c.merged_id
            by_realm.setdefault(c.realm, []).append(ent)
        return orjson.dumps(
            {
                "eventNotifications": [
                    {"realmId": realm, "dataChangeEvent": {"entities": ents}} for realm, ents in by_realm.items()
                ]
            }
        )

    def webhook_headers(self, body: bytes, fmt: str | None = None) -> dict[str, str]:
        fmt = fmt or self.webhook_format
        return {
            "Content-Type": "application/cloudevents-batch+json" if fmt == "cloudevents" else "application/json",
            "intuit-signature": sign(self.verifier_token, body),
            "intuit-t-id": str(uuid.uuid4()),
            "intuit-created-time": datetime.fromtimestamp(self.now(), UTC).isoformat(),
            "intuit-notification-schema-version": "1.0" if fmt == "cloudevents" else "0.9",
        }

    async def flush_webhooks(self, *, drop: bool = False, fmt: str | None = None) -> int | None:
        """POST the pending changes to ``webhook_url`` as one signed delivery (``drop``: lose them, as can happen)."""
        changes, self.pending = self.pending, []
        if drop or not changes or not self.webhook_url:
            return None
        body = self.webhook_body(changes, fmt)
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.post(self.webhook_url, data=body, headers=self.webhook_headers(body, fmt)) as resp,
        ):
            self.webhook_statuses.append(resp.status)
            if resp.status != 200:
                self.pending[:0] = changes  # Intuit retries a delivery that was not acknowledged
            return resp.status

    # --- server -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth2/v1/tokens/bearer", self._token)
        app.router.add_get("/connect/oauth2", self._authorize)
        app.router.add_get("/v3/company/{realm}/query", self._query)
        app.router.add_get("/v3/company/{realm}/cdc", self._cdc)
        app.router.add_get("/v3/company/{realm}/{entity}/{id}", self._read)
        app.router.add_post("/v3/company/{realm}/{entity}", self._write)
        app.router.add_post("/_fake/{entity}", self._ui_create)
        return app

    async def start(self, port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None
        sock = server.sockets[0]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
        h = {"intuit_tid": "1-" + secrets.token_hex(12), **(headers or {})}
        if isinstance(body, dict) and "time" not in body:
            body = {**body, "time": qbo_time(datetime.fromtimestamp(self.now(), UTC))}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=h)

    # OAuth

    async def _authorize(self, request: web.Request) -> web.Response:
        q = request.query
        if q.get("client_id") != self.client_id or q.get("response_type") != "code" or not q.get("redirect_uri"):
            return web.Response(status=400, text="invalid_request")
        code = "AB" + secrets.token_hex(12)
        self.codes[code] = q["redirect_uri"]
        params = {"code": code, "state": q.get("state", ""), "realmId": self.realm_id}
        raise web.HTTPFound(q["redirect_uri"] + "?" + urlencode(params))

    async def _token(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if not hmac.compare_digest(request.headers.get("Authorization", ""), expected):
            return web.json_response({"error": "invalid_client"}, status=401)
        form = await request.post()
        grant = form.get("grant_type")
        if grant == "authorization_code":
            code = str(form.get("code", ""))
            if self.codes.pop(code, None) != form.get("redirect_uri"):
                return web.json_response({"error": "invalid_grant"}, status=400)
        elif grant == "refresh_token":
            old = str(form.get("refresh_token", ""))
            exp = self.refresh_tokens.pop(old, None)  # rotation: the old value is spent
            if exp is None or exp < self.now():
                return web.json_response({"error": "invalid_grant"}, status=400)
            self.refreshes += 1
        else:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        access = "eyJ-" + secrets.token_hex(24)
        self.access_tokens[access] = self.now() + self.access_ttl
        refresh = self.issue_refresh_token()
        return web.json_response(
            {
                "token_type": "bearer",
                "access_token": access,
                "refresh_token": refresh,
                "expires_in": int(self.access_ttl),
                "x_refresh_token_expires_in": int(self.refresh_ttl),
            }
        )

    # API gate: auth, minorversion, rate limits, injected answers

    def _gate(self, request: web.Request) -> tuple[Realm, web.Response | None]:
        realm_id = request.match_info["realm"]
        r = self._realm(realm_id)
        now = self.now()
        self.requests.append((now, request.method, request.path))
        if self.failing is not None:
            return r, self._failure(*self.failing)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        exp = self.access_tokens.get(token)
        if not auth.startswith("Bearer ") or exp is None or exp < now:
            body = fault(
                "3200",
                "message=AuthenticationFailed; errorCode=003200; statusCode=401",
                "AuthenticationFault",
                "Token expired" if exp is not None else "Authentication failed",
            )
            return r, self._json(401, body)
        # Sliding windows per realm, as documented: 10 per second and 500 per minute.
        while r.sent and r.sent[0] <= now - 60:
            r.sent.popleft()
        last_second = sum(1 for t in r.sent if t > now - 1)
        if last_second >= self.per_second or len(r.sent) >= self.per_minute:
            self.throttled += 1
            body = fault(
                "3001",
                "message=ThrottleExceeded; errorCode=003001; statusCode=429",
                "ThrottleExceeded",
                "The request limit was reached. Please wait 60 seconds and retry.",
            )
            return r, self._json(429, body)
        r.sent.append(now)
        mv = request.query.get("minorversion")
        if mv is None or not mv.isdigit() or int(mv) < 75:
            return r, self._json(
                400, fault("2010", "Invalid minorversion", detail="minorversion 1-74 is no longer supported; use 75+")
            )
        if self.injected:
            status, body, headers = self.injected.popleft()
            return r, self._json(status, body, headers)
        return r, None

    # read / query / cdc

    async def _read(self, request: web.Request) -> web.Response:
        r, refused = self._gate(request)
        if refused:
            return refused
        entity = _entity_name(request.match_info["entity"])
        obj = r.objects.get(entity, {}).get(request.match_info["id"])
        if obj is None:
            return self._json(
                400, fault("610", "Object Not Found", detail="Something you're trying to use has been made inactive.")
            )
        return self._json(200, {entity: self._public(obj)})

    async def _query(self, request: web.Request) -> web.Response:
        r, refused = self._gate(request)
        if self.latency:
            await asyncio.sleep(self.latency)
        if refused:
            return refused
        try:
            entity, preds, order, start, maxres = _parse_query(request.query.get("query", ""))
        except ValueError as e:
            return self._json(400, fault("4000", "Error parsing query", "QueryValidationError", str(e)))
        if _mentions_active(request.query.get("query", "")) and entity not in HAS_ACTIVE:
            return self._json(
                400, fault("4001", "Invalid query", "QueryValidationError", f"property Active not found for {entity}")
            )
        rows = [o for o in r.objects.get(entity, {}).values() if all(p(o) for p in preds)]
        if entity in HAS_ACTIVE and not _mentions_active(request.query.get("query", "")):
            rows = [o for o in rows if o.get("Active", True) is not False]
        if order:
            rows.sort(key=lambda o: (parse_time(o["MetaData"]["LastUpdatedTime"]), o["_seq"]))
        else:
            rows.sort(key=lambda o: int(o["Id"]))
        maxres = min(maxres, self.max_page)
        page = rows[start - 1 : start - 1 + maxres]
        qr: dict[str, Any] = {}
        if page:
            qr = {entity: [self._public(o) for o in page], "startPosition": start, "maxResults": len(page)}
        return self._json(200, {"QueryResponse": qr})

    async def _cdc(self, request: web.Request) -> web.Response:
        r, refused = self._gate(request)
        if refused:
            return refused
        entities = [_entity_name(e) for e in request.query.get("entities", "").split(",") if e]
        since_raw = request.query.get("changedSince", "")
        try:
            since = parse_time(since_raw)
        except ValueError:
            return self._json(400, fault("2010", "Invalid changedSince", detail=f"cannot parse {since_raw!r}"))
        now = datetime.fromtimestamp(self.now(), UTC)
        if since < now - timedelta(days=30):
            return self._json(
                400, fault("2010", "Invalid changedSince", detail="changedSince must be within the last 30 days")
            )
        if not entities:
            return self._json(400, fault("2010", "Invalid entities", detail="entities is required"))
        responses: list[dict[str, Any]] = []
        budget = self.max_page
        for entity in entities:
            objs = [
                o
                for o in [*r.objects.get(entity, {}).values(), *r.deleted.get(entity, {}).values()]
                if parse_time(o["MetaData"]["LastUpdatedTime"]) >= since
            ]
            objs.sort(key=lambda o: (parse_time(o["MetaData"]["LastUpdatedTime"]), o["_seq"]))
            objs = objs[: max(0, budget)]
            budget -= len(objs)
            if objs:
                responses.append({entity: [self._public(o) for o in objs], "startPosition": 1, "maxResults": len(objs)})
            else:
                responses.append({})
        return self._json(200, {"CDCResponse": [{"QueryResponse": responses}]})

    # writes

    async def _write(self, request: web.Request) -> web.Response:
        r, refused = self._gate(request)
        if refused:
            return refused
        rid = request.query.get("requestid")
        if rid and rid in r.replies:
            status, raw = r.replies[rid]  # same requestid: the first answer again, nothing done twice
            return web.Response(status=status, body=raw, content_type="application/json")
        body = await self._do_write(r, request.match_info["realm"], _entity_name(request.match_info["entity"]), request)
        if rid:
            assert isinstance(body.body, bytes)
            r.replies[rid] = (body.status, body.body)
        return body

    async def _do_write(self, r: Realm, realm: str, entity: str, request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._json(400, fault("2500", "Invalid Request", detail="Request has invalid or unsupported JSON"))
        if not isinstance(data, dict):
            return self._json(400, fault("2500", "Invalid Request", detail="body must be an object"))
        table = r.objects.setdefault(entity, {})
        if "Id" not in data:
            if entity == "Customer":
                name = data.get("DisplayName")
                if not name:
                    return self._json(400, fault("2020", "Required param missing", element="DisplayName"))
                if any(o.get("DisplayName") == name for o in table.values()):
                    return self._json(
                        400,
                        fault(
                            "6240", "Duplicate Name Exists Error", detail=f"The name supplied already exists. : {name}"
                        ),
                    )
            data.pop("SyncToken", None)
            data.pop("sparse", None)
            obj = self.create(entity, data, realm)
            return self._json(200, {entity: obj})
        obj_ = table.get(str(data["Id"]))
        if obj_ is None:
            return self._json(400, fault("610", "Object Not Found", detail=f"{entity} {data['Id']} not found"))
        if str(data.get("SyncToken")) != obj_["SyncToken"]:
            return self._json(
                400,
                fault(
                    "5010",
                    "Stale Object Error",
                    detail="Stale Object Error : You and root were working on this at the same time. "
                    "root finished before you did, so your work was not saved.",
                ),
            )
        fields = {k: v for k, v in data.items() if k not in ("Id", "SyncToken", "sparse", "MetaData", "domain")}
        if not data.get("sparse"):
            keep = {"Id", "SyncToken", "MetaData", "domain", "_seq", "sparse"}
            for k in [k for k in obj_ if k not in keep]:
                obj_.pop(k)
        return self._json(200, {entity: self.update(entity, obj_["Id"], fields, realm)})

    async def _ui_create(self, request: web.Request) -> web.Response:
        """Not a QuickBooks endpoint: the demo's stand-in for a user creating an object in the QuickBooks UI."""
        entity = _entity_name(request.match_info["entity"])
        obj = self.create(entity, orjson.loads(await request.read()))
        if self.auto_webhooks:
            await self.flush_webhooks()
        return self._json(200, {entity: obj})


def _entity_name(raw: str) -> str:
    for e in ENTITIES:
        if e.lower() == raw.lower():
            return e
    return raw[:1].upper() + raw[1:]


_QUERY = re.compile(
    r"^\s*select\s+\*\s+from\s+(?P<entity>\w+)"
    r"(?:\s+where\s+(?P<where>.+?))?"
    r"(?:\s+orderby\s+(?P<order>[\w.]+)(?:\s+(?:asc|desc))?)?"
    r"(?:\s+startposition\s+(?P<start>\d+))?"
    r"(?:\s+maxresults\s+(?P<max>\d+))?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_COND = re.compile(r"^\s*(?P<field>[\w.]+)\s*(?P<op>>=|<=|=|>|<|\s+in\s+)\s*(?P<value>.+?)\s*$", re.IGNORECASE)


def _field(obj: dict[str, Any], path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def _scalar(v: Any) -> str:
    """Email and phone fields are objects; the query language compares their main value."""
    if isinstance(v, dict):
        v = v.get("Address", v.get("FreeFormNumber"))
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _mentions_active(q: str) -> bool:
    return re.search(r"\bwhere\b.*\bActive\b", q, re.IGNORECASE | re.DOTALL) is not None


def _literal(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1].replace("\\'", "'")
    if raw.lower() in ("true", "false"):
        return raw.lower()  # booleans are unquoted; compared as Python's str() lowercased below
    raise ValueError(f"expected a quoted value, got {raw}")


def _parse_query(q: str) -> tuple[str, list[Callable[[dict[str, Any]], bool]], str | None, int, int]:
    """The subset of Intuit's SQL-like query language the connector uses (fields, =, >, >=, <, <=, IN)."""
    m = _QUERY.match(q)
    if not m:
        raise ValueError(f"cannot parse query: {q!r}")
    entity = _entity_name(m["entity"])
    preds: list[Callable[[dict[str, Any]], bool]] = []
    if m["where"]:
        for cond in re.split(r"\s+and\s+", m["where"], flags=re.IGNORECASE):
            c = _COND.match(cond)
            if not c:
                raise ValueError(f"cannot parse condition {cond!r}")
            path, op = c["field"], c["op"].strip().lower()
            if op == "in":
                values = {_literal(v) for v in c["value"].strip().strip("()").split(",")}
                preds.append(lambda o, p=path, vs=values: _scalar(_field(o, p)) in vs)  # type: ignore[misc]
                continue
            value = _literal(c["value"])
            if path.endswith("Time"):
                ref = parse_time(value)

                def cmp(o: dict[str, Any], p: str = path, op: str = op, ref: datetime = ref) -> bool:
                    v = _field(o, p)
                    if v is None:
                        return False
                    t = parse_time(v)
                    return {"=": t == ref, ">": t > ref, ">=": t >= ref, "<": t < ref, "<=": t <= ref}[op]

                preds.append(cmp)
            elif op == "=":
                preds.append(lambda o, p=path, v=value: _scalar(_field(o, p)) == v)  # type: ignore[misc]
            else:
                raise ValueError(f"operator {op} is only supported on time fields here")
    start = int(m["start"] or 1)
    maxres = int(m["max"] or 100)
    if start < 1 or maxres < 1 or maxres > 1000:
        raise ValueError("STARTPOSITION must be ≥ 1 and MAXRESULTS between 1 and 1000")
    return entity, preds, m["order"], start, maxres
