"""The HTTP helper every connector uses: one shared session, timeouts, retries, rate limits, redacted logs.

One :class:`HttpPool` per daemon holds the aiohttp session and the rate limiters;
each connector gets an :class:`Http` view of it (``ctx.http``) that logs under the
connector's own logger. Rate limiters are keyed by a string the connector picks
(its provider and account, e.g. ``"quickbooks:1185883450"``), so a polling source
and a sink that talk to the same account share one budget.

Failures come back already sorted into the error hierarchy (:func:`error_for_status`):
401/403 → ``AuthError``; 408/425/429/5xx and network errors → ``RetryableError``
(with ``Retry-After``); other 4xx → ``PermanentError``. The provider's request id
travels in the error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import orjson
from aiohttp_retry import ExponentialRetry, RetryClient
from aiolimiter import AsyncLimiter

from .backoff import parse_retry_after
from .errors import AuthError, PermanentError, RetryableError

RETRYABLE_STATUS = frozenset({408, 425, 429})
AUTH_STATUS = frozenset({401, 403})

# Response headers that carry a provider's request id, most specific first.
# QuickBooks: intuit_tid (third-party-apis.md); HubSpot: X-HubSpot-Correlation-Id; generic: X-Request-Id.
REQUEST_ID_HEADERS = ("intuit_tid", "X-HubSpot-Correlation-Id", "X-Request-Id", "X-Correlation-Id", "Request-Id")

# Header, query and JSON key names whose values never reach a log line.
_SECRET_NAME = re.compile(
    r"(authorization|token|secret|password|passwd|api[-_]?key|signature|cookie|session|credential|auth_code|authorization_code)",
    re.I,
)
REDACTED = "***"
LOG_BODY_CHARS = 500


def is_secret_name(name: str) -> bool:
    """Whether a header, query parameter or JSON key name looks like it holds a credential."""
    return bool(_SECRET_NAME.search(name))


def redact_url(url: str) -> str:
    """The URL with credential-like query values and any userinfo replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = [(k, REDACTED if is_secret_name(k) else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if is_secret_name(k) else v) for k, v in headers.items()}


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Known secret values, and JSON/form values under credential-like keys, replaced by ``***``."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, REDACTED)
    text = re.sub(
        r'("([^"]*)"\s*:\s*)"([^"]*)"',
        lambda m: f'{m.group(1)}"{REDACTED}"' if is_secret_name(m.group(2)) else m.group(0),
        text,
    )
    return re.sub(
        r"(^|[&?])([^=&\s]+)=([^&\s]*)",
        lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}" if is_secret_name(m.group(2)) else m.group(0),
        text,
    )


def error_for_status(
    status: int, message: str, *, retry_after: float | None = None, request_id: str | None = None
) -> Exception:
    """The integrand error an HTTP status means (the one place this policy lives)."""
    if status in AUTH_STATUS:
        return AuthError(message, request_id=request_id)
    if status >= 500 or status in RETRYABLE_STATUS:
        return RetryableError(message, retry_after=retry_after, request_id=request_id)
    return PermanentError(message, request_id=request_id)


@dataclass(frozen=True)
class Response:
    """A fully read response: status, headers, body, and the provider's request id if it sent one."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str
    request_id: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body parsed as JSON; a malformed body is a PermanentError naming the request id."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as e:
            raise PermanentError(f"{self.url}: response is not JSON: {e}", request_id=self.request_id) from None

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


@dataclass
class _Limit:
    limiter: AsyncLimiter
    blocked_until: float = 0.0


@dataclass
class HttpPool:
    """The daemon's one HTTP session and its rate limiters, shared by every connector."""

    timeout: float = 30.0
    retries: int = 2
    clock: Callable[[], float] = time.monotonic
    _client: RetryClient | None = field(default=None, init=False)
    _limits: dict[str, _Limit] = field(default_factory=dict, init=False)

    async def start(self) -> None:
        if self._client is not None:
            return
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=100, limit_per_host=20),
            raise_for_status=False,
        )
        # aiohttp-retry repeats only what is safe and transient: a connection that failed or dropped
        # before an answer, and 502/503/504 on idempotent methods. Everything else (429 included, whose
        # Retry-After may be an hour) goes back to the caller, whose backoff and breaker see the whole picture.
        options = ExponentialRetry(
            attempts=max(1, self.retries + 1),
            start_timeout=0.05,
            max_timeout=1.0,
            statuses={502, 503, 504},
            exceptions={aiohttp.ClientConnectionError},
            methods={"GET", "HEAD", "OPTIONS", "PUT", "DELETE"},
            retry_all_server_errors=False,
        )
        self._client = RetryClient(client_session=session, retry_options=options, raise_for_status=False)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def client(self) -> RetryClient:
        if self._client is None:
            raise RetryableError("the HTTP pool is not started (or already closed)")
        return self._client

    def limit(self, key: str, rate: float, per: float = 1.0) -> None:
        """Allow at most ``rate`` requests per ``per`` seconds under ``key``; the first caller's numbers win."""
        if key not in self._limits:
            self._limits[key] = _Limit(AsyncLimiter(rate, per))

    def pause(self, key: str, seconds: float) -> None:
        """Hold every request under ``key`` for ``seconds`` (the provider said 429 with Retry-After)."""
        lim = self._limits.setdefault(key, _Limit(AsyncLimiter(1_000_000, 1)))
        lim.blocked_until = max(lim.blocked_until, self.clock() + seconds)

    def clear_pauses(self) -> None:
        """Forget every Retry-After pause (a test moving on, or an operator who knows the provider recovered)."""
        for lim in self._limits.values():
            lim.blocked_until = 0.0

    def paused_for(self, key: str) -> float:
        lim = self._limits.get(key)
        return max(0.0, lim.blocked_until - self.clock()) if lim else 0.0

    async def acquire(self, key: str | None) -> None:
        """Wait for a slot under ``key``: first any pause, then the leaky bucket."""
        if key is None or key not in self._limits:
            return
        lim = self._limits[key]
        # A pause can be extended by another 429 while we sleep, so look again after waking.
        while (wait := lim.blocked_until - self.clock()) > 0:  # noqa: ASYNC110 - a deadline, not a flag
            await asyncio.sleep(wait)
        await lim.limiter.acquire()

    def for_connector(self, logger: logging.Logger) -> Http:
        return Http(self, logger)


class Http:
    """A connector's handle on the shared pool (``ctx.http``); requests log under the connector's name."""

    def __init__(self, pool: HttpPool, logger: logging.Logger):
        self.pool = pool
        self.log = logger
        self._secrets: set[str] = set()

    def add_secret(self, value: str) -> None:
        """Never log ``value`` (an access token fetched at run time, say) in any request or response line."""
        if value:
            self._secrets.add(value)

    def limit(self, key: str, rate: float, per: float = 1.0) -> None:
        """Declare the provider's rate limit for one account; shared with every connector using ``key``."""
        self.pool.limit(key, rate, per)

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        data: bytes | str | Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the HTTP request's own timeout, handed to aiohttp
        rate_key: str | None = None,
        check: bool = True,
        request_id_headers: Iterable[str] = REQUEST_ID_HEADERS,
    ) -> Response:
        """Send one request and read the whole answer.

        With ``check`` (the default) a non-2xx answer raises the matching integrand error;
        with ``check=False`` the caller classifies it (e.g. a 200 that carries a Fault).
        A 429 with ``Retry-After`` also pauses ``rate_key`` for that long.
        """
        if self.pool._client is None:
            await self.pool.start()  # a standalone context's private pool starts on first use
        await self.pool.acquire(rate_key)
        hdrs = dict(headers or {})
        body: Any = data
        if json is not None:
            body = orjson.dumps(json)
            hdrs.setdefault("Content-Type", "application/json")
        full_url = url
        if params:
            full_url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
        shown = redact_text(redact_url(full_url), self._secrets)
        self.log.debug("→ %s %s headers=%s", method, shown, redact_headers(hdrs))
        started = time.perf_counter()
        kwargs: dict[str, Any] = {"data": body, "headers": hdrs}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self.pool.client.request(method, full_url, **kwargs) as resp:
                raw = await resp.read()
                status = resp.status
                resp_headers = {k: v for k, v in resp.headers.items()}
        except TimeoutError:
            limit = timeout if timeout is not None else self.pool.timeout
            self.log.info("✗ %s %s: no answer within %g s", method, shown, limit)
            raise RetryableError(f"{shown} did not answer within {limit:g} s") from None
        except aiohttp.ClientError as e:
            self.log.info("✗ %s %s: %s", method, shown, type(e).__name__)
            raise RetryableError(
                f"cannot reach {shown}: {type(e).__name__}: {redact_text(str(e), self._secrets)}"
            ) from None
        lower = {k.lower(): v for k, v in resp_headers.items()}
        request_id = next((lower[h.lower()] for h in request_id_headers if h.lower() in lower), None)
        retry_after = parse_retry_after(lower.get("retry-after"), time.time())
        res = Response(status, resp_headers, raw, shown, request_id, retry_after)
        elapsed = (time.perf_counter() - started) * 1000
        snippet = redact_text(raw[:LOG_BODY_CHARS].decode("utf-8", errors="replace"), self._secrets)
        self.log.debug(
            "← %d %s %s in %.0f ms%s: %s",
            status,
            method,
            shown,
            elapsed,
            f" (request id {request_id})" if request_id else "",
            snippet,
        )
        if status == 429 and rate_key is not None:
            self.pool.pause(rate_key, retry_after if retry_after is not None else 1.0)
        if check and not res.ok:
            raise error_for_status(
                status,
                f"HTTP {status} from {shown}: {snippet.strip() or '(empty body)'}"[:1000],
                retry_after=retry_after,
                request_id=request_id,
            )
        return res

    async def get(self, url: str, **kw: Any) -> Response:
        """``request("GET", url, …)``."""
        return await self.request("GET", url, **kw)

    async def post(self, url: str, **kw: Any) -> Response:
        """``request("POST", url, …)``."""
        return await self.request("POST", url, **kw)
