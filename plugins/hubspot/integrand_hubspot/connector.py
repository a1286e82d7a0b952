"""The ``hubspot`` connector: signed webhook arrays, CRM-search polling, and a batch-upsert sink.

Facts it relies on are in /work/shared/reference/third-party-apis.md (HubSpot section); HubSpot's
pages are cited where a behaviour depends on them.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from pydantic import Field, model_validator

from integrand.connector import (
    AuthError,
    Connector,
    ConnectorConfig,
    Duration,
    Enricher,
    Event,
    PayloadError,
    PermanentError,
    PollingSource,
    PollResult,
    RateLimiter,
    ReconcilePage,
    ReconcilingSource,
    RetryableError,
    SecretValue,
    SignatureError,
    Sink,
    UnsupportedMediaType,
    WebhookRequest,
    WebhookSource,
    content_id,
)

from . import signing
from .objects import iso_ms, modified_property, to_ms

API_BASE = "https://api.hubapi.com"
TOKEN_URL = "https://api.hubapi.com/oauth/v1/token"  # noqa: S105 - a URL
SEARCH_CAP = 10_000
PLURAL = {"contact": "contacts", "company": "companies", "deal": "deals", "ticket": "tickets"}


class HubSpotConfig(ConnectorConfig):
    access_token: SecretValue | None = None
    client_id: str | None = None
    client_secret: SecretValue | None = None
    refresh_token: SecretValue | None = None
    api_base: str = API_BASE
    token_url: str = TOKEN_URL
    signature_versions: list[Literal["v3", "v2", "v1"]] = ["v3"]
    webhook_url: str | None = None
    tolerance: Duration = 300.0
    object_type: str = "contacts"
    properties: list[str] = ["email", "firstname", "lastname", "company", "phone"]
    id_property: str = "email"
    version_property: str | None = None
    page_size: int = Field(default=200, ge=1, le=200)
    search_cap: int = Field(default=SEARCH_CAP, ge=1)
    overlap: Duration = 30.0
    initial_lookback: Duration = 0.0
    requests_per_10s: int = Field(default=100, ge=1)
    searches_per_second: int = Field(default=5, ge=1)
    timeout: Duration = 30.0

    @model_validator(mode="after")
    def _auth(self) -> HubSpotConfig:
        oauth = self.refresh_token is not None
        if oauth and (self.client_id is None or self.client_secret is None):
            raise ValueError("OAuth (refresh_token) needs client_id and client_secret")
        if oauth and self.access_token is not None:
            raise ValueError("give either access_token (private app) or refresh_token (OAuth), not both")
        return self

    @property
    def modified(self) -> str:
        return modified_property(self.object_type)

    @property
    def singular(self) -> str:
        return {"companies": "company"}.get(self.object_type, self.object_type.removesuffix("s"))


def retry_after_for(policy: str | None, headers: Any, now: float) -> float:
    """How long a 429 means: the rolling window's interval, or until the next day for DAILY."""
    if policy == "DAILY":
        tomorrow = (datetime.fromtimestamp(now, UTC) + timedelta(days=1)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        return max(60.0, tomorrow.timestamp() - now)  # HubSpot resets at midnight in the account's time zone
    interval = headers.get("X-HubSpot-RateLimit-Interval-Milliseconds") if headers is not None else None
    return float(interval) / 1000 if interval and str(interval).isdigit() else 10.0


class HubSpotConnector(Connector[HubSpotConfig], WebhookSource, PollingSource, ReconcilingSource, Enricher, Sink):
    """HubSpot CRM: webhooks verified by v3 (v1/v2 where configured), search polling, batch upsert by id property."""

    Config = HubSpotConfig
    batch_size = 100

    _access: str | None = None
    _access_expires = 0.0

    async def start(self) -> None:
        c = self.config
        # One budget per HubSpot account and app in integrand's HTTP helper, shared by every source and
        # sink using the same credentials (HubSpot counts per app per account: third-party-apis.md). The
        # key names a digest of the credentials, never the credentials. No automatic retries: the
        # dispatcher and the poller retry with their own backoff.
        who = (
            c.access_token.reveal()
            if c.access_token
            else f"{c.client_id}:{c.refresh_token.reveal() if c.refresh_token else ''}"
        )
        digest = hashlib.sha256(f"{c.api_base.rstrip('/')}\n{who}".encode()).hexdigest()[:16]
        self.rate_key = f"hubspot:{digest}"
        self.search_key = self.rate_key + ":search"
        self.ctx.http.limit(self.rate_key, limits=[(c.requests_per_10s, 10.0)], pause_429=10.0, retries=0)
        # Search has its own, stricter limit on top of the account's (and no rate-limit headers).
        self.ctx.http.limit(self.search_key, limits=[(c.searches_per_second, 1.0)], pause_429=1.0, retries=0)
        if c.access_token is not None:
            self.ctx.http.add_secret(c.access_token.reveal())
        self._refresh_lock = asyncio.Lock()

    @property
    def limiter(self) -> RateLimiter:
        """This account's budget in the shared helper (the same object for every connector of the account)."""
        return self.ctx.http.pool.limiter(self.rate_key)

    @property
    def search_limiter(self) -> RateLimiter:
        return self.ctx.http.pool.limiter(self.search_key)

    # --- auth -----------------------------------------------------------------------------------

    async def _token(self, force: bool = False, stale: str | None = None) -> str:
        c = self.config
        if c.access_token is not None:
            return c.access_token.reveal()
        if c.refresh_token is None:
            raise AuthError("hubspot needs access_token (a private app token) or refresh_token with client_id/secret")
        async with self._refresh_lock:
            valid = self._access is not None and self._access_expires - 60 > time.time()
            if valid and self._access is not None and (not force or self._access != stale):
                return self._access  # still good, or another caller already refreshed it
            assert c.client_id is not None
            assert c.client_secret is not None
            form = {
                "grant_type": "refresh_token",
                "client_id": c.client_id,
                "client_secret": c.client_secret.reveal(),
                "refresh_token": c.refresh_token.reveal(),
            }
            res = await self.ctx.http.post(c.token_url, data=form, timeout=c.timeout, check=False)
            try:
                body = orjson.loads(res.body)
            except orjson.JSONDecodeError:
                body = None
            status = res.status
            if status >= 500 or status == 429:
                raise RetryableError(f"HubSpot token endpoint answered {status}", request_id=res.request_id)
            if status != 200 or not isinstance(body, dict) or "access_token" not in body:
                raise AuthError(
                    f"HubSpot refused the refresh token ({status} {body.get('message') if isinstance(body, dict) else ''})",
                    request_id=res.request_id,
                )
            # HubSpot access tokens live 30 minutes; refresh tokens do not rotate, so nothing is stored.
            self._access = str(body["access_token"])
            self.ctx.http.add_secret(self._access)
            self._access_expires = time.time() + float(body.get("expires_in", 1800))
            return self._access

    # --- the API --------------------------------------------------------------------------------

    async def api(self, method: str, path: str, body: Any = None, *, search: bool = False) -> dict[str, Any]:
        """One call: rate-limited (search has its own limit too), 401 refreshes once, 429 honours policyName."""
        c = self.config
        url = c.api_base.rstrip("/") + path
        # A 429 pauses the first key for Retry-After (or its default); the policy name below may pause more.
        keys = [self.search_key, self.rate_key] if search else [self.rate_key]
        for attempt in range(2):
            token = await self._token()
            res = await self.ctx.http.request(
                method,
                url,
                data=orjson.dumps(body) if body is not None else None,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                timeout=c.timeout,
                rate_key=keys,
                check=False,  # HubSpot's message, correlationId and policyName come in the body
            )
            status, headers, raw = res.status, res.headers, res.body
            try:
                data = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                data = {"message": raw[:300].decode(errors="replace")}
            self._note_headers(headers)
            cid = res.request_id or (data.get("correlationId") if isinstance(data, dict) else None)
            msg = data.get("message") if isinstance(data, dict) else None
            if status == 401 and attempt == 0 and c.refresh_token is not None:
                await self._token(force=True, stale=token)
                continue
            if status == 429:
                policy = data.get("policyName") if isinstance(data, dict) else None
                given = res.retry_after if "Retry-After" in headers else None
                wait = given or retry_after_for(policy, headers, time.time())
                (self.search_limiter if search and policy != "DAILY" else self.limiter).pause(wait)
                raise RetryableError(f"HubSpot 429 {policy}: {msg}", retry_after=wait, request_id=cid)
            if status in (401, 403):
                raise AuthError(f"HubSpot {status}: {msg} (correlationId {cid})", request_id=cid)
            if status >= 500:
                raise RetryableError(f"HubSpot {status}: {msg}", request_id=cid)
            if status >= 400:
                raise PermanentError(f"HubSpot {status}: {msg} (correlationId {cid})", request_id=cid)
            return data if isinstance(data, dict) else {"results": data}
        raise AuthError("HubSpot refused a freshly refreshed access token")

    def _note_headers(self, headers: Any) -> None:
        """Slow down before HubSpot has to say 429: an exhausted rolling window pauses until it rolls."""
        remaining = headers.get("X-HubSpot-RateLimit-Remaining")
        interval = headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
        if remaining is not None and remaining.isdigit() and int(remaining) <= 0 and interval and interval.isdigit():
            self.limiter.pause(int(interval) / 1000)
        daily = headers.get("X-HubSpot-RateLimit-Daily-Remaining")
        if daily is not None and daily.isdigit() and int(daily) <= 0:
            self.limiter.pause(retry_after_for("DAILY", headers, time.time()))

    # --- webhooks -------------------------------------------------------------------------------

    def verify(self, request: WebhookRequest, now: float) -> None:
        c = self.config
        if c.client_secret is None:
            raise SignatureError("this hubspot source has no client_secret to check signatures with")
        secret = c.client_secret.reveal()
        uri = c.webhook_url or request.url
        h = request.headers
        if "v3" in c.signature_versions and h.get("X-HubSpot-Signature-v3"):
            ts = h.get("X-HubSpot-Request-Timestamp", "")
            if not ts.isdigit():
                raise SignatureError("missing or malformed X-HubSpot-Request-Timestamp")
            # HubSpot: reject requests whose timestamp is older than 5 minutes.
            if abs(now * 1000 - int(ts)) > c.tolerance * 1000:
                raise SignatureError("X-HubSpot-Request-Timestamp is outside the allowed window")
            want = signing.v3(secret, request.method, uri, request.body, ts)
            if not _eq(h["X-HubSpot-Signature-v3"], want):
                raise SignatureError("X-HubSpot-Signature-v3 does not match (check client_secret and webhook_url)")
            return
        version = (h.get("X-HubSpot-Signature-Version") or "").lower()
        given = h.get("X-HubSpot-Signature")
        if given and version in ("v1", "v2") and version in c.signature_versions:
            if version == "v2":
                want = signing.v2(secret, request.method, uri, request.body)
            else:
                want = signing.v1(secret, request.body)
            if not _eq(given, want):
                raise SignatureError(f"X-HubSpot-Signature ({version}) does not match")
            return
        accepted = ", ".join(c.signature_versions)
        raise SignatureError(f"missing HubSpot signature (accepted: {accepted})")

    def sign(self, body: bytes, now: float, delivery_id: str) -> dict[str, str] | None:
        c = self.config
        if c.client_secret is None or c.webhook_url is None:
            return None
        ts = str(int(now * 1000))
        return {
            "X-HubSpot-Request-Timestamp": ts,
            "X-HubSpot-Signature-v3": signing.v3(c.client_secret.reveal(), "POST", c.webhook_url, body, ts),
        }

    def parse(self, request: WebhookRequest) -> list[Event]:
        ct = request.content_type
        if ct and ct != "application/json":
            raise UnsupportedMediaType(f"Content-Type must be application/json, got {ct!r}")
        try:
            data = orjson.loads(request.body)
        except orjson.JSONDecodeError as e:
            raise PayloadError(f"body is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise PayloadError("HubSpot webhooks are a JSON array of events")
        events = []
        for item in data:
            if not isinstance(item, dict):
                raise PayloadError("each HubSpot event must be an object")
            kind = item.get("subscriptionType") or item.get("eventType")
            if not kind or item.get("objectId") is None or item.get("occurredAt") is None:
                raise PayloadError("event lacks subscriptionType/eventType, objectId or occurredAt")
            occurred = int(item["occurredAt"])
            # eventId is not guaranteed unique; attemptNumber changes on retries and must not change the id.
            ev_id = content_id(
                "hubspot",
                str(item.get("portalId")),
                str(item.get("subscriptionId")),
                str(kind),
                str(item["objectId"]),
                str(item.get("eventId")),
                str(occurred),
                str(item.get("propertyName") or ""),
            )
            entity = str(kind).split(".", 1)[0]
            events.append(
                Event(
                    id=ev_id,
                    source=request.source,
                    type=str(kind),
                    data=item,
                    received_at=request.received_at,
                    entity=entity,
                    entity_id=str(item["objectId"]),
                    version=iso_ms(occurred),
                    occurred_at=iso_ms(occurred),
                    meta={"portal": item.get("portalId"), "attempt": item.get("attemptNumber"), "via": "webhook"},
                )
            )
        return events

    # --- polling --------------------------------------------------------------------------------

    async def poll(self, cursor: Any) -> PollResult:
        """One page of CRM search ordered by last modification, from the cursor's time.

        Cursor ``{"since": ms, "after": str | None, "max": ms}`` (plus ``started`` and ``from``,
        ms, while a sweep of several pages goes on: when its first page was read, and its ``since``). Pages are keyset: each next page restarts the window at
        the newest modification time seen (objects at exactly that time come again and keep their
        event ids, so the store drops them); only a page of objects all modified at one instant
        pages on by position (``after``), up to search's 10,000-result cap. A finished sweep restarts
        ``overlap`` before the newest time, for records that become searchable late — after a
        sweep of several pages, before no later than when its first page was read: such a sweep
        goes on reading newer changes while it pages, and a record that became searchable only
        after the page covering its time was read would otherwise end up behind the restart
        point and be skipped for good (the same fix as http-poll's).
        """
        c = self.config
        cur = cursor if isinstance(cursor, dict) else {}
        now_ms = int(time.time() * 1000)
        default_since = now_ms - int(c.initial_lookback * 1000)
        since = int(cur.get("since", default_since))
        newest = int(cur.get("max", since))
        started = cur.get("started")
        # Where the sweep began: its pages move `since` on (keyset), its end must not go past that start.
        begun = int(cur.get("from", since))
        events, nxt = await self._search_page(since, None, cur.get("after"))
        newest = max([newest, *(to_ms(e.version or "0") for e in events)])
        if nxt is not None:
            first = int(started) if isinstance(started, int | float) else now_ms
            return PollResult(events, {**nxt, "max": newest, "started": first, "from": begun}, more=True)
        end = min(newest, int(started)) if isinstance(started, int | float) else newest
        restart = max(begun, end - int(c.overlap * 1000))
        return PollResult(events, {"since": restart, "after": None, "max": newest})

    async def reconcile(self, since: float | None, cursor: Any) -> ReconcilePage:
        """integrand's ``ReconcilingSource.reconcile``: objects modified since ``since`` (epoch s), a search page at a time."""
        pos: dict[str, Any] = cursor if isinstance(cursor, dict) else {}
        since_ms = int(pos.get("since", int(since * 1000) if since is not None else 0))
        events, nxt = await self._search_page(since_ms, None, pos.get("after"))
        return ReconcilePage(events, nxt, more=nxt is not None)

    async def _search_page(
        self, since: int, until: int | None, after: str | None
    ) -> tuple[list[Event], dict[str, Any] | None]:
        """One search page from ``since`` (ms, inclusive); the position of the next page, or None at the end."""
        c = self.config
        filters: list[dict[str, Any]] = [{"propertyName": c.modified, "operator": "GTE", "value": str(since)}]
        if until is not None:
            filters.append({"propertyName": c.modified, "operator": "LTE", "value": str(until)})
        body: dict[str, Any] = {
            "filterGroups": [{"filters": filters}],
            "sorts": [{"propertyName": c.modified, "direction": "ASCENDING"}],
            "properties": sorted({*c.properties, c.modified, c.id_property}),
            "limit": c.page_size,
        }
        if after:
            body["after"] = after
        data = await self.api("POST", f"/crm/v3/objects/{c.object_type}/search", body, search=True)
        events = [self._from_object(obj, since) for obj in data.get("results") or []]
        newest = max([since, *(to_ms(e.version or "0") for e in events)])
        nxt_after = ((data.get("paging") or {}).get("next") or {}).get("after")
        if not nxt_after:
            return events, None
        if newest > since:
            # Keyset: the next page starts at the newest modification time seen (objects at exactly that
            # time come again with their event ids: the store drops them). Paging on by position would
            # skip one: an object edited meanwhile moves to the end, and the rest move up one place.
            return events, {"since": newest, "after": None}
        # A page of objects all modified at `since`: only position tells them apart.
        if int(nxt_after) + c.page_size > c.search_cap:
            # The next page would pass the 10,000-result cap (HubSpot answers 400).
            raise PermanentError(f"more than {c.search_cap} objects modified at one instant; cannot page on")
        return events, {"since": since, "after": str(nxt_after)}

    def _from_object(self, obj: dict[str, Any], fallback_ms: int) -> Event:
        c = self.config
        props = obj.get("properties") or {}
        modified = props.get(c.modified) or obj.get("updatedAt")
        ms = to_ms(modified) if modified else fallback_ms
        created = obj.get("createdAt") == obj.get("updatedAt")
        kind = f"{c.singular}.{'creation' if created else 'propertyChange'}"
        return Event(
            id=content_id("hubspot", c.object_type, str(obj.get("id")), str(ms)),
            source=self.ctx.name,
            type=kind,
            data={"objectId": obj.get("id"), "subscriptionType": kind, "object": obj},
            entity=c.singular,
            entity_id=str(obj.get("id")),
            version=iso_ms(ms),
            occurred_at=iso_ms(ms),
            meta={"via": "search"},
        )

    # --- enrichment -----------------------------------------------------------------------------

    async def fetch(self, event: Event) -> Event:
        """integrand's ``Enricher.fetch``: the object as it is now under ``data.object`` (None once deleted)."""
        c = self.config
        d = event.data if isinstance(event.data, dict) else {}
        kind = str(d.get("subscriptionType") or d.get("eventType") or event.type)
        if "object" in d or kind.endswith(".deletion") or not event.entity_id:
            return event
        otype = PLURAL.get(event.entity or "", c.object_type)
        props = ",".join(sorted({*c.properties, modified_property(otype), c.id_property}))
        try:
            obj = await self.api("GET", f"/crm/v3/objects/{otype}/{event.entity_id}?properties={props}")
        except PermanentError as e:
            if "404" not in str(e):
                raise
            obj = None
        version = event.version
        if obj is not None:
            modified = (obj.get("properties") or {}).get(modified_property(otype)) or obj.get("updatedAt")
            if modified:
                version = iso_ms(to_ms(modified))
        return replace(event, data={**d, "object": obj}, version=version)

    # --- sink -----------------------------------------------------------------------------------

    async def deliver(self, event: Event) -> None:
        (result,) = await self.deliver_batch([event])
        if result is not None:
            raise result

    async def deliver_result(self, event: Event) -> dict[str, Any] | None:
        """One upsert (or archive) that returns the object's HubSpot id, for a saga's later steps."""
        c = self.config
        if _is_delete(event):
            await self._archive(event)
            return None
        props = _properties(event)
        if props is None:
            raise PermanentError("a HubSpot upsert needs an object of properties in event data")
        key = props.pop(c.id_property, None)
        if key in (None, ""):
            raise PermanentError(f"the event has no {c.id_property!r} to upsert by")
        body = {"inputs": [{"id": str(key), "idProperty": c.id_property, "properties": props}]}
        data = await self.api("POST", f"/crm/v3/objects/{c.object_type}/batch/upsert", body)
        results = data.get("results") or []
        if not results:
            return None
        return {"id": str(results[0].get("id")), "new": bool(results[0].get("new"))}

    async def _archive(self, event: Event) -> None:
        """Archive (HubSpot's delete) the object ``data.id`` (or the one whose ``id_property`` the data names);
        one already gone is done: a compensation or a replayed delete must be idempotent."""
        c = self.config
        d = event.data if isinstance(event.data, dict) else {}
        oid = d.get("id") or d.get("hs_object_id")
        if oid in (None, ""):
            key = d.get(c.id_property)
            if key in (None, ""):
                raise PermanentError(f"a HubSpot delete needs data.id or data.{c.id_property}")
            found = await self.api(
                "POST",
                f"/crm/v3/objects/{c.object_type}/batch/read",
                {"idProperty": c.id_property, "inputs": [{"id": str(key)}], "properties": [c.id_property]},
            )
            hits = found.get("results") or []
            if not hits:
                return
            oid = hits[0].get("id")
        try:
            await self.api("DELETE", f"/crm/v3/objects/{c.object_type}/{oid}")
        except PermanentError as e:
            if "404" not in str(e) and "OBJECT_NOT_FOUND" not in str(e):
                raise

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        """``batch/upsert`` by ``id_property``, up to 100 at a time; a 400 on a batch is narrowed to the bad items.

        Events for the same object in one batch collapse to the last one (the newest in per-entity
        order). With ``version_property`` set, the object's stored version is read first and an
        event older than it is skipped, so a late or duplicate event never overwrites newer data.
        """
        c = self.config
        results: list[BaseException | None] = [None] * len(events)
        inputs: dict[str, tuple[int, dict[str, Any]]] = {}
        for i, ev in enumerate(events):
            if _is_delete(ev):
                try:
                    await self._archive(ev)
                except (RetryableError, PermanentError, AuthError) as e:
                    results[i] = e
                continue
            props = _properties(ev)
            if props is None:
                results[i] = PermanentError("a HubSpot upsert needs an object of properties in event data")
                continue
            key = props.get(c.id_property)
            if key in (None, ""):
                results[i] = PermanentError(f"the event has no {c.id_property!r} to upsert by")
                continue
            props = {k: v for k, v in props.items() if k != c.id_property}
            if c.version_property and ev.version:
                props[c.version_property] = ev.version
            inputs[str(key)] = (i, props)  # later events for the same object replace earlier ones
        if c.version_property and inputs:
            try:
                stored = await self._stored_versions(list(inputs))
            except (RetryableError, PermanentError, AuthError) as e:
                return [e if r is None else r for r in results]
            for key in list(inputs):
                i, props = inputs[key]
                mine = props.get(c.version_property)
                if key in stored and stored[key] is not None and mine is not None and str(stored[key]) >= str(mine):
                    self.log.info(
                        "skipping %s %s: HubSpot already has version %s ≥ %s", c.object_type, key, stored[key], mine
                    )
                    del inputs[key]
        items = list(inputs.items())
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            err = await self._upsert(chunk)
            if isinstance(err, PermanentError) and len(chunk) > 1:
                # One invalid input fails the whole batch: send each alone to find the bad ones.
                for key, (i, props) in chunk:
                    results[i] = await self._upsert([(key, (i, props))])
            elif err is not None:
                for _, (i, _) in chunk:
                    results[i] = err
        return results

    async def _upsert(self, chunk: list[tuple[str, tuple[int, dict[str, Any]]]]) -> BaseException | None:
        c = self.config
        body = {"inputs": [{"id": key, "idProperty": c.id_property, "properties": props} for key, (_, props) in chunk]}
        try:
            await self.api("POST", f"/crm/v3/objects/{c.object_type}/batch/upsert", body)
        except (RetryableError, PermanentError, AuthError) as e:
            return e
        return None

    async def _stored_versions(self, keys: list[str]) -> dict[str, Any]:
        c = self.config
        assert c.version_property is not None
        out: dict[str, Any] = {}
        for start in range(0, len(keys), 100):
            body = {
                "idProperty": c.id_property,
                "inputs": [{"id": k} for k in keys[start : start + 100]],
                "properties": [c.version_property, c.id_property],
            }
            data = await self.api("POST", f"/crm/v3/objects/{c.object_type}/batch/read", body)
            for obj in data.get("results") or []:
                props = obj.get("properties") or {}
                out[str(props.get(c.id_property))] = props.get(c.version_property)
        return out


def _is_delete(ev: Event) -> bool:
    """An event the sink deletes (archives) rather than upserts: ``*.deleted`` or ``meta.deleted``."""
    return ev.type.endswith(".deleted") or bool(ev.meta.get("deleted"))


def _properties(ev: Event) -> dict[str, Any] | None:
    d = ev.data
    if isinstance(d, dict) and isinstance(d.get("object"), dict):
        d = d["object"]  # an unmapped HubSpot event: the object's own properties
    if isinstance(d, dict) and isinstance(d.get("properties"), dict):
        return dict(d["properties"])
    if isinstance(d, dict):
        return dict(d)
    return None


def _eq(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.strip().encode(), b.encode())


__all__ = ["HubSpotConfig", "HubSpotConnector", "retry_after_for"]
