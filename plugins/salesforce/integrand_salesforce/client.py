"""One org's REST client: the session's ``instance_url``, re-auth once on 401, error arrays sorted, limits kept.

Shared by every source and sink of the same org in the process (one session, one API budget, one
cap on concurrent requests), the way the QuickBooks connector shares one realm's tokens and rate.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from integrand.connector import AuthError, Http, PermanentError, Response, RetryableError

from .auth import Session, SessionManager

LIMIT_INFO = re.compile(r"api-usage=(\d+)/(\d+)")
PAUSE_KEY = "salesforce_daily_limit"  # connector state: the daily-limit pause, so a restart keeps waiting
# Per-record statusCodes worth another attempt (a lock held by another transaction, a rolled-back
# all-or-none batch, a platform hiccup); every other code is about the data and will not change.
RETRYABLE_CODES = frozenset(
    {
        "UNABLE_TO_LOCK_ROW",
        "ALL_OR_NONE_OPERATION_ROLLED_BACK",
        "SERVER_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
        "REQUEST_RUNNING_TOO_LONG",
    }
)
# Org-level refusals a person must fix (the API switched off, the user frozen): re-authenticate / alert.
AUTH_CODES = frozenset({"INVALID_SESSION_ID", "API_DISABLED_FOR_ORG", "API_CURRENTLY_DISABLED", "INVALID_AUTH_HEADER"})


@dataclass
class Budget:
    """The org's rolling 24-hour API allocation as the last ``Sforce-Limit-Info`` header reported it."""

    used: int | None = None
    limit: int | None = None
    paused_until: float = 0.0  # wall-clock seconds (it is stored, and outlives the process)
    pause_reason: str = ""

    @property
    def remaining(self) -> int | None:
        return None if self.used is None or self.limit is None else max(0, self.limit - self.used)


class SalesforceApiError(Exception):
    """A Salesforce error array before it is sorted into retry / give up / re-authenticate."""

    def __init__(self, status: int, errors: list[dict[str, Any]], url: str):
        self.status = status
        self.errors = errors
        self.code = str(errors[0].get("errorCode", "")) if errors else ""
        detail = "; ".join(
            f"{e.get('errorCode')}: {e.get('message')}" + (f" {e['fields']}" if e.get("fields") else "") for e in errors
        )
        super().__init__(f"Salesforce HTTP {status} from {url}: {detail or '(no error body)'}")


def error_array(body: bytes) -> list[dict[str, Any]]:
    """The ``[{"message","errorCode","fields"}]`` array of an error answer (tolerating an object or junk)."""
    try:
        data = orjson.loads(body) if body else []
    except orjson.JSONDecodeError:
        return [{"errorCode": "UNKNOWN", "message": body[:300].decode("utf-8", "replace")}]
    if isinstance(data, dict):
        data = [data]
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


class SalesforceClient:
    """REST calls for one org; ``request`` returns the Response or raises integrand's errors."""

    def __init__(
        self,
        *,
        sessions: SessionManager,
        api_version: str,
        rate_key: str,
        max_concurrent: int,
        daily_limit_wait: float,
        concurrent_limit_wait: float,
        call_options: str | None,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ):
        self.sessions = sessions
        self.api_version = api_version
        self.rate_key = rate_key
        self.budget = Budget()
        self.daily_limit_wait = daily_limit_wait
        self.concurrent_limit_wait = concurrent_limit_wait
        self.call_options = call_options
        self.timeout = timeout
        self.clock = clock
        self._gate = asyncio.Semaphore(max_concurrent)
        self._pause_restored = False
        self._pause_changed = False
        self.log = logging.getLogger("integrand.salesforce")

    async def _restore_pause(self) -> None:
        """A daily-limit pause stored before a restart still holds: read it once, before the first request."""
        self._pause_restored = True
        for state in self.sessions.states:
            try:
                raw = await state.get(PAUSE_KEY)
            except Exception as e:  # the store is down: the first request will find out the hard way
                self.log.warning("cannot read the stored Salesforce daily-limit pause: %s", e)
                continue
            if isinstance(raw, dict) and float(raw.get("until", 0)) > self.budget.paused_until:
                self.budget.paused_until = float(raw["until"])
                self.budget.pause_reason = str(raw.get("reason") or "daily API request limit reached")
        wait = self.budget.paused_until - self.clock()
        if wait > 0:
            self.log.warning(
                "Salesforce %s before the restart: every source and sink of this org waits %.0f s more",
                self.budget.pause_reason,
                wait,
            )

    async def _store_pause(self) -> None:
        """Durable, so a restart does not spend requests on an allocation known to be gone."""
        value = {"until": self.budget.paused_until, "reason": self.budget.pause_reason}
        for state in self.sessions.states:
            try:
                await state.set(PAUSE_KEY, value)
            except Exception as e:  # the pause still holds in this process
                self.log.warning("cannot store the Salesforce daily-limit pause: %s", e)

    def api_path(self, rest: str) -> str:
        return f"/services/data/v{self.api_version}/{rest.lstrip('/')}"

    async def session(self, http: Http) -> Session:
        return await self.sessions.session(http)

    async def request(
        self,
        http: Http,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        ok: tuple[int, ...] = (200, 201, 204),
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """``path`` is ``/services/data/…`` (a ``nextRecordsUrl`` is one) joined to the session's instance URL.

        A 401 gets one new session and one retry; the daily-limit 403 pauses the whole org (source and
        sink) and answers RetryableError with the wait, at once, so no worker sleeps on it for hours.
        """
        if not self._pause_restored:
            await self._restore_pause()
        wait = self.budget.paused_until - self.clock()
        if wait > 0:
            raise RetryableError(f"Salesforce {self.budget.pause_reason}; waiting {wait:.0f} s more", retry_after=wait)
        hdrs = {"Accept": "application/json", **(headers or {})}
        if self.call_options and method != "GET":
            # Names integrand's writes, so CDC events carry changeOrigin "…;client=<name>" (the loop guard).
            hdrs["Sforce-Call-Options"] = self.call_options
        for attempt in range(2):
            session = await self.sessions.session(http)
            hdrs["Authorization"] = f"Bearer {session.access_token}"
            async with self._gate:
                res = await http.request(
                    method,
                    session.instance_url + path,
                    params=params,
                    json=json,
                    headers=hdrs,
                    timeout=self.timeout,
                    rate_key=self.rate_key,
                    check=False,
                    retries=0 if method in ("PATCH", "POST") else None,
                )
            self._note_limits(res)
            if res.status in ok:
                return res
            errors = error_array(res.body)
            err = SalesforceApiError(res.status, errors, res.url)
            if res.status == 401:
                if attempt == 0:
                    self.log.info("Salesforce answered 401 %s; obtaining a new session once", err.code or "")
                    await self.sessions.renew(http, stale=session)
                    continue
                raise AuthError(f"Salesforce refused a brand-new session (401 twice): {err}", request_id=res.request_id)
            exc = self.classify(err, res)
            if self._pause_changed:
                self._pause_changed = False
                await self._store_pause()
            raise exc
        raise AssertionError("unreachable")  # pragma: no cover

    def classify(self, err: SalesforceApiError, res: Response) -> Exception:
        """Sort an error answer: wait (limits, 5xx), re-authenticate (401, API disabled), or give up (the data)."""
        msg, rid, status = str(err), res.request_id, err.status
        if status == 403 and err.code == "REQUEST_LIMIT_EXCEEDED":
            text = " ".join(str(e.get("message", "")) for e in err.errors)
            if "ConcurrentPerOrgLongTxn" in text or "concurrent" in text.lower():
                return RetryableError(msg, retry_after=self.concurrent_limit_wait, request_id=rid)
            # The rolling 24-hour allocation is spent: no Retry-After exists; the org waits, reported once.
            self.budget.paused_until = self.clock() + self.daily_limit_wait
            self.budget.pause_reason = (
                f"daily API request limit reached (api-usage {self.budget.used}/{self.budget.limit})"
            )
            self._pause_changed = True
            self.log.warning(
                "Salesforce daily API request limit reached (api-usage %s/%s): every source and sink of this org "
                "waits %.0f s, then tries again; raise the allocation or lower the polling rate",
                self.budget.used,
                self.budget.limit,
                self.daily_limit_wait,
            )
            return RetryableError(msg, retry_after=self.daily_limit_wait, request_id=rid)
        if status == 429:
            return RetryableError(msg, retry_after=res.retry_after or self.concurrent_limit_wait, request_id=rid)
        if status == 401 or err.code in AUTH_CODES:
            return AuthError(msg, request_id=rid)
        if status >= 500 or err.code in RETRYABLE_CODES:
            return RetryableError(msg, retry_after=res.retry_after, request_id=rid)
        return PermanentError(msg, request_id=rid)

    def _note_limits(self, res: Response) -> None:
        info = res.headers.get("Sforce-Limit-Info")
        m = LIMIT_INFO.search(info) if info else None
        if m:
            self.budget.used, self.budget.limit = int(m.group(1)), int(m.group(2))


# One client per org identity in this process (see auth.shared_manager).
_CLIENTS: weakref.WeakValueDictionary[tuple[str, ...], SalesforceClient] = weakref.WeakValueDictionary()


def shared_client(key: tuple[str, ...], make: Callable[[], SalesforceClient]) -> SalesforceClient:
    client = _CLIENTS.get(key)
    if client is None:
        client = make()
        _CLIENTS[key] = client
    return client
