"""The Notes connector: one class that is a webhook source, a polling source, an enricher and a sink."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import orjson

from integrand.connector import (
    AuthError,
    Connector,
    ConnectorConfig,
    Enricher,
    Event,
    PayloadError,
    PollingSource,
    PollResult,
    ReconcilePage,
    ReconcilingSource,
    SecretValue,
    SignatureError,
    Sink,
    WebhookRequest,
    WebhookSource,
)


class NotesConfig(ConnectorConfig):
    base_url: str
    account: str
    refresh_token: SecretValue
    webhook_secret: SecretValue
    requests_per_second: float = 10.0
    page_size: int = 100


class NotesConnector(Connector[NotesConfig], WebhookSource, PollingSource, ReconcilingSource, Enricher, Sink):
    """Keeps notes in sync with the Notes API (webhooks, polling, reconciliation, writes)."""

    Config = NotesConfig
    page_size = 100

    async def start(self) -> None:
        self._access_token: str | None = None
        self._rate_key = f"notes:{self.config.account}"
        self.ctx.http.limit(self._rate_key, self.config.requests_per_second, 1.0)

    # --- authentication: the refresh token rotates, so the newest one lives in ctx.state ---

    async def _refresh(self) -> str:
        refresh = await self.ctx.state.get("refresh_token") or self.config.refresh_token.reveal()
        self.ctx.http.add_secret(refresh)
        res = await self.ctx.http.post(
            f"{self.config.base_url}/oauth/token",
            data={"grant_type": "refresh_token", "refresh_token": refresh},
            check=False,
        )
        if not res.ok:
            raise AuthError(f"the Notes API refused the refresh token: {res.text()[:200]}")
        tokens = res.json()
        self.ctx.http.add_secret(tokens["access_token"])
        self.ctx.http.add_secret(tokens["refresh_token"])
        await self.ctx.state.set("refresh_token", tokens["refresh_token"])  # before first use
        self._access_token = tokens["access_token"]
        return str(tokens["access_token"])

    async def _api(self, method: str, path: str, headers: Mapping[str, str] | None = None, **kw: Any) -> Any:
        token = self._access_token or await self._refresh()
        for attempt in (1, 2):
            try:
                res = await self.ctx.http.request(
                    method,
                    f"{self.config.base_url}{path}",
                    headers={"Authorization": f"Bearer {token}", **(headers or {})},
                    rate_key=self._rate_key,
                    **kw,
                )
            except AuthError:
                if attempt == 2:
                    raise
                token = await self._refresh()  # expired: refresh once, then give up
                continue
            return res.json()
        raise AssertionError("unreachable")

    # --- webhooks: verify the signature, then turn the thin body into events ---

    def verify(self, request: WebhookRequest, now: float) -> None:
        given = request.headers.get("X-Notes-Signature", "")
        key = self.config.webhook_secret.reveal().encode()
        want = "sha256=" + hmac.new(key, request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given, want):
            raise SignatureError("X-Notes-Signature is missing or wrong")

    def parse(self, request: WebhookRequest) -> list[Event]:
        try:
            body = orjson.loads(request.body)
            note = body["note"]
            return [self._event(note, body["type"])]
        except (orjson.JSONDecodeError, KeyError, TypeError) as e:
            raise PayloadError(f"not a Notes webhook: {e}") from None

    def sign(self, body: bytes, now: float, delivery_id: str) -> dict[str, str] | None:
        key = self.config.webhook_secret.reveal().encode()
        return {"X-Notes-Signature": "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()}

    def _event(self, note: Mapping[str, Any], kind: str = "note.updated") -> Event:
        # The same version of the same note gets the same id from a webhook, a poll or a
        # reconciliation, so the store's deduplication sees them as one change.
        return Event(
            id=f"{note['id']}:v{note['version']}",
            source=self.ctx.name,
            type=kind,
            data=dict(note),
            entity="note",
            entity_id=str(note["id"]),
            version=str(note["version"]),
        )

    # --- polling and reconciliation: the API lists changes after a change number ---

    async def poll(self, cursor: Any) -> PollResult:
        after = int((cursor or {}).get("after", 0))
        page = await self._api("GET", "/notes", params={"after": str(after), "limit": str(self.config.page_size)})
        notes = page["notes"]
        events = [self._event(n) for n in notes]
        next_cursor = {"after": notes[-1]["seq"] if notes else after}
        return PollResult(events=events, cursor=next_cursor, more=bool(page["has_more"]))

    async def reconcile(self, since: float | None, cursor: Any) -> ReconcilePage:
        # The Notes API cannot filter by time, so every reconciliation lists everything, a page at a time.
        res = await self.poll(cursor)
        return ReconcilePage(events=res.events, cursor=res.cursor, more=res.more)

    # --- enrichment: a webhook says which note changed; fetch its text before delivery ---

    async def fetch(self, event: Event) -> Event:
        note = await self._api("GET", f"/notes/{event.entity_id}")
        return Event(**{**event.to_dict(), "data": note})

    # --- the sink side: write a note, idempotently ---

    async def deliver(self, event: Event) -> None:
        note_id = event.entity_id or str(event.data["id"])
        await self._api(
            "PUT",
            f"/notes/{note_id}",
            json={"text": event.data["text"]},
            headers={"Idempotency-Key": event.key},
        )
