"""The ``salesforce`` connector: SOQL polling with deletes, reconciliation, enrichment, and an upsert sink.

Facts it relies on are in /work/shared/reference/third-party-apis.md (Salesforce section); the
Salesforce pages are cited where a behaviour depends on them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import orjson

from integrand.connector import (
    AuthError,
    Connector,
    Enricher,
    Event,
    PayloadError,
    PermanentError,
    PollingSource,
    PollResult,
    ReconcilePage,
    ReconcilingSource,
    RetryableError,
    SignatureError,
    Sink,
    WebhookOutcome,
    WebhookReply,
    WebhookRequest,
    WebhookSource,
    content_id,
)

from ._time import parse_time, record_time, soql_time, version_of
from .auth import AuthSettings, SessionManager, shared_manager
from .client import RETRYABLE_CODES, SalesforceApiError, SalesforceClient, shared_client
from .config import SalesforceConfig
from .outbound import OutboundMessage, ack, fault, parse_notifications

SYSTEM_FIELDS = frozenset({"Id", "IsDeleted", "CreatedDate", "LastModifiedDate", "SystemModstamp", "attributes"})
DELETED_WINDOW = timedelta(days=15)  # getDeleted reaches 15 days back (less if the recycle bin was purged)


class SalesforceConnector(Connector[SalesforceConfig], WebhookSource, PollingSource, ReconcilingSource, Enricher, Sink):
    """Salesforce: Outbound Messages, SOQL polling with deletes, reconciliation, record fetches, and upserts."""

    Config = SalesforceConfig
    batch_size = 200
    page_size = 2000

    client: SalesforceClient
    sessions: SessionManager

    async def start(self) -> None:
        c = self.config
        identity = (c.login_host, c.client_id.reveal(), c.username or c.my_domain_url or "", c.auth)
        settings = AuthSettings(
            grant=c.auth,
            token_url=c.login_host + "/services/oauth2/token",
            client_id=c.client_id.reveal(),
            audience=c.audience,
            client_secret=c.client_secret.reveal() if c.client_secret else None,
            username=c.username,
            private_key=c.private_key.reveal() if c.private_key else None,
            refresh_token=c.refresh_token.reveal() if c.refresh_token else None,
            token_keys=tuple(k.reveal() for k in c.token_key),
        )
        self.sessions = shared_manager(
            identity, self.ctx.state, lambda: SessionManager(settings, self.ctx.state, clock=self.ctx.clock)
        )
        rate_key = "salesforce:" + ":".join(identity[:3])
        self.client = shared_client(
            identity,
            lambda: SalesforceClient(
                sessions=self.sessions,
                api_version=c.api_version,
                rate_key=rate_key,
                max_concurrent=c.max_concurrent,
                daily_limit_wait=c.daily_limit_wait,
                concurrent_limit_wait=c.concurrent_limit_wait,
                call_options=f"client={c.client_name}" if c.client_name else None,
                timeout=c.timeout,
                clock=self.ctx.clock,
            ),
        )
        # No automatic resends under the org's key: the poller and dispatcher retry with their own backoff.
        self.ctx.http.limit(rate_key, retries=0)

    async def authorize(self, ask: Callable[[str], Awaitable[str]], say: Callable[[str], None]) -> str:
        """``integrand auth NAME``: the web-server flow once, in a terminal, for the refresh-token grant.

        Prints the authorize URL (with PKCE's code_challenge and a state), takes the address the browser
        was sent back to, exchanges the code and stores the refresh token encrypted (``token_key``)."""
        c = self.config
        if c.auth != "refresh_token":
            raise AuthError(f"auth = {c.auth!r} signs in by itself; only auth = 'refresh_token' needs `integrand auth`")
        verifier = secrets.token_urlsafe(64)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state = secrets.token_urlsafe(16)
        query = {
            "response_type": "code",
            "client_id": c.client_id.reveal(),
            "redirect_uri": c.redirect_uri,
            "scope": c.oauth_scopes,
            "state": state,
            "code_challenge": challenge,
        }
        url = f"{c.login_host}/services/oauth2/authorize?{urlencode(query)}"
        say("Open this URL in a browser, log in as the integration user and allow access, then paste the")
        say("address your browser was sent to (it starts with the redirect_uri; the page itself may not load):")
        say(url)
        answer = (await ask("redirected URL: ")).strip()
        q = parse_qs(urlsplit(answer).query)
        if "error" in q:
            raise AuthError(f"Salesforce refused: {q['error'][0]}: {q.get('error_description', [''])[0]}")
        if q.get("state", [""])[0] != state:
            raise AuthError("the pasted URL's state does not match this request (paste the newest redirect)")
        code = q.get("code", [""])[0]
        if not code:
            raise AuthError("the pasted URL carries no code")
        session = await self.sessions.exchange_code(self.ctx.http, code, c.redirect_uri, verifier)
        if c.org_id and session.org_id and session.org_id[:15] != c.org_id[:15]:
            raise AuthError(f"you authorized org {session.org_id}, but this connector is configured for {c.org_id}")
        return (
            f"refresh token for org {session.org_id or '?'} stored (encrypted with token_key); "
            f"sessions now come from it (instance {session.instance_url})"
        )

    async def call(self, method: str, rest: str, **kw: Any) -> Any:
        """One REST call under ``/services/data/vXX.X/``; the parsed JSON body (None for 204)."""
        res = await self.client.request(self.ctx.http, method, self.client.api_path(rest), **kw)
        return orjson.loads(res.body) if res.body else None

    # --- reading ----------------------------------------------------------------------------------

    def select(self, sobject: str) -> str:
        """The field list: configured per object, else ``FIELDS(STANDARD)`` (allowed without a LIMIT)."""
        wanted = self.config.fields.get(sobject)
        if not wanted:
            return "FIELDS(STANDARD)"
        return ", ".join(dict.fromkeys(["Id", "SystemModstamp", "CreatedDate", "IsDeleted", *wanted]))

    async def query_page(self, soql: str | None, next_url: str | None, *, all_rows: bool) -> dict[str, Any]:
        """The first page of ``soql`` or the page at ``next_url`` (a ``nextRecordsUrl``)."""
        headers = {"Sforce-Query-Options": f"batchSize={self.config.page_size}"}
        if next_url:
            res = await self.client.request(self.ctx.http, "GET", next_url, headers=headers)
        else:
            path = self.client.api_path("queryAll" if all_rows else "query")
            res = await self.client.request(self.ctx.http, "GET", path, params={"q": soql or ""}, headers=headers)
        body = orjson.loads(res.body)
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            raise PermanentError(f"unexpected query answer from {res.url}: {res.body[:200]!r}")
        return body

    def record_event(self, sobject: str, rec: dict[str, Any], via: str) -> Event:
        """A record as the event a change to it produces: id from (object, Id, SystemModstamp), so reads dedup."""
        data = {k: v for k, v in rec.items() if k != "attributes"}
        rid = str(data["Id"])
        stamp = str(data.get("SystemModstamp") or data.get("LastModifiedDate") or "")
        version = version_of(parse_time(stamp)) if stamp else None
        deleted = bool(data.get("IsDeleted"))
        if deleted:
            verb = "deleted"
        elif data.get("CreatedDate") and data.get("CreatedDate") == stamp:
            verb = "created"
        else:
            verb = "updated"
        ev_id = content_id("sf", sobject, rid, "deleted" if deleted else "", version or "")
        return Event(
            id=ev_id,
            source=self.ctx.name,
            type=f"{sobject.lower()}.{verb}",
            data=data,
            entity=sobject,
            entity_id=rid,
            version=version,
            occurred_at=version,
            meta={"via": via, **({"deleted": True} if deleted else {})},
        )

    def deleted_event(self, sobject: str, rid: str, deleted_at: str, via: str) -> Event:
        version = version_of(parse_time(deleted_at))
        return Event(
            id=content_id("sf", sobject, rid, "deleted", version),
            source=self.ctx.name,
            type=f"{sobject.lower()}.deleted",
            data={"Id": rid, "IsDeleted": True, "SystemModstamp": deleted_at},
            entity=sobject,
            entity_id=rid,
            version=version,
            occurred_at=version,
            meta={"via": via, "deleted": True},
        )

    # --- Outbound Messages (a webhook) ---------------------------------------------------------------

    def verify(self, request: WebhookRequest, now: float) -> None:
        """Outbound Messages carry no signature: the URL token (if configured), then the organization id."""
        c = self.config
        if c.outbound_token is not None:
            given = parse_qs(urlsplit(request.url).query).get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), c.outbound_token.reveal().encode()):
                raise SignatureError("missing or wrong ?token= in the Outbound Message endpoint URL")
        if c.org_id is None:
            raise SignatureError("this salesforce source has no org_id to check Outbound Messages against")
        msg = self._message(request)
        # Ids compare on their 15 case-sensitive characters; the 18-character form adds a checksum.
        if msg.organization_id[:15] != c.org_id[:15]:
            raise SignatureError(f"Outbound Message from organization {msg.organization_id}, not {c.org_id}")
        if c.outbound_actions and msg.action_id not in c.outbound_actions:
            raise SignatureError(f"Outbound Message action {msg.action_id} is not in outbound_actions")

    def _message(self, request: WebhookRequest) -> OutboundMessage:
        return parse_notifications(request.body, request.content_type)

    def parse(self, request: WebhookRequest) -> list[Event]:
        """One thin event per notification (route with ``enrich = true``: the record is fetched before delivery).

        The id is the record version's (object, Id, SystemModstamp) when the message carries
        SystemModstamp, so a notification and a poll of the same change are one event; otherwise the
        notification Id, which Salesforce keeps across its retries.
        """
        msg = self._message(request)
        events = []
        for n in msg.notifications:
            rid = str(n.fields["Id"])
            stamp = n.fields.get("SystemModstamp") or n.fields.get("LastModifiedDate")
            try:
                version = version_of(parse_time(str(stamp))) if stamp else None
            except (ValueError, OverflowError):  # Outbound Messages are unsigned: anyone may send one
                raise PayloadError(f"Notification {n.id}: {stamp!r} is not a Salesforce date-time") from None
            ev_id = content_id("sf", n.sobject, rid, "", version) if version else "om_" + n.id
            created = stamp and n.fields.get("CreatedDate") == stamp
            events.append(
                Event(
                    id=ev_id,
                    source=request.source,
                    type=f"{n.sobject.lower()}.{'created' if created else 'updated'}",
                    data=n.fields,
                    received_at=request.received_at,
                    entity=n.sobject,
                    entity_id=rid,
                    version=version,
                    occurred_at=version,
                    meta={"via": "outbound", "notification": n.id, "action": msg.action_id, "thin": True},
                )
            )
        return events

    def reply(self, outcome: WebhookOutcome) -> WebhookReply:
        """``<Ack>true</Ack>`` once the notifications are committed (duplicates too); a SOAP Fault otherwise."""
        if outcome.committed:
            return WebhookReply(200, ack(True), "text/xml")
        reason = outcome.reason or f"HTTP {outcome.status}"
        return WebhookReply(outcome.status, fault(reason, client=outcome.status < 500), "text/xml")

    # --- polling ------------------------------------------------------------------------------------

    async def poll(self, cursor: Any) -> PollResult:
        """integrand's ``PollingSource.poll``: one page of one object's changes since its cursor.

        ``SELECT … FROM obj WHERE SystemModstamp > since ORDER BY SystemModstamp, Id``
        (``queryAll`` with ``include_deleted``, so deletions arrive in order with the changes), paged
        by ``nextRecordsUrl``; the locator is in the cursor, so a restart resumes mid-query (a locator
        that expired restarts the object's query). SystemModstamp is set when a transaction starts,
        so a long transaction can commit a row older than one already seen: ``since`` advances only to
        the query's start minus ``overlap``, so the last seconds are read again (stable event ids make
        that free) and settled rows never are. Every ``deleted_check`` seconds
        ``getDeleted`` catches hard deletes and purges; a window it can no longer cover means a
        logged full resync of that object, not a silent gap.
        """
        c = self.config
        cur: dict[str, Any] = dict(cursor) if isinstance(cursor, dict) else {}
        now = datetime.fromtimestamp(self.ctx.clock(), UTC)
        since: dict[str, str | None] = dict(cur.get("since") or {})
        for obj in c.objects:
            if obj not in since:
                since[obj] = (
                    None if c.initial_lookback == "all" else soql_time(now - timedelta(seconds=c.initial_lookback))
                )
        page = cur.get("page")
        if isinstance(page, dict) and page.get("object") in c.objects:
            obj = str(page["object"])
        else:
            obj = str(cur["focus"]) if cur.get("focus") in c.objects else c.objects[0]
        paging = page if isinstance(page, dict) and page.get("object") == obj else None
        body, started = await self._poll_page(obj, since, paging, now)
        events = [self.record_event(obj, r, "poll") for r in body["records"]]
        nxt: dict[str, Any] = {"since": since, "deleted": dict(cur.get("deleted") or {})}
        if "deleted_checked" in cur:
            nxt["deleted_checked"] = cur["deleted_checked"]
        if "resyncs" in cur:
            nxt["resyncs"] = cur["resyncs"]
        if not body.get("done", True) and body.get("nextRecordsUrl"):
            nxt["page"] = {"object": obj, "url": body["nextRecordsUrl"], "started": started}
            return self._result(events, nxt, more=True)
        # Rows older than the query's start minus the overlap were committed when it ran: settled.
        settled = datetime.fromtimestamp(started, UTC) - timedelta(seconds=c.overlap)
        prev = since.get(obj)
        since[obj] = soql_time(max(parse_time(prev), settled) if prev else settled)
        later = c.objects[c.objects.index(obj) + 1 :]
        if later:
            nxt["focus"] = later[0]
            return self._result(events, nxt, more=True)
        events += await self._check_deleted(nxt, now)
        return self._result(events, nxt, more=False)

    async def _poll_page(
        self, obj: str, since: dict[str, str | None], page: dict[str, Any] | None, now: datetime
    ) -> tuple[dict[str, Any], float]:
        """The next page of ``obj``'s query (from the cursor's locator, or a new query) and when that query began."""
        c = self.config
        if page is not None and page.get("url"):
            try:
                body = await self.query_page(None, str(page["url"]), all_rows=c.include_deleted)
                return body, float(page.get("started") or now.timestamp())
            except PermanentError as e:
                if "INVALID_QUERY_LOCATOR" not in str(e):
                    raise
                self.log.info("query locator for %s expired; restarting that object's query from its cursor", obj)
        where = f" WHERE SystemModstamp > {since[obj]}" if since.get(obj) else ""
        soql = f"SELECT {self.select(obj)} FROM {obj}{where} ORDER BY SystemModstamp, Id"
        return await self.query_page(soql, None, all_rows=c.include_deleted), now.timestamp()

    async def _check_deleted(self, cur: dict[str, Any], now: datetime) -> list[Event]:
        """``getDeleted`` per object, every ``deleted_check`` s, from where the last check ended."""
        c = self.config
        last = float(cur.get("deleted_checked", 0))
        if now.timestamp() - last < c.deleted_check:
            return []
        marks: dict[str, str] = cur["deleted"]
        events: list[Event] = []
        floor = now - DELETED_WINDOW + timedelta(minutes=1)
        for obj in c.objects:
            first = obj not in marks
            if first:
                # First check: from where this source's reading began (queryAll saw deletions since then).
                began = cur["since"].get(obj)
                marks[obj] = soql_time(max(parse_time(began), floor) if began else floor)
            mark = parse_time(marks[obj])
            start = max(mark, floor)
            end = now
            if end - start < timedelta(minutes=1):
                continue  # getDeleted works in whole minutes
            body = await self.call(
                "GET",
                f"sobjects/{obj}/deleted/",
                params={"start": soql_time(start), "end": soql_time(end)},
            )
            if not isinstance(body, dict):
                raise PermanentError(f"unexpected getDeleted answer for {obj}: {body!r}"[:300])
            earliest = body.get("earliestDateAvailable")
            if not first and (mark < floor or (earliest and parse_time(str(earliest)) > mark)):
                # Deletions between our mark and what Salesforce still lists are beyond reach.
                self.log.warning(
                    "Salesforce can list %s deletions only from %s, but this source last checked at %s: "
                    "deletions in between may be missed; starting a full resync of %s",
                    obj,
                    earliest,
                    record_time(mark),
                    obj,
                )
                cur["since"][obj] = None
                cur.setdefault("resyncs", {})[obj] = record_time(now)
            for d in body.get("deletedRecords") or []:
                events.append(self.deleted_event(obj, str(d["id"]), str(d["deletedDate"]), "getDeleted"))
            covered = body.get("latestDateCovered")
            marks[obj] = soql_time(parse_time(str(covered))) if covered else soql_time(end)
        cur["deleted_checked"] = now.timestamp()
        return events

    def _result(self, events: list[Event], cursor: dict[str, Any], *, more: bool) -> PollResult:
        b = self.client.budget
        return PollResult(
            events,
            cursor,
            more=more,
            budget_remaining=b.remaining,
            budget_limit=b.limit,
            budget_reset=86400.0 if b.limit is not None else None,  # a rolling 24-hour allocation
        )

    # --- reconciliation -----------------------------------------------------------------------------

    async def reconcile(self, since: float | None, cursor: Any) -> ReconcilePage:
        """integrand's ``ReconcilingSource.reconcile``: every record (``queryAll``: deleted ones in the
        recycle bin too) changed since ``since``, one query page at a time, object after object."""
        c = self.config
        pos: dict[str, Any] = cursor if isinstance(cursor, dict) else {"object": c.objects[0]}
        obj = str(pos.get("object", c.objects[0]))
        if pos.get("url"):
            body = await self.query_page(None, str(pos["url"]), all_rows=True)
        else:
            where = f" WHERE SystemModstamp >= {soql_time(datetime.fromtimestamp(since, UTC))}" if since else ""
            body = await self.query_page(
                f"SELECT {self.select(obj)} FROM {obj}{where} ORDER BY SystemModstamp, Id", None, all_rows=True
            )
        events, deleted = [], []
        for r in body["records"]:
            if r.get("IsDeleted"):
                deleted.append((obj, str(r["Id"])))
            else:
                events.append(self.record_event(obj, r, "reconcile"))
        if not body.get("done", True) and body.get("nextRecordsUrl"):
            return ReconcilePage(events, {"object": obj, "url": body["nextRecordsUrl"]}, more=True, deleted=deleted)
        later = c.objects[c.objects.index(obj) + 1 :] if obj in c.objects else []
        if later:
            return ReconcilePage(events, {"object": later[0]}, more=True, deleted=deleted)
        return ReconcilePage(events, None, more=False, deleted=deleted)

    # --- enrichment ---------------------------------------------------------------------------------

    async def fetch(self, event: Event) -> Event:
        [one] = await self.fetch_many([event])
        if isinstance(one, BaseException):
            raise one
        return one

    async def fetch_many(self, events: Sequence[Event]) -> list[Event | BaseException]:
        """The records as they are now, through sObject Collections retrieve (≤ 2,000 ids a call per type)."""
        out: list[Event | BaseException | None] = [None] * len(events)
        wanted: dict[str, list[int]] = {}
        for i, ev in enumerate(events):
            if ev.meta.get("deleted") or ev.meta.get("fetched") or not ev.entity or not ev.entity_id:
                out[i] = ev
            else:
                wanted.setdefault(ev.entity, []).append(i)
        for sobject, idx in wanted.items():
            fields = self.config.fields.get(sobject) or await self._describe_fields(sobject)
            ids = [str(events[i].entity_id) for i in idx]
            try:
                rows = await self.call(
                    "GET",
                    f"composite/sobjects/{sobject}",
                    params={"ids": ",".join(ids), "fields": ",".join(dict.fromkeys(["Id", "SystemModstamp", *fields]))},
                )
            except Exception as e:
                for i in idx:
                    out[i] = e
                continue
            for i, row in zip(idx, rows or [], strict=False):
                ev = events[i]
                if row is None:
                    out[i] = self.deleted_event(sobject, str(ev.entity_id), record_time(datetime.now(UTC)), "fetch")
                    out[i] = _same_identity(ev, out[i])  # type: ignore[arg-type]
                    continue
                full = self.record_event(sobject, row, str(ev.meta.get("via", "fetch")))
                out[i] = _same_identity(ev, full)
        return [o if o is not None else RetryableError("no answer for this record") for o in out]

    async def _describe_fields(self, sobject: str) -> list[str]:
        """Every field of the object (describe), cached: a thin event's fetch gets the whole record."""
        cache: dict[str, list[str]] = self.__dict__.setdefault("_fields_cache", {})
        if sobject not in cache:
            body = await self.call("GET", f"sobjects/{sobject}/describe")
            cache[sobject] = [str(f["name"]) for f in (body or {}).get("fields", [])] or ["Name"]
        return cache[sobject]

    # --- sink ---------------------------------------------------------------------------------------

    def _target(self, event: Event) -> tuple[str, str]:
        obj = self.config.object or event.entity
        ext = self.config.external_id_field
        if not obj:
            raise PermanentError("no Salesforce object: set `object` on the sink or route events that carry an entity")
        if not ext:
            raise PermanentError("set `external_id_field` on the Salesforce sink (upserts match on an external id)")
        return obj, ext

    def _record(self, event: Event, ext: str) -> dict[str, Any]:
        data = event.data.get("record") if isinstance(event.data, dict) and "record" in event.data else event.data
        if not isinstance(data, dict):
            raise PermanentError(f"a Salesforce record must be a JSON object, got {type(data).__name__}")
        rec = {k: v for k, v in data.items() if k not in SYSTEM_FIELDS}
        if rec.get(ext) in (None, ""):
            raise PermanentError(f"the record has no {ext} (the external id field the sink upserts on)")
        return rec

    @staticmethod
    def _is_delete(event: Event) -> bool:
        d = event.data if isinstance(event.data, dict) else {}
        return bool(event.meta.get("deleted") or event.type.endswith(".deleted") or d.get("IsDeleted"))

    async def deliver(self, event: Event) -> None:
        """Upsert one record by external id (201 created, 200/204 updated; 300 several matches), or delete it."""
        await self.deliver_result(event)

    async def deliver_result(self, event: Event) -> dict[str, Any] | None:
        """``deliver``, returning the record's Salesforce ``id`` (and ``created``) when the answer carries them."""
        obj, ext = self._target(event)
        rec = self._record(event, ext)
        value = quote(str(rec[ext]), safe="")
        path = self.client.api_path(f"sobjects/{obj}/{ext}/{value}")
        if self._is_delete(event):
            try:
                await self.client.request(self.ctx.http, "DELETE", path)
            except PermanentError as e:
                if "NOT_FOUND" not in str(e) and "ENTITY_IS_DELETED" not in str(e):
                    raise
            return None
        body = {k: v for k, v in rec.items() if k != ext}
        res = await self.client.request(self.ctx.http, "PATCH", path, json=body, ok=(200, 201, 204, 300))
        if res.status == 300:
            urls = orjson.loads(res.body) if res.body else []
            ids = [str(u).rsplit("/", 1)[-1] for u in urls] if isinstance(urls, list) else []
            raise PermanentError(f"{obj}.{ext} = {rec[ext]!r} matches several records {ids}; nothing was changed")
        out: dict[str, Any] = {ext: rec[ext]}
        if res.body:  # 201 (and 200 since API 46) carry {"id", "success", "created"}; 204 carries nothing
            with contextlib.suppress(orjson.JSONDecodeError):
                answer = orjson.loads(res.body)
                if isinstance(answer, dict) and answer.get("id"):
                    out.update(id=str(answer["id"]), created=bool(answer.get("created")))
        return out

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        """sObject Collections upserts, ≤ 200 records of one type per call with ``allOrNone=false``.

        Salesforce answers 200 even when records fail; each record's result decides its own fate:
        success → done, a transient statusCode (a row lock) → retry, anything else → dead-letter with
        the code, message and fields. Deletes go one by one (idempotent: already gone is done).
        """
        results: list[BaseException | None] = [None] * len(events)
        groups: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        for i, ev in enumerate(events):
            try:
                obj, ext = self._target(ev)
                rec = self._record(ev, ext)
            except PermanentError as e:
                results[i] = e
                continue
            if self._is_delete(ev):
                try:
                    await self.deliver(ev)
                except Exception as e:
                    results[i] = e
                continue
            groups.setdefault((obj, ext), []).append((i, rec))
        for (obj, ext), items in groups.items():
            for chunk in _chunks_unique(items, ext, self.config.batch_size):
                await self._upsert_chunk(obj, ext, chunk, results)
        return results

    async def _upsert_chunk(
        self, obj: str, ext: str, chunk: list[tuple[int, dict[str, Any]]], results: list[BaseException | None]
    ) -> None:
        payload = {"allOrNone": False, "records": [{"attributes": {"type": obj}, **rec} for _, rec in chunk]}
        try:
            answer = await self.call("PATCH", f"composite/sobjects/{obj}/{ext}", json=payload)
        except Exception as e:
            for i, _ in chunk:
                results[i] = e
            return
        if not isinstance(answer, list) or len(answer) != len(chunk):
            err = RetryableError(
                f"sObject Collections answered {len(answer) if isinstance(answer, list) else answer!r} results for {len(chunk)} records"
            )
            for i, _ in chunk:
                results[i] = err
            return
        for (i, rec), res in zip(chunk, answer, strict=True):
            if isinstance(res, dict) and res.get("success"):
                continue
            errors = res.get("errors") if isinstance(res, dict) else None
            results[i] = record_error(obj, ext, rec.get(ext), errors if isinstance(errors, list) else [])


def record_error(obj: str, ext: str, value: Any, errors: list[dict[str, Any]]) -> Exception:
    """One failed record of a collection: retry if every error is transient, else give up with all of them."""
    codes = [str(e.get("statusCode", "")) for e in errors]
    detail = "; ".join(
        f"{e.get('statusCode')}: {e.get('message')}" + (f" {e['fields']}" if e.get("fields") else "") for e in errors
    )
    msg = f"Salesforce refused {obj} {ext}={value!r}: {detail or 'no error given'}"
    if codes and all(c in RETRYABLE_CODES for c in codes):
        return RetryableError(msg)
    return PermanentError(msg)


def _chunks_unique(
    items: list[tuple[int, dict[str, Any]]], ext: str, size: int
) -> list[list[tuple[int, dict[str, Any]]]]:
    """Chunks of at most ``size`` where no external id repeats (Salesforce refuses a duplicate in one call)."""
    chunks: list[list[tuple[int, dict[str, Any]]]] = []
    current: list[tuple[int, dict[str, Any]]] = []
    seen: set[Any] = set()
    for item in items:
        key = item[1].get(ext)
        if len(current) >= size or key in seen:
            chunks.append(current)
            current, seen = [], set()
        current.append(item)
        seen.add(key)
    if current:
        chunks.append(current)
    return chunks


def _same_identity(thin: Event, full: Event) -> Event:
    """The fetched record under the thin event's identity (id, source, entity), so dedup and order hold."""
    return Event(
        id=thin.id,
        source=thin.source,
        type=thin.type,
        data=full.data,
        received_at=thin.received_at,
        entity=thin.entity,
        entity_id=thin.entity_id,
        version=full.version or thin.version,
        occurred_at=thin.occurred_at or full.occurred_at,
        meta={**thin.meta, "fetched": True, **({"deleted": True} if full.meta.get("deleted") else {})},
    )


__all__ = ["SalesforceApiError", "SalesforceConfig", "SalesforceConnector", "record_error"]
