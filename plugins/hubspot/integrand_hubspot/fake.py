"""A local HubSpot that behaves like the documented CRM v3 API, for tests and the demo.

Follows /work/shared/reference/third-party-apis.md (HubSpot section):
- private-app tokens (``pat-…``) and OAuth access tokens from ``POST /oauth/v1/token`` that expire;
- ``POST /crm/v3/objects/{type}/search`` with filters on ``lastmodifieddate`` /
  ``hs_lastmodifieddate``, ascending sorts, at most 200 per page, and 400 past 10,000 results;
- ``batch/upsert`` by an id property (≤ 100 inputs, duplicate ids refused) and ``batch/read``;
- rolling 10-second limits with ``X-HubSpot-RateLimit-*`` headers (not on search), a separate
  search limit, and 429 bodies with ``policyName``;
- webhooks as a JSON array signed with v3 (and v1/v2 headers on request).
"""

from __future__ import annotations

import hmac
import itertools
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from . import signing
from .objects import iso_ms, modified_property, to_ms


class FakeHubSpot:
    """In-process fake of HubSpot's CRM API; ``await start()`` gives its base URL."""

    def __init__(
        self,
        *,
        private_token: str = "pat-na1-fake-token",
        client_id: str = "fake-hubspot-client",
        client_secret: str = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy",
        portal_id: int = 62515,
        per_ten_seconds: int = 100,
        search_per_second: int = 5,
        daily: int = 250_000,
        search_cap: int = 10_000,
        access_ttl: float = 1800.0,
        clock: Callable[[], float] = time.time,
    ):
        self.private_token = private_token
        self.client_id = client_id
        self.client_secret = client_secret
        self.portal_id = portal_id
        self.per_ten_seconds = per_ten_seconds
        self.search_per_second = search_per_second
        self.daily = daily
        self.search_cap = search_cap
        self.access_ttl = access_ttl
        self._clock = clock
        self.offset = 0.0
        self.objects: dict[str, dict[str, dict[str, Any]]] = {}
        self.access_tokens: dict[str, float] = {}
        self.refresh_tokens: set[str] = set()
        self._ids = itertools.count(101)
        self._ms = 0
        self._sent: deque[float] = deque()
        self._searches: deque[float] = deque()
        self.used_today = 0
        self.requests: list[tuple[float, str, str]] = []
        self.throttled: list[str] = []
        self.batch_sizes: list[int] = []
        self.pending: list[dict[str, Any]] = []
        self.webhook_url: str | None = None
        self.webhook_statuses: list[int] = []
        self.failing: tuple[int, dict[str, str]] | None = None
        self._event_ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- control ------------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def _stamp(self) -> int:
        """A strictly increasing millisecond timestamp, so search order is deterministic."""
        self._ms = max(self._ms + 1, int(self.now() * 1000))
        return self._ms

    def fail_with(self, status: int | None, headers: dict[str, str] | None = None) -> None:
        """Every API request (not OAuth) answers ``status`` with HubSpot's error body for it, until ``fail_with(None)``."""
        self.failing = None if status is None else (status, dict(headers or {}))

    def _failure(self, status: int, headers: dict[str, str]) -> web.Response:
        extra: dict[str, Any] = {}
        if status == 429:
            msg, cat = "You have reached your ten_secondly_rolling limit.", "RATE_LIMITS"
            extra = {"errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING"}
        elif status == 401:
            msg, cat = "Authentication credentials not found.", "INVALID_AUTHENTICATION"
        elif status >= 500:
            msg, cat = "internal error", "INTERNAL_ERROR"
        else:
            msg, cat = "Invalid input JSON", "VALIDATION_ERROR"
        resp = self._error(status, msg, cat, **extra)
        resp.headers.update(headers)
        return resp

    def issue_refresh_token(self) -> str:
        token = secrets.token_hex(16)
        self.refresh_tokens.add(token)
        return token

    def put(self, object_type: str, properties: dict[str, Any], at_ms: int | None = None) -> dict[str, Any]:
        """Create an object as a HubSpot user would (queued for the next webhook)."""
        ms = at_ms if at_ms is not None else self._stamp()
        oid = str(next(self._ids))
        props = {k: None if v is None else str(v) for k, v in properties.items()}
        props.update({"hs_object_id": oid, "createdate": iso_ms(ms), modified_property(object_type): iso_ms(ms)})
        obj = {"id": oid, "properties": props, "createdAt": iso_ms(ms), "updatedAt": iso_ms(ms), "archived": False}
        self.objects.setdefault(object_type, {})[oid] = obj
        self._announce(object_type, oid, "creation", ms)
        return obj

    def edit(self, object_type: str, oid: str, properties: dict[str, Any]) -> dict[str, Any]:
        obj = self.objects[object_type][oid]
        ms = self._stamp()
        for k, v in properties.items():
            obj["properties"][k] = None if v is None else str(v)
            self._announce(object_type, oid, "propertyChange", ms, k, v)
        obj["properties"][modified_property(object_type)] = iso_ms(ms)
        obj["updatedAt"] = iso_ms(ms)
        return obj

    def find(self, object_type: str, prop: str, value: str) -> dict[str, Any] | None:
        """The live (not archived) object whose ``prop`` is ``value``."""
        for obj in self.objects.get(object_type, {}).values():
            if obj["properties"].get(prop) == value and not obj["archived"]:
                return obj
        return None

    def _announce(
        self, object_type: str, oid: str, kind: str, ms: int, prop: str | None = None, value: Any = None
    ) -> None:
        singular = object_type[:-1] if object_type.endswith("s") else object_type
        if object_type == "companies":
            singular = "company"
        ev: dict[str, Any] = {
            "eventId": next(self._event_ids),
            "subscriptionId": 12345,
            "portalId": self.portal_id,
            "appId": 54321,
            "occurredAt": ms,
            "subscriptionType": f"{singular}.{kind}",
            "attemptNumber": 0,
            "objectId": int(oid),
            "changeSource": "CRM",
        }
        if kind == "creation":
            ev["changeFlag"] = "NEW"
        if prop is not None:
            ev["propertyName"] = prop
            ev["propertyValue"] = None if value is None else str(value)
        self.pending.append(ev)

    # --- webhooks -----------------------------------------------------------------------------

    def webhook_headers(self, url: str, body: bytes, versions: tuple[str, ...] = ("v3",)) -> dict[str, str]:
        """Headers HubSpot sends: v3 always for new apps; v1/v2 in X-HubSpot-Signature with its version."""
        ts = str(int(self.now() * 1000))
        h = {"Content-Type": "application/json", "X-HubSpot-Request-Timestamp": ts}
        if "v3" in versions:
            h["X-HubSpot-Signature-v3"] = signing.v3(self.client_secret, "POST", url, body, ts)
        if "v2" in versions:
            h["X-HubSpot-Signature"] = signing.v2(self.client_secret, "POST", url, body)
            h["X-HubSpot-Signature-Version"] = "v2"
        elif "v1" in versions:
            h["X-HubSpot-Signature"] = signing.v1(self.client_secret, body)
            h["X-HubSpot-Signature-Version"] = "v1"
        return h

    async def flush_webhooks(self, *, versions: tuple[str, ...] = ("v3",), drop: bool = False) -> int | None:
        """POST pending events (at most 100 per request, as HubSpot batches them)."""
        events, self.pending = self.pending, []
        if drop or not events or not self.webhook_url:
            return None
        status = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for i in range(0, len(events), 100):
                body = orjson.dumps(events[i : i + 100])
                headers = self.webhook_headers(self.webhook_url, body, versions)
                async with session.post(self.webhook_url, data=body, headers=headers) as resp:
                    status = resp.status
                    self.webhook_statuses.append(status)
        return status

    # --- server -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/v1/token", self._token)
        app.router.add_post("/crm/v3/objects/{type}/search", self._search)
        app.router.add_post("/crm/v3/objects/{type}/batch/upsert", self._upsert)
        app.router.add_post("/crm/v3/objects/{type}/batch/read", self._read)
        app.router.add_get("/crm/v3/objects/{type}/{id}", self._get)
        app.router.add_delete("/crm/v3/objects/{type}/{id}", self._archive)
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

    @staticmethod
    def _error(status: int, message: str, category: str, **extra: Any) -> web.Response:
        body = {
            "status": "error",
            "message": message,
            "correlationId": str(uuid.uuid4()),
            "category": category,
            **extra,
        }
        return web.json_response(body, status=status)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("client_id") != self.client_id or not hmac.compare_digest(
            str(form.get("client_secret", "")), self.client_secret
        ):
            return self._error(400, "missing or unknown client id", "BAD_CLIENT_ID")
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") not in self.refresh_tokens:
            return self._error(400, "missing or invalid refresh token", "BAD_REFRESH_TOKEN")
        access = "CN" + secrets.token_hex(20)
        self.access_tokens[access] = self.now() + self.access_ttl
        # HubSpot's refresh tokens do not rotate: the same value comes back.
        return web.json_response(
            {
                "token_type": "bearer",
                "refresh_token": form["refresh_token"],
                "access_token": access,
                "expires_in": int(self.access_ttl),
            }
        )

    def _gate(self, request: web.Request, search: bool = False) -> tuple[web.Response | None, dict[str, str]]:
        now = self.now()
        self.requests.append((now, request.method, request.path))
        if self.failing is not None:
            return self._failure(*self.failing), {}
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        exp = self.access_tokens.get(token)
        if token != self.private_token and (exp is None or exp < now):
            msg = (
                "The OAuth token used to make this call expired"
                if exp is not None
                else "Authentication credentials not found"
            )
            return self._error(401, msg, "EXPIRED_AUTHENTICATION" if exp is not None else "INVALID_AUTHENTICATION"), {}
        while self._sent and self._sent[0] <= now - 10:
            self._sent.popleft()
        while self._searches and self._searches[0] <= now - 1:
            self._searches.popleft()
        if self.used_today >= self.daily:
            self.throttled.append("DAILY")
            return self._error(
                429, "You have reached your daily limit.", "RATE_LIMITS", errorType="RATE_LIMIT", policyName="DAILY"
            ), {}
        if len(self._sent) >= self.per_ten_seconds or (search and len(self._searches) >= self.search_per_second):
            self.throttled.append("TEN_SECONDLY_ROLLING")
            return self._error(
                429,
                "You have reached your ten_secondly_rolling limit.",
                "RATE_LIMITS",
                errorType="RATE_LIMIT",
                policyName="TEN_SECONDLY_ROLLING",
            ), {}
        self._sent.append(now)
        self.used_today += 1
        if search:
            self._searches.append(now)
            return None, {}  # the search endpoints send no rate-limit headers
        return None, {
            "X-HubSpot-RateLimit-Max": str(self.per_ten_seconds),
            "X-HubSpot-RateLimit-Remaining": str(self.per_ten_seconds - len(self._sent)),
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
            "X-HubSpot-RateLimit-Daily": str(self.daily),
            "X-HubSpot-RateLimit-Daily-Remaining": str(self.daily - self.used_today),
        }

    async def _search(self, request: web.Request) -> web.Response:
        refused, _ = self._gate(request, search=True)
        if refused:
            return refused
        otype = request.match_info["type"]
        q = orjson.loads(await request.read())
        limit = int(q.get("limit", 10))
        after = int(q.get("after") or 0)
        if limit > 200:
            return self._error(400, "limit must be at most 200", "VALIDATION_ERROR")
        if after + limit > self.search_cap:
            # HubSpot: the search endpoints page through at most 10,000 results.
            return self._error(400, f"paging past {self.search_cap} results is not supported", "VALIDATION_ERROR")
        rows = [
            o
            for o in self.objects.get(otype, {}).values()
            if not o["archived"] and _matches(o, q.get("filterGroups") or [])
        ]
        for s in reversed(q.get("sorts") or []):
            prop: str = s["propertyName"]

            def key(o: dict[str, Any], p: str = prop) -> tuple[int, Any]:
                return _sort_key(o["properties"].get(p))

            rows.sort(key=key, reverse=s.get("direction") == "DESCENDING")
        page = rows[after : after + limit]
        wanted = set(q.get("properties") or []) | {"hs_object_id", "createdate", modified_property(otype)}
        results = [{**o, "properties": {k: v for k, v in o["properties"].items() if k in wanted}} for o in page]
        body: dict[str, Any] = {"total": len(rows), "results": results}
        if after + limit < len(rows):
            body["paging"] = {"next": {"after": str(after + limit)}}
        return web.json_response(body)

    async def _upsert(self, request: web.Request) -> web.Response:
        refused, headers = self._gate(request)
        if refused:
            return refused
        otype = request.match_info["type"]
        inputs = orjson.loads(await request.read()).get("inputs") or []
        self.batch_sizes.append(len(inputs))
        if len(inputs) > 100:
            return self._error(400, "Batch input size must be at most 100", "VALIDATION_ERROR")
        ids = [str(i.get("id")) for i in inputs]
        if len(set(ids)) != len(ids):
            return self._error(400, "Duplicate IDs found in batch input", "VALIDATION_ERROR")
        for i in inputs:
            if i.get("idProperty") == "email" and "@" not in str(i.get("id")):
                return self._error(
                    400, f"Property values were not valid: invalid email {i.get('id')!r}", "VALIDATION_ERROR"
                )
        results = []
        for i in inputs:
            prop = i.get("idProperty") or "hs_object_id"
            value = str(i["id"])
            props = dict(i.get("properties") or {})
            found = self.find(otype, prop, value)
            if found is None:
                obj = self.put(otype, {**props, prop: value})
                results.append({**obj, "new": True})
            else:
                changed = {
                    k: v for k, v in props.items() if found["properties"].get(k) != (None if v is None else str(v))
                }
                obj = self.edit(otype, found["id"], changed) if changed else found
                results.append({**obj, "new": False})
        return web.json_response({"status": "COMPLETE", "results": results}, headers=headers)

    async def _read(self, request: web.Request) -> web.Response:
        refused, headers = self._gate(request)
        if refused:
            return refused
        otype = request.match_info["type"]
        q = orjson.loads(await request.read())
        prop = q.get("idProperty") or "hs_object_id"
        wanted = set(q.get("properties") or []) | {prop, "hs_object_id"}
        results = []
        for i in q.get("inputs") or []:
            found = self.find(otype, prop, str(i["id"]))
            if found is not None:
                results.append({**found, "properties": {k: v for k, v in found["properties"].items() if k in wanted}})
        return web.json_response({"status": "COMPLETE", "results": results}, headers=headers)

    async def _archive(self, request: web.Request) -> web.Response:
        """``DELETE /crm/v3/objects/{type}/{id}``: archive (HubSpot's delete); 204 even if already archived."""
        refused, headers = self._gate(request)
        if refused:
            return refused
        otype = request.match_info["type"]
        obj = self.objects.get(otype, {}).get(request.match_info["id"])
        if obj is None:
            return self._error(404, "Object not found", "OBJECT_NOT_FOUND")
        if not obj["archived"]:
            obj["archived"] = True
            ms = self._stamp()
            obj["updatedAt"] = iso_ms(ms)
            self._announce(otype, obj["id"], "deletion", ms)
        return web.Response(status=204, headers=headers)

    async def _get(self, request: web.Request) -> web.Response:
        refused, headers = self._gate(request)
        if refused:
            return refused
        otype = request.match_info["type"]
        obj = self.objects.get(otype, {}).get(request.match_info["id"])
        if obj is None or obj["archived"]:
            return self._error(404, "Object not found", "OBJECT_NOT_FOUND")
        wanted = set(filter(None, request.query.get("properties", "").split(",")))
        wanted |= {"hs_object_id", "createdate", modified_property(otype)}
        return web.json_response(
            {**obj, "properties": {k: v for k, v in obj["properties"].items() if k in wanted}}, headers=headers
        )


def _sort_key(v: Any) -> tuple[int, Any]:
    if v is None:
        return (1, "")
    try:
        return (0, to_ms(v))
    except ValueError:
        return (0, v)


def _matches(obj: dict[str, Any], groups: list[dict[str, Any]]) -> bool:
    """OR across filter groups, AND within one (HubSpot's search semantics)."""
    if not groups:
        return True
    return any(all(_filter(obj, f) for f in g.get("filters") or []) for g in groups)


def _filter(obj: dict[str, Any], f: dict[str, Any]) -> bool:
    v = obj["properties"].get(f["propertyName"])
    op = f["operator"]
    if op == "HAS_PROPERTY":
        return v is not None
    if v is None:
        return False
    a: Any
    b: Any
    if f["propertyName"].endswith("date"):
        a, b = to_ms(v), to_ms(f["value"])
    else:
        a, b = v, str(f["value"])
    return bool({"EQ": a == b, "NEQ": a != b, "GT": a > b, "GTE": a >= b, "LT": a < b, "LTE": a <= b}[op])
