"""The ``quickbooks`` connector: webhooks (both formats), enrichment, CDC polling, and a sink with SyncToken handling.

Facts it relies on are in /work/shared/reference/third-party-apis.md (QuickBooks section); the
Intuit pages are cited where a behaviour depends on them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson
from pydantic import BeforeValidator, Field, field_validator

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

from ._time import parse_time, utc_version
from .tokens import TokenManager, make_cipher, shared_manager

PRODUCTION_API = "https://quickbooks.api.intuit.com"
SANDBOX_API = "https://sandbox-quickbooks.api.intuit.com"
TOKEN_URL = "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"  # noqa: S105 - a URL
AUTHORIZE_URL = "https://appcenter.intuit.com/connect/oauth2"
SCOPE = "com.intuit.quickbooks.accounting"
# CloudEvents verbs ↔ legacy operations (qbo.<entity>.<verb>.v1).
VERB_TO_OP = {
    "created": "Create",
    "updated": "Update",
    "deleted": "Delete",
    "merged": "Merge",
    "voided": "Void",
    "emailed": "Emailed",
}
OP_TO_VERB = {v: k for k, v in VERB_TO_OP.items()}
# Name-list entities are deactivated (Active = false), never deleted, and a query leaves inactive ones
# out unless it filters on Active; transactions have no Active field (filtering on it is an error).
WITH_ACTIVE = frozenset(
    {"Account", "Class", "Customer", "Department", "Employee", "Item", "PaymentMethod", "TaxCode", "Term", "Vendor"}
)
ANY_ACTIVE = "Active IN (true, false)"
CDC_WINDOW = timedelta(days=30)
CDC_MAX = 1000
STALE_OBJECT = "5010"


class QuickBooksConfig(ConnectorConfig):
    realm_id: str = Field(min_length=1)
    client_id: SecretValue
    client_secret: SecretValue
    # One Fernet key or a list (the first encrypts, all decrypt); normalised to a list so a missing
    # secret is reported once, not once per shape.
    token_key: Annotated[list[SecretValue], BeforeValidator(lambda v: v if isinstance(v, list) else [v])]
    verifier_token: SecretValue | None = None
    refresh_token: SecretValue | None = None
    environment: Literal["production", "sandbox"] = "production"
    api_base: str = PRODUCTION_API
    sandbox_api_base: str = SANDBOX_API
    token_url: str = TOKEN_URL
    authorize_url: str = AUTHORIZE_URL
    redirect_uri: str = "http://localhost:8765/quickbooks/callback"
    minorversion: int = Field(default=75, ge=75)
    entities: list[str] = Field(default=["Customer", "Invoice", "Item", "Payment"], min_length=1)
    initial_lookback: Duration = 0.0
    overlap: Duration = 5.0
    page_size: int = Field(default=1000, ge=1, le=1000)
    enrich_batch: int = Field(default=30, ge=1, le=1000)
    fetch_linger: Duration = 0.02
    requests_per_second: int = Field(default=10, ge=1)
    requests_per_minute: int = Field(default=500, ge=1)
    throttle_wait: Duration = 60.0
    timeout: Duration = 120.0
    entity: str | None = None
    match_field: str | None = None
    max_stale_retries: int = Field(default=3, ge=0)

    @field_validator("token_key")
    @classmethod
    def _fernet(cls, v: list[SecretValue]) -> list[SecretValue]:
        if not v:
            raise ValueError("give at least one token_key")
        if all(k.resolved for k in v):  # lazily loaded ones (the CLI's) are checked where they are read
            make_cipher([k.reveal() for k in v])
        return v

    @property
    def keys(self) -> list[str]:
        return [k.reveal() for k in self.token_key]

    @property
    def base(self) -> str:
        return (self.api_base if self.environment == "production" else self.sandbox_api_base).rstrip("/")


class QuickBooksFault(Exception):
    """A Fault body (inside any HTTP status) before it is sorted into retryable / permanent / auth."""

    def __init__(self, status: int, body: dict[str, Any], tid: str | None, wait: float | None = None):
        f = body.get("Fault") or {}
        errors = f.get("Error") or [{}]
        self.kind = str(f.get("type", ""))
        self.code = str(errors[0].get("code", ""))
        self.status = status
        self.tid = tid
        self.wait = wait
        detail = "; ".join(f"{e.get('code')}: {e.get('Message')} ({e.get('Detail')})" for e in errors)
        super().__init__(f"QuickBooks {self.kind} (HTTP {status}, intuit_tid {tid}): {detail}")


def fault_error(f: QuickBooksFault, throttle_wait: float) -> Exception:
    """Sort a Fault: throttling and system faults retry, auth faults re-authenticate, validation gives up."""
    msg = str(f)
    if f.status == 429 or f.code == "3001" or f.kind == "ThrottleExceeded":
        return RetryableError(msg, retry_after=f.wait or throttle_wait, request_id=f.tid)
    if f.kind in ("AuthenticationFault", "AuthorizationFault") or f.status in (401, 403) or f.code in ("120", "3200"):
        return AuthError(msg, request_id=f.tid)
    if f.kind == "SystemFault" or f.status >= 500 or f.code in ("10000", "6000"):
        return RetryableError(msg, request_id=f.tid)
    return PermanentError(msg, request_id=f.tid)


class QuickBooksConnector(Connector[QuickBooksConfig], WebhookSource, PollingSource, ReconcilingSource, Enricher, Sink):
    """QuickBooks Online: thin webhooks completed by fetching, CDC polling with query reconciliation, and writes."""

    Config = QuickBooksConfig
    batch_size = 1

    _flusher: asyncio.Task[None] | None = None
    tokens: TokenManager
    other_realm_changes = 0  # changes for other companies in webhooks to this URL (ignored; see parse)

    async def start(self) -> None:
        c = self.config
        self._wanted: dict[str, dict[str, list[asyncio.Future[dict[str, Any] | None]]]] = {}
        self._flushes: set[asyncio.Task[None]] = set()
        self.tokens = shared_manager(
            (c.token_url, c.client_id.reveal(), c.realm_id, *c.keys),
            self.ctx.state,
            lambda: TokenManager(
                state=self.ctx.state,
                cipher=make_cipher(c.keys),
                token_url=c.token_url,
                client_id=c.client_id.reveal(),
                client_secret=c.client_secret.reveal(),
                bootstrap_refresh_token=c.refresh_token.reveal() if c.refresh_token else None,
            ),
        )
        # One budget per company in integrand's HTTP helper, shared by every source and sink of the
        # realm. Intuit: 500 requests per minute and 10 per second per realm; "if you see [429], wait
        # 60 seconds before retrying" (limits-and-throttles page, third-party-apis.md). No automatic
        # retries: the dispatcher and the poller retry with their own backoff and see every failure.
        self.rate_key = f"quickbooks:{c.realm_id}"
        self.ctx.http.limit(
            self.rate_key,
            limits=[(c.requests_per_second, 1.0), (c.requests_per_minute, 60.0)],
            pause_429=c.throttle_wait,
            retries=0,
        )

    async def close(self) -> None:
        for task in list(self._flushes):
            task.cancel()
        for by_id in self._wanted.values():
            _settle(by_id, error=RetryableError("quickbooks connector closed before the fetch started"))

    @property
    def limiter(self) -> RateLimiter:
        """This realm's budget in the shared helper (the same object for every connector of the realm)."""
        return self.ctx.http.pool.limiter(self.rate_key)

    # --- the API --------------------------------------------------------------------------------

    async def api(
        self, method: str, path: str, params: dict[str, str] | None = None, body: Any = None
    ) -> dict[str, Any]:
        """One API call: rate-limited per realm, token refreshed on 401 once, Fault bodies raised (even in 200)."""
        c = self.config
        http = self.ctx.http
        url = f"{c.base}/v3/company/{c.realm_id}/{path}"
        query = {**(params or {}), "minorversion": str(c.minorversion)}
        for attempt in range(2):
            token = await self.tokens.access_token(http)
            res = await http.request(
                method,
                url,
                params=query,
                data=orjson.dumps(body) if body is not None else None,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json",
                    "Content-Type": "application/json",
                },
                timeout=c.timeout,
                rate_key=self.rate_key,
                check=False,  # Faults come inside any status, even 200: sorted here
            )
            status, tid, raw = res.status, res.request_id, res.body
            try:
                data = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                data = {}
            # On a 429 the helper has paused the realm for Retry-After, or for throttle_wait without one.
            wait = res.retry_after if status == 429 and res.retry_after is not None else c.throttle_wait
            if status == 401 and attempt == 0:
                self.log.info("QuickBooks answered 401 (intuit_tid %s); refreshing the access token", tid)
                await self.tokens.refresh(http, stale=token)
                continue
            if isinstance(data, dict) and "Fault" in data:
                raise QuickBooksFault(status, data, tid, wait)
            if status >= 500 or status == 429:
                raise RetryableError(
                    f"QuickBooks HTTP {status} (intuit_tid {tid})",
                    retry_after=wait if status == 429 else None,
                    request_id=tid,
                )
            if status != 200 or not isinstance(data, dict):
                raise PermanentError(f"QuickBooks HTTP {status} (intuit_tid {tid}): {raw[:300]!r}", request_id=tid)
            return data
        raise AuthError("QuickBooks refused a freshly refreshed access token")

    async def call(
        self, method: str, path: str, params: dict[str, str] | None = None, body: Any = None
    ) -> dict[str, Any]:
        """``api`` with Faults sorted into integrand's errors."""
        try:
            return await self.api(method, path, params, body)
        except QuickBooksFault as f:
            raise fault_error(f, self.config.throttle_wait) from None

    async def query(self, q: str) -> list[dict[str, Any]]:
        data = await self.call("GET", "query", {"query": q})
        qr = data.get("QueryResponse") or {}
        return [o for k, v in qr.items() if isinstance(v, list) for o in v]

    # --- webhooks -------------------------------------------------------------------------------

    def verify(self, request: WebhookRequest, now: float) -> None:
        token = self.config.verifier_token
        if token is None:
            raise SignatureError("this quickbooks source has no verifier_token configured")
        given = request.headers.get("intuit-signature")
        if not given:
            raise SignatureError("missing intuit-signature header")
        want = base64.b64encode(hmac.new(token.reveal().encode(), request.body, hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(given.strip(), want):
            raise SignatureError("intuit-signature does not match the body (check verifier_token)")

    def sign(self, body: bytes, now: float, delivery_id: str) -> dict[str, str] | None:
        token = self.config.verifier_token
        if token is None:
            return None
        sig = base64.b64encode(hmac.new(token.reveal().encode(), body, hashlib.sha256).digest()).decode()
        return {"intuit-signature": sig, "intuit-t-id": delivery_id}

    def parse(self, request: WebhookRequest) -> list[Event]:
        ct = request.content_type
        if ct and not (ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))):
            raise UnsupportedMediaType(f"Content-Type must be JSON, got {ct!r}")
        try:
            data = orjson.loads(request.body)
        except orjson.JSONDecodeError as e:
            raise PayloadError(f"body is not valid JSON: {e}") from None
        changes: list[dict[str, Any]] = []
        if isinstance(data, list):
            for ce in data:
                changes.append(_from_cloudevent(ce))
        elif isinstance(data, dict) and isinstance(data.get("eventNotifications"), list):
            for note in data["eventNotifications"]:
                if not isinstance(note, dict):
                    raise PayloadError("eventNotifications entries must be objects")
                realm = str(note.get("realmId", ""))
                entities = (note.get("dataChangeEvent") or {}).get("entities")
                if not realm or not isinstance(entities, list):
                    raise PayloadError("eventNotifications entry lacks realmId or dataChangeEvent.entities")
                for ent in entities:
                    changes.append(_from_legacy(realm, ent))
        else:
            raise PayloadError("expected a CloudEvents array or an object with eventNotifications")
        events = []
        for ch in changes:
            if ch["realm"] != self.config.realm_id:
                # One Intuit app delivers every connected company to one URL; this source owns one realm.
                # Routine when several companies are connected: counted, and logged at debug only.
                self.other_realm_changes += 1
                self.log.debug(
                    "ignoring a change for realm %s (this source is realm %s)", ch["realm"], self.config.realm_id
                )
                continue
            events.append(self._event(ch, request.source, request.received_at, via="webhook"))
        return events

    def _event(self, ch: dict[str, Any], source: str, received_at: str | None = None, via: str = "webhook") -> Event:
        version = utc_version(ch["lastUpdated"]) if ch.get("lastUpdated") else None
        ev_id = ch.pop("_id", None) or content_id(
            "qbo", ch["realm"], ch["entity"], ch["id"], ch["operation"], version or ""
        )
        kw: dict[str, Any] = {"received_at": received_at} if received_at else {}
        return Event(
            id=ev_id,
            source=source,
            type=f"{ch['entity'].lower()}.{OP_TO_VERB.get(ch['operation'], ch['operation'].lower())}",
            data=ch,
            entity=ch["entity"],
            entity_id=ch["id"],
            version=version,
            occurred_at=version,
            meta={"realm": ch["realm"], "via": via},
            **kw,
        )

    # --- enrichment -----------------------------------------------------------------------------

    async def fetch(self, event: Event) -> Event:
        """integrand's ``Enricher.fetch``: this event with the entity as it is now under ``data.object``.

        Concurrent calls (the dispatcher's workers) are gathered for ``fetch_linger`` and sent as one
        ``Id in (…)`` query per entity type, so a burst of webhooks costs a few requests, not one each.
        """
        d = event.data if isinstance(event.data, dict) else {}
        if d.get("operation") == "Delete" or "object" in d or not event.entity or not event.entity_id:
            return event
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any] | None] = loop.create_future()
        self._wanted.setdefault(event.entity, {}).setdefault(event.entity_id, []).append(fut)
        if sum(len(v) for v in self._wanted.values()) >= self.config.enrich_batch:
            self._spawn_flush(0.0)  # a full batch goes now; a lingering flush finds nothing left
        elif self._flusher is None:
            self._flusher = self._spawn_flush(self.config.fetch_linger)
        obj = await fut
        return self._with_object(event, obj)

    def _spawn_flush(self, delay: float) -> asyncio.Task[None]:
        task = asyncio.create_task(self._flush_after(delay))
        self._flushes.add(task)  # keep a reference until it is done
        task.add_done_callback(self._flushes.discard)
        return task

    async def fetch_many(self, events: Sequence[Event]) -> list[Event | BaseException]:
        """integrand's ``Enricher.fetch_many``: one query per entity type and batch, one result per event."""
        try:
            return list(await self.enrich(events))
        except Exception as e:
            return [e for _ in events]

    async def _flush_after(self, delay: float) -> None:
        """Send what is wanted now; calls arriving while this flush's queries are out start the next one."""
        if delay:
            await asyncio.sleep(delay)
        if self._flusher is asyncio.current_task():
            self._flusher = None
        wanted, self._wanted = self._wanted, {}
        try:
            for entity, by_id in wanted.items():
                try:
                    found = await self._read_many(entity, list(by_id))
                except Exception as e:
                    _settle(by_id, error=e)
                else:
                    _settle(by_id, found=found)
        finally:
            # Cancelled at close: no caller may wait forever.
            for by_id in wanted.values():
                _settle(by_id, error=RetryableError("quickbooks connector closed before the fetch finished"))

    async def _read_many(self, entity: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        ordered = sorted(set(ids), key=lambda s: (len(s), s))
        for start in range(0, len(ordered), self.config.enrich_batch):
            chunk = ordered[start : start + self.config.enrich_batch]
            quoted = ",".join("'" + x.replace("'", "\\'") + "'" for x in chunk)
            rows = await self.query(f"select * from {entity} where Id in ({quoted}) MAXRESULTS {len(chunk)}")
            found.update({str(o["Id"]): o for o in rows})
        return found

    @staticmethod
    def _with_object(ev: Event, obj: dict[str, Any] | None) -> Event:
        version = ev.version
        if obj is not None and obj.get("MetaData", {}).get("LastUpdatedTime"):
            version = utc_version(obj["MetaData"]["LastUpdatedTime"])
        return replace(ev, data={**ev.data, "object": obj}, version=version)

    async def enrich(self, events: Sequence[Event]) -> list[Event]:
        """Complete thin events with the entity as it is now: one query per entity type and batch of ids.

        Deletes carry no body. An object gone since the notification is marked ``"object": null``;
        ``version`` becomes the fetched object's LastUpdatedTime, so an old notification processed
        late carries the newest state, never an older one.
        """
        out = list(events)
        wanted: dict[str, list[int]] = {}
        for i, ev in enumerate(out):
            d = ev.data if isinstance(ev.data, dict) else {}
            if d.get("operation") == "Delete" or "object" in d or not ev.entity or not ev.entity_id:
                continue
            wanted.setdefault(ev.entity, []).append(i)
        for entity, idxs in wanted.items():
            found = await self._read_many(entity, [out[i].entity_id or "" for i in idxs])
            for i in idxs:
                out[i] = self._with_object(out[i], found.get(out[i].entity_id or ""))
        return out

    # --- polling: CDC, with the query endpoint beyond CDC's 30 days -----------------------------

    async def poll(self, cursor: Any) -> PollResult:
        """Changes since the cursor through CDC; beyond its 30-day window, through the query endpoint.

        Cursor: ``{"since": {entity: ISO time}, "focus": entity?, "pos": {...}?}``. A CDC answer
        that hits the 1,000-object cap may have cut off any type, so the poll then walks the types
        one at a time (``focus``), moving each type's ``since`` to the newest object seen; a type
        with 1,000 changes in one second is paged through the query endpoint instead. Duplicates
        from the overlaps share event ids, so the store drops them.

        Such a walk (several requests: ``started``, when it began, is in the cursor while it goes
        on) moves each type's ``since`` to the newest object seen, and goes on reading newer
        changes meanwhile; an object committed late that was not listed yet when the request
        covering its time ran is behind that keyset. At the end of the walk a type's ``since``
        is therefore no later than ``overlap`` before the walk began, so the next pass reads it
        (the same fix as http-poll's; without it such an object was skipped for good).
        """
        c = self.config
        now = datetime.now(UTC)
        cur = cursor if isinstance(cursor, dict) else {}
        since = _since_from(cur, c.entities, now - timedelta(seconds=c.initial_lookback))
        begun = cur.get("started")
        started = float(begun) if isinstance(begun, int | float) else now.timestamp()
        if cur.get("pos"):
            return await self._query_page(cur, since, started)
        stale = [e for e in c.entities if since[e] < now - CDC_WINDOW + timedelta(minutes=5)]
        if stale:
            return await self._query_page({"pos": {"entity": stale[0], "skip": 0}}, since, started)
        focus = cur.get("focus")
        types = [focus] if focus in c.entities else list(c.entities)
        changed_since = min(since[e] for e in types)
        data = await self.call(
            "GET", "cdc", {"entities": ",".join(types), "changedSince": changed_since.isoformat(timespec="seconds")}
        )
        events: list[Event] = []
        newest: dict[str, datetime] = {}
        for block in data.get("CDCResponse") or []:
            for qr in block.get("QueryResponse") or []:
                for entity, objs in qr.items():
                    if not isinstance(objs, list):
                        continue
                    for obj in objs:
                        events.append(self._from_object(entity, obj, "cdc"))
                        t = parse_time(obj["MetaData"]["LastUpdatedTime"])
                        newest[entity] = max(newest.get(entity, t), t)
        floor = (parse_time(data["time"]) if data.get("time") else now) - timedelta(seconds=c.overlap)
        nxt = dict(since)
        if len(events) < CDC_MAX:
            # Complete up to the server's time for these types; keep an overlap for late indexing.
            for e in types:
                nxt[e] = max(since[e], floor)
            if focus is None:
                return PollResult(events, _cursor(nxt))
            nxt[focus] = self._walk_end(nxt[focus], started)
            later = c.entities[c.entities.index(focus) + 1 :]
            if later:
                return PollResult(events, _cursor(nxt, focus=later[0], started=started), more=True)
            return PollResult(events, _cursor(nxt))
        if focus is None:
            return PollResult(events, _cursor(since, focus=c.entities[0], started=started), more=True)
        if newest.get(focus, since[focus]) > since[focus]:
            nxt[focus] = newest[focus]
            return PollResult(events, _cursor(nxt, focus=focus, started=started), more=True)
        # A thousand changes of one type within one second: page through the query endpoint.
        return await self._query_page({"pos": {"entity": focus, "skip": 0}}, since, started)

    def _walk_end(self, t: datetime, started: float) -> datetime:
        """Where a type's ``since`` may be after a walk that began at ``started``: no later than ``overlap`` before it."""
        return min(t, datetime.fromtimestamp(started, UTC) - timedelta(seconds=self.config.overlap))

    async def _query_page(self, cur: dict[str, Any], since: dict[str, datetime], started: float) -> PollResult:
        """One page of ``select * … where MetaData.LastUpdatedTime >= since ORDERBY MetaData.LastUpdatedTime``.

        Keyset paging: the next page starts at the newest time seen, skipping the rows at exactly
        that time already emitted, so objects edited while we page cannot shift one out of view.
        The query endpoint shows live objects only; deletions older than CDC's 30 days are lost.
        """
        c = self.config
        pos = cur["pos"]
        entity, skip = pos["entity"], int(pos["skip"])
        ts = since[entity].astimezone(UTC).isoformat(timespec="seconds")
        active = f"{ANY_ACTIVE} and " if entity in WITH_ACTIVE else ""
        rows = await self.query(
            f"select * from {entity} where {active}MetaData.LastUpdatedTime >= '{ts}' "
            f"ORDERBY MetaData.LastUpdatedTime STARTPOSITION {skip + 1} MAXRESULTS {c.page_size}"
        )
        events = [self._from_object(entity, o, "query") for o in rows]
        nxt = dict(since)
        if len(rows) >= c.page_size:
            last = parse_time(rows[-1]["MetaData"]["LastUpdatedTime"])
            same = sum(1 for o in rows if parse_time(o["MetaData"]["LastUpdatedTime"]) == last)
            skip = skip + len(rows) if last == since[entity] else same
            nxt[entity] = last
            pos = {"entity": entity, "skip": skip}
            return PollResult(events, {**_cursor(nxt, started=started), "pos": pos}, more=True)
        # Swept to the present: CDC takes over for this type; go on with the next type if one lags.
        floor = datetime.now(UTC) - timedelta(seconds=c.overlap)
        nxt[entity] = self._walk_end(max(since[entity], floor), started)
        later = c.entities[c.entities.index(entity) + 1 :]
        if later:
            return PollResult(events, _cursor(nxt, focus=later[0], started=started), more=True)
        return PollResult(events, _cursor(nxt))

    async def reconcile(self, since: float | None, cursor: Any) -> ReconcilePage:
        """One page of every live object changed since ``since`` (epoch seconds; None = all).

        integrand's ``ReconcilingSource.reconcile``: the query endpoint ordered by
        ``MetaData.LastUpdatedTime``, ``page_size`` at a time, type after type; the cursor is
        ``{"entity", "start"}``. Each object comes back as the Event a change to it produces
        (same ids as CDC), so the caller keeps only what it has not seen.
        """
        c = self.config
        pos: dict[str, Any] = cursor if isinstance(cursor, dict) else {"entity": c.entities[0], "start": 1}
        entity, start = str(pos["entity"]), int(pos["start"])
        # Inactive customers too: a deactivation whose webhook was dropped is exactly what this must find.
        where = [ANY_ACTIVE] if entity in WITH_ACTIVE else []
        if since is not None:
            when = datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")
            where.append(f"MetaData.LastUpdatedTime >= '{when}'")
        clause = f" where {' and '.join(where)}" if where else ""
        rows = await self.query(
            f"select * from {entity}{clause} ORDERBY MetaData.LastUpdatedTime "
            f"STARTPOSITION {start} MAXRESULTS {c.page_size}"
        )
        events = [self._from_object(entity, o, "query") for o in rows]
        if len(rows) >= c.page_size:
            return ReconcilePage(events, {"entity": entity, "start": start + len(rows)}, more=True)
        later = c.entities[c.entities.index(entity) + 1 :] if entity in c.entities else []
        if later:
            return ReconcilePage(events, {"entity": later[0], "start": 1}, more=True)
        return ReconcilePage(events, None, more=False)

    def _from_object(self, entity: str, obj: dict[str, Any], via: str) -> Event:
        meta = obj.get("MetaData") or {}
        updated = meta.get("LastUpdatedTime", "")
        sync = obj.get("SyncToken")
        if obj.get("status") == "Deleted":
            op, body = "Delete", None
        elif str(sync) == "0":
            op, body = "Create", obj
        else:
            op, body = "Update", obj
        ch: dict[str, Any] = {
            "realm": self.config.realm_id,
            "entity": entity,
            "id": str(obj.get("Id")),
            "operation": op,
            "lastUpdated": updated,
            "object": body,
        }
        if sync is not None:
            # Timestamps have one-second resolution; the SyncToken tells two changes in one second apart.
            ch["_id"] = content_id("qbo", ch["realm"], entity, ch["id"], "sync", str(sync))
        return self._event(ch, self.ctx.name, via=via)

    # --- sink -----------------------------------------------------------------------------------

    async def deliver(self, event: Event) -> None:
        """Create, or sparse-update by ``Id`` (or by ``match_field``), with the current SyncToken.

        ``requestid`` is derived from the event's idempotency key, so a redelivery after a crash
        replays Intuit's first answer instead of writing twice; each SyncToken retry gets its own
        suffix because a replayed stale-token answer would otherwise come back forever.
        """
        entity = self.config.entity or event.entity
        if not entity:
            raise PermanentError("no QuickBooks entity: set `entity` on the sink or route events that carry one")
        body = event.data.get("object") if isinstance(event.data, dict) and "object" in event.data else event.data
        if not isinstance(body, dict):
            raise PermanentError(f"a {entity} must be a JSON object, got {type(body).__name__}")
        body = {k: v for k, v in body.items() if k not in ("MetaData", "domain", "time")}
        base = hashlib.sha256(event.key.encode()).hexdigest()[:32]
        path = entity.lower()
        target_id = str(body["Id"]) if body.get("Id") else None
        match = self.config.match_field
        value = _dig(body, match) if match else None
        if target_id is None and match and value not in (None, ""):
            # Dotted paths name a field inside an object (PrimaryEmailAddr.Address); Intuit's query
            # language filters on the top-level field (PrimaryEmailAddr = '…'). Unconfirmed for every
            # entity: see the Accounting API reference of the entity's filterable fields.
            field = match.split(".", 1)[0]
            quoted = str(value).replace("'", "\\'")
            active = f" and {ANY_ACTIVE}" if entity in WITH_ACTIVE else ""
            # An inactive match is still the record to update (reactivate), not a reason to create a twin.
            rows = await self.query(f"select * from {entity} where {field} = '{quoted}'{active} MAXRESULTS 1")
            if rows:
                target_id = str(rows[0]["Id"])
        if target_id is None:
            body.pop("SyncToken", None)
            await self.call("POST", path, {"requestid": f"{base}-c"}, body)
            return
        for attempt in range(self.config.max_stale_retries + 1):
            current = (await self.call("GET", f"{path}/{target_id}")).get(entity) or {}
            payload = {**body, "Id": target_id, "SyncToken": str(current.get("SyncToken", "0")), "sparse": True}
            try:
                await self.api("POST", path, {"requestid": f"{base}-u{attempt}"}, payload)
                return
            except QuickBooksFault as f:
                if f.code != STALE_OBJECT:
                    raise fault_error(f, self.config.throttle_wait) from None
                self.log.info("stale SyncToken for %s %s (attempt %d); re-reading", entity, target_id, attempt + 1)
        raise RetryableError(f"{entity} {target_id} kept changing under us (stale SyncToken {attempt + 1} times)")

    # --- integrand auth -------------------------------------------------------------------------

    async def authorize(self, ask: Callable[[str], Awaitable[str]], say: Callable[[str], None]) -> str:
        """The authorization-code flow once, on the command line: print the URL, take the redirect back."""
        c = self.config
        state = secrets.token_urlsafe(16)
        url = (
            c.authorize_url
            + "?"
            + urlencode(
                {
                    "client_id": c.client_id.reveal(),
                    "response_type": "code",
                    "scope": SCOPE,
                    "redirect_uri": c.redirect_uri,
                    "state": state,
                }
            )
        )
        say("Open this URL in a browser, approve access to the QuickBooks company, then paste the")
        say("address your browser was redirected to (it starts with the redirect_uri):")
        say(url)
        answer = (await ask("redirected URL: ")).strip()
        q = parse_qs(urlsplit(answer).query)
        if q.get("state", [""])[0] != state:
            raise AuthError("the pasted URL's state does not match this request (paste the newest redirect)")
        if "error" in q:
            raise AuthError(f"QuickBooks refused: {q['error'][0]}")
        code = q.get("code", [""])[0]
        realm = q.get("realmId", [""])[0] or None
        if not code:
            raise AuthError("the pasted URL carries no code")
        if realm and realm != c.realm_id:
            raise AuthError(f"you connected company {realm}, but this connector is configured for realm {c.realm_id}")
        tokens = await self.tokens.exchange_code(self.ctx.http, code, c.redirect_uri, realm)
        days = (tokens.refresh_expires_at - time.time()) / 86400
        return (
            f"tokens for realm {c.realm_id} stored (encrypted); refresh token valid for {days:.0f} days, renewed on use"
        )


def _settle(
    by_id: dict[str, list[asyncio.Future[dict[str, Any] | None]]],
    *,
    found: dict[str, dict[str, Any]] | None = None,
    error: Exception | None = None,
) -> None:
    """Resolve waiting fetches (those not already resolved) with their object or the error."""
    for id_, futs in by_id.items():
        for f in futs:
            if f.done():
                continue
            if error is not None:
                f.set_exception(error)
            else:
                f.set_result((found or {}).get(id_))


def _dig(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _from_legacy(realm: str, ent: Any) -> dict[str, Any]:
    if not isinstance(ent, dict) or not ent.get("name") or not ent.get("id") or not ent.get("operation"):
        raise PayloadError("each entity needs name, id and operation")
    ch: dict[str, Any] = {
        "realm": realm,
        "entity": str(ent["name"]),
        "id": str(ent["id"]),
        "operation": str(ent["operation"]),
        "lastUpdated": ent.get("lastUpdated"),
    }
    merged = ent.get("deletedId") or ent.get("deletedID") or ent.get("mergedId")
    if merged is not None:
        ch["mergedId"] = str(merged)  # field casing unconfirmed in Intuit's docs: accept the spellings seen
    _check_time(ch)
    return ch


def _from_cloudevent(ce: Any) -> dict[str, Any]:
    if not isinstance(ce, dict):
        raise PayloadError("each CloudEvent must be an object")
    parts = str(ce.get("type", "")).split(".")
    # qbo.<entity>.<verb>.v1
    if len(parts) < 3 or parts[0] != "qbo" or parts[2] not in VERB_TO_OP:
        raise PayloadError(f"unexpected CloudEvent type {ce.get('type')!r}")
    if not ce.get("intuitentityid") or not ce.get("intuitaccountid") or not ce.get("id"):
        raise PayloadError("CloudEvent lacks id, intuitentityid or intuitaccountid")
    entity = _ENTITY_CASE.get(parts[1], parts[1][:1].upper() + parts[1][1:])
    ch: dict[str, Any] = {
        "realm": str(ce["intuitaccountid"]),
        "entity": entity,
        "id": str(ce["intuitentityid"]),
        "operation": VERB_TO_OP[parts[2]],
        "lastUpdated": ce.get("time"),
        "_id": "ce_" + str(ce["id"]),
    }
    raw = ce.get("data")
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    merged = data.get("deletedId") or data.get("mergedId")
    if merged is not None:
        ch["mergedId"] = str(merged)
    _check_time(ch)
    return ch


def _check_time(ch: dict[str, Any]) -> None:
    if ch.get("lastUpdated") is None:
        return
    try:
        parse_time(str(ch["lastUpdated"]))
    except ValueError:
        raise PayloadError(f"cannot read lastUpdated {ch['lastUpdated']!r}") from None


_ENTITY_CASE = {
    e.lower(): e
    for e in (
        "Account",
        "Bill",
        "BillPayment",
        "Class",
        "CreditMemo",
        "Customer",
        "Department",
        "Deposit",
        "Employee",
        "Estimate",
        "Invoice",
        "Item",
        "JournalEntry",
        "Payment",
        "PaymentMethod",
        "Purchase",
        "PurchaseOrder",
        "RefundReceipt",
        "SalesReceipt",
        "TaxAgency",
        "Term",
        "TimeActivity",
        "Transfer",
        "Vendor",
        "VendorCredit",
    )
}


def _since_from(cursor: Any, entities: Sequence[str], default: datetime) -> dict[str, datetime]:
    got = (cursor or {}).get("since", {}) if isinstance(cursor, dict) else {}
    return {e: parse_time(got[e]) if e in got else default for e in entities}


def _cursor(since: dict[str, datetime], focus: str | None = None, started: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"since": {e: t.astimezone(UTC).isoformat(timespec="seconds") for e, t in since.items()}}
    if focus:
        out["focus"] = focus
    if started is not None:
        out["started"] = started
    return out


__all__ = ["QuickBooksConfig", "QuickBooksConnector", "QuickBooksFault", "fault_error"]
