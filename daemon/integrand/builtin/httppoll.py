"""The ``http-poll`` source: poll any REST API that lists records "changed since" a time, page by page.

It is the reference polling connector. The cursor it owns is
``{"since": T, "page": TOKEN|null, "high": T'}``: ``since`` is the newest change
time fully read, ``page`` the provider's next-page token inside the current pass,
and ``high`` the newest change time seen so far in that pass (plus ``started``, when
a pass of several pages began, so its end never moves ``since`` past that). Each pass asks for
changes since ``since - lookback`` (providers commit late and search indexes lag);
the entity table drops what was already seen.

Items, ids, versions and page tokens are picked out of the response with JSONPath
(jsonpath-ng), so most "list changes" APIs fit without code. Optionally the same
source also accepts webhooks (``[sources.X.webhook]``), e.g. thin notifications
that nudge the next poll.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from jsonpath_ng import JSONPath
from jsonpath_ng.exceptions import JSONPathError
from jsonpath_ng.ext.parser import parse as jsonpath_parse
from pydantic import field_validator

from integrand.backoff import parse_retry_after
from integrand.builtin.webhook import WebhookConfig, WebhookConnector
from integrand.connector import (
    AuthError,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Duration,
    Event,
    PermanentError,
    PollingSource,
    PollResult,
    ReconcilePage,
    ReconcilingSource,
    RetryableError,
    SecretValue,
    SignatureError,
    WebhookRequest,
    WebhookSource,
    content_id,
)

RETRYABLE_STATUS = frozenset({408, 425, 429})


def _path(v: str | None) -> str | None:
    if v is not None:
        try:
            jsonpath_parse(v)
        except (JSONPathError, ValueError, TypeError, AttributeError) as e:  # the lexer's errors too
            raise ValueError(f"not a valid JSONPath: {v!r} ({e})") from None
    return v


class HttpPollConfig(ConnectorConfig):
    # The listing URL; "{since}" is replaced by the (URL-encoded) change time to list from.
    url: str
    # Query parameter that carries the next-page token (unless next_page yields a full URL).
    page_param: str = "page"
    # Where the listing starts on the first poll (after `integrand cursor reset`): a time or epoch seconds.
    start: str = "1970-01-01T00:00:00Z"
    # JSONPath to the list of items in a response, and to fields inside one item.
    items: str = "$.results[*]"
    id: str = "$.id"
    updated: str = "$.updated_at"
    version: str | None = None  # defaults to `updated`
    next_page: str | None = "$.next"
    deleted: str | None = None  # truthy → the item was deleted
    entity: str = "record"
    lookback: Duration = 0.0
    timeout: Duration = 15.0
    headers: dict[str, str] = {}
    auth_header: str = "Authorization"
    auth: SecretValue | None = None  # the header's whole value, e.g. "Bearer …", by secret reference
    # Rate budget headers the provider sends, if any (remaining, limit, seconds until reset).
    budget_remaining_header: str | None = None
    budget_limit_header: str | None = None
    budget_reset_header: str | None = None
    # Optional: also accept webhooks for this source (nudges; see docs/polling.md).
    webhook: WebhookConfig | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        if "{since}" not in v:
            raise ValueError('url must contain "{since}" where the change time goes')
        return v

    @field_validator("items", "id", "updated", "version", "next_page", "deleted")
    @classmethod
    def _jsonpath(cls, v: str | None) -> str | None:
        return _path(v)


def parse_time(v: Any) -> datetime:
    """A change time from epoch seconds or ISO-8601 (a trailing Z is UTC)."""
    if isinstance(v, int | float) or (isinstance(v, str) and v.replace(".", "", 1).isdigit()):
        return datetime.fromtimestamp(float(v), UTC)
    if isinstance(v, str):
        d = datetime.fromisoformat(v.replace("Z", "+00:00"))
        return d if d.tzinfo else d.replace(tzinfo=UTC)
    raise ValueError(f"not a time: {v!r}")


def _iso(d: datetime) -> str:
    return d.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _pass_end(high: Any, started: Any) -> Any:
    """Where the next pass starts after a multi-page one: its newest change, but no later than when it began.

    A change that was still lagging in the listing when the page covering its time was
    read is behind the keyset and skipped by this pass; the next one re-reads ``lookback``
    before its cursor. Lag is measured from when pages are read, and a pass of several
    pages goes on reading newer changes for a while, so its newest change may be well
    past a lagging one: moving the cursor there skipped it for good (seen under load).
    Capping it at the moment the pass began keeps every change that lagged by less than
    ``lookback`` behind a page read within the next pass's reach.
    """
    if high is None or not isinstance(started, int | float):
        return high
    if parse_time(high).timestamp() <= started:
        return high
    if isinstance(high, int | float):
        return float(started)
    if str(high).replace(".", "", 1).isdigit():
        return str(started)
    return _iso(datetime.fromtimestamp(started, UTC))


def _later(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return b if parse_time(b) > parse_time(a) else a


class HttpPollSource(Connector[HttpPollConfig], PollingSource, ReconcilingSource, WebhookSource):
    """Polls a "changed since" REST listing; optionally also takes webhooks for the same records."""

    Config = HttpPollConfig

    def __init__(self, config: HttpPollConfig, ctx: ConnectorContext):
        super().__init__(config, ctx)
        c = config
        self._items: JSONPath = jsonpath_parse(c.items)
        self._id: JSONPath = jsonpath_parse(c.id)
        self._updated: JSONPath = jsonpath_parse(c.updated)
        self._version: JSONPath = jsonpath_parse(c.version or c.updated)
        self._next: JSONPath | None = jsonpath_parse(c.next_page) if c.next_page else None
        self._deleted: JSONPath | None = jsonpath_parse(c.deleted) if c.deleted else None
        self._hooks = WebhookConnector(c.webhook, ctx) if c.webhook is not None else None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        agent = self.ctx.http.user_agent  # a cluster node names itself (the provider's logs show who polled)
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": agent} if agent else None, timeout=aiohttp.ClientTimeout(total=self.config.timeout)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- polling ---------------------------------------------------------------------------------

    async def poll(self, cursor: Any) -> PollResult:
        c = self.config
        cur = cursor if isinstance(cursor, dict) else {"since": c.start, "page": None, "high": None}
        since = cur.get("since") or c.start
        # When this pass read its first page (local clock): see _pass_end.
        started = cur.get("started") if cur.get("page") else time.time()
        body, hints = await self._get(self._url(since, cur.get("page"), lookback=c.lookback))
        events, high = self._events(body)
        page = self._page(body)
        high = _later(cur.get("high"), high)
        if page:
            nxt = {"since": since, "page": page, "high": high, "started": started}
        else:
            end = _pass_end(high, started) if cur.get("page") else high
            nxt = {"since": _later(since, end), "page": None, "high": None}
        return PollResult(events, nxt, more=bool(page), **hints)

    async def reconcile(self, since: float | None, cursor: Any) -> ReconcilePage:
        start = self.config.start if since is None else _iso(datetime.fromtimestamp(since, UTC))
        body, _ = await self._get(self._url(start, cursor, lookback=0.0))
        events, _ = self._events(body)
        page = self._page(body)
        return ReconcilePage(events, page, more=bool(page))

    def _url(self, since: Any, page: str | None, lookback: float) -> str:
        if page and page.startswith(("http://", "https://")):
            return page
        t = parse_time(since) - timedelta(seconds=lookback)
        as_text = str(since)
        value = str(t.timestamp()) if as_text.replace(".", "", 1).isdigit() else _iso(t)
        url = self.config.url.replace("{since}", quote(value, safe=""))
        if page:
            url += ("&" if urlsplit(url).query else "?") + urlencode({self.config.page_param: page})
        return url

    async def _get(self, url: str) -> tuple[Any, dict[str, Any]]:
        if self._session is None:
            raise RetryableError("http-poll source is not started")
        c = self.config
        headers = dict(c.headers)
        if c.auth is not None:
            headers[c.auth_header] = c.auth.reveal()
        try:
            async with self._session.get(url, headers=headers) as resp:
                status = resp.status
                text = await resp.text(errors="replace")
                h = resp.headers
                retry_after = parse_retry_after(h.get("Retry-After"), time.time())
                hints = {
                    "budget_remaining": _int(h.get(c.budget_remaining_header)) if c.budget_remaining_header else None,
                    "budget_limit": _int(h.get(c.budget_limit_header)) if c.budget_limit_header else None,
                    "budget_reset": _float(h.get(c.budget_reset_header)) if c.budget_reset_header else None,
                }
        except TimeoutError:
            raise RetryableError(f"{_where(url)} did not answer within {c.timeout:g} s") from None
        except aiohttp.ClientError as e:
            raise RetryableError(f"cannot reach {_where(url)}: {type(e).__name__}: {e}") from None
        if status in (401, 403):
            raise AuthError(f"HTTP {status} from {_where(url)}: check the source's auth secret")
        if status >= 500 or status in RETRYABLE_STATUS:
            raise RetryableError(f"HTTP {status} from {_where(url)}: {text[:200].strip()}", retry_after=retry_after)
        if not 200 <= status < 300:
            raise PermanentError(f"HTTP {status} from {_where(url)}: {text[:200].strip()}")
        import orjson

        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise RetryableError(f"{_where(url)} answered with invalid JSON: {e}") from None
        if retry_after is not None:
            hints["retry_after"] = retry_after
        return body, hints

    def _events(self, body: Any) -> tuple[list[Event], Any]:
        c, name = self.config, self.ctx.name
        events: list[Event] = []
        high = None
        for m in self._items.find(body):
            item = m.value
            eid = _first(self._id, item)
            if eid is None:
                raise PermanentError(f"an item has nothing at id path {c.id!r}: {str(item)[:200]}")
            updated = _first(self._updated, item)
            version = _first(self._version, item)
            deleted = bool(_first(self._deleted, item)) if self._deleted is not None else False
            try:
                occurred = None if updated is None else _iso(parse_time(updated))
                if updated is not None:
                    high = _later(high, updated)
            except (ValueError, TypeError, OverflowError, OSError) as e:  # found by fuzzing: was a bare ValueError
                raise PermanentError(f"an item's {c.updated!r} is not a time ({e}): {str(item)[:200]}") from None
            v = None if version is None else str(version)
            events.append(
                Event(
                    id=content_id(name, c.entity, str(eid), v or "", "deleted" if deleted else ""),
                    source=name,
                    type=f"{c.entity}.{'deleted' if deleted else 'updated'}",
                    data=item,
                    entity=c.entity,
                    entity_id=str(eid),
                    version=v,
                    occurred_at=occurred,
                    meta={"deleted": True} if deleted else {},
                )
            )
        return events, high

    def _page(self, body: Any) -> str | None:
        if self._next is None:
            return None
        token = _first(self._next, body)
        return None if token in (None, "") else str(token)

    # --- optional webhooks -------------------------------------------------------------------------

    def verify(self, request: WebhookRequest, now: float) -> None:
        if self._hooks is None:
            raise SignatureError(f"source {request.source!r} is not configured to accept webhooks")
        self._hooks.verify(request, now)

    def parse(self, request: WebhookRequest) -> list[Event]:
        assert self._hooks is not None
        events = self._hooks.parse(request)
        # Webhooks describe the same records the listing returns: same entity name.
        return [
            Event(**{**e.to_dict(), "entity": e.entity or self.config.entity}) if e.entity_id is not None else e
            for e in events
        ]

    def sign(self, body: bytes, now: float, delivery_id: str) -> dict[str, str] | None:
        return self._hooks.sign(body, now, delivery_id) if self._hooks is not None else None


def _first(path: JSONPath, data: Any) -> Any:
    found = path.find(data)
    return found[0].value if found else None


def _int(v: str | None) -> int | None:
    try:
        return int(float(v)) if v is not None else None
    except ValueError:
        return None


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def _where(url: str) -> str:
    """The URL without its query string (which may carry tokens) for messages."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}{p.path}"
