"""The HTTP helper every connector uses: one shared session, timeouts, retries, rate limits, redacted logs.

One :class:`HttpPool` per daemon holds the aiohttp session and the rate limiters;
each connector gets an :class:`Http` view of it (``ctx.http``) that logs under the
connector's own logger. Rate limiters are keyed by a string the connector picks
(its provider and account, e.g. ``"quickbooks:1185883450"``), so a polling source
and a sink that talk to the same account share one budget: one or several sliding
windows, a 429 pause, and how many automatic retries (each of which passes the limiter).

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
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import orjson
from aiohttp_retry import ExponentialRetry
from multidict import CIMultiDict

from .backoff import parse_retry_after
from .errors import AuthError, PermanentError, RetryableError
from .secrets import REDACTED, is_credential_name

RETRYABLE_STATUS = frozenset({408, 425, 429})
AUTH_STATUS = frozenset({401, 403})

# Response headers that carry a provider's request id, most specific first.
# QuickBooks: intuit_tid (third-party-apis.md); HubSpot: X-HubSpot-Correlation-Id; generic: X-Request-Id.
REQUEST_ID_HEADERS = ("intuit_tid", "X-HubSpot-Correlation-Id", "X-Request-Id", "X-Correlation-Id", "Request-Id")

LOG_BODY_CHARS = 500


PINNED_SECRETS = 8  # the first secrets a connector's Http is given are redacted for good
MAX_SECRETS = 16  # and, after them, the newest this many (refreshed tokens replace each other)


def redact_url(url: str) -> str:
    """The URL with credential-like query values and any userinfo replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = [(k, REDACTED if is_credential_name(k) else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if is_credential_name(k) else v) for k, v in headers.items()}


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Known secret values, and JSON/form values under credential-like keys, replaced by ``***``."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, REDACTED)
    text = re.sub(
        r'("([^"]*)"\s*:\s*)"([^"]*)"',
        lambda m: f'{m.group(1)}"{REDACTED}"' if is_credential_name(m.group(2)) else m.group(0),
        text,
    )
    return re.sub(
        r"(^|[&?])([^=&\s]+)=([^&\s]*)",
        lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}" if is_credential_name(m.group(2)) else m.group(0),
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
    """A fully read response: status, headers (case-insensitive), body, and the provider's request id if it sent one."""

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


class RateLimiter:
    """One account's budget: sliding windows counted as the server counts them, and 429 pauses.

    Several limits may hold at once (QuickBooks: 10 per second *and* 500 per minute per realm).
    A request is counted from when its answer came back (it certainly reached the server by
    then), and while it is in flight it counts as happening now; so however the network delays
    requests, the server never sees more than ``n`` arrivals inside any window.

    Not a leaky-bucket library (aiolimiter): a bucket counts at acquire time and drains evenly, so it
    neither holds several windows at once, nor counts in-flight requests, nor pauses on a 429, and it
    cannot run on a test's fake clock; the providers count sliding windows of arrivals.
    """

    def __init__(
        self,
        limits: Iterable[tuple[float, float]] = (),
        *,
        pause_429: float = 1.0,
        retries: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.limits = [(int(n), float(w)) for n, w in limits if n > 0]
        self.declared = list(self.limits)  # the account's whole budget; ``limits`` is this node's share of it
        self.pause_429 = pause_429
        self.retries = retries
        self._clock = clock
        self._sleep = sleep
        self._done: deque[float] = deque()
        self._in_flight = 0
        self._changed = asyncio.Event()
        self._paused_until = 0.0
        self.waited = 0.0

    def pause(self, seconds: float) -> None:
        """Hold every caller for ``seconds`` (the provider said 429: wait, do not hammer)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def clear_pause(self) -> None:
        self._paused_until = 0.0

    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when none)."""
        return max(0.0, self._paused_until - self._clock())

    def _delay(self, now: float) -> float | None:
        """Seconds to wait before one more request may start; None: wait for one in flight to finish."""
        delay = self.paused_for()
        longest = max((w for _, w in self.limits), default=0.0)
        while self._done and self._done[0] <= now - longest:
            self._done.popleft()
        for n, window in self.limits:
            if self._in_flight >= n:
                return None
            inside = [t for t in self._done if t > now - window]
            if self._in_flight + len(inside) >= n:
                # The oldest finished request that keeps us at the limit must leave the window first.
                delay = max(delay, inside[-(n - self._in_flight)] + window - now)
        return delay

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one request's place in every window from its start until its answer is in."""
        while True:
            delay = self._delay(self._clock())
            if delay is not None and delay <= 0:
                break
            self._changed.clear()
            if delay is None:
                await self._changed.wait()
            else:
                # A pause can be extended by another 429 while we sleep: the loop looks again.
                self.waited += delay
                await self._sleep(delay)
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._done.append(self._clock())
            self._changed.set()


@dataclass
class HttpPool:
    """The daemon's one HTTP session and its rate limiters, shared by every connector."""

    timeout: float = 30.0
    retries: int = 2
    clock: Callable[[], float] = time.monotonic
    _session: aiohttp.ClientSession | None = field(default=None, init=False)
    _limits: dict[str, RateLimiter] = field(default_factory=dict, init=False)
    _declared: set[str] = field(default_factory=set, init=False)
    # Sent with every request; a cluster node names itself in it (providers' logs, the tests' fakes).
    user_agent: str | None = None
    # (live nodes, this node's rank among them): each declared budget is split so the nodes together keep it.
    share: tuple[int, int] = (1, 0)

    # aiohttp-retry's policy: repeat only what is safe and transient, a connection that failed or
    # dropped before an answer, and 502/503/504 on idempotent methods. Everything else (429 included,
    # whose Retry-After may be an hour) goes back to the caller, whose backoff and breaker see the whole
    # picture. The loop is ours (Http.request) so that every attempt passes the account's limiter.
    policy: ExponentialRetry = field(
        init=False,
        default_factory=lambda: ExponentialRetry(
            start_timeout=0.05,
            max_timeout=1.0,
            statuses={502, 503, 504},
            exceptions={aiohttp.ClientConnectionError},
            methods={"GET", "HEAD", "OPTIONS", "PUT", "DELETE"},
            retry_all_server_errors=False,
        ),
    )

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": self.user_agent} if self.user_agent else None,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=100, limit_per_host=20),
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RetryableError("the HTTP pool is not started (or already closed)")
        return self._session

    def limit(
        self,
        key: str,
        rate: float | None = None,
        per: float = 1.0,
        *,
        limits: Iterable[tuple[float, float]] = (),
        pause_429: float | None = None,
        retries: int | None = None,
    ) -> RateLimiter:
        """Declare ``key``'s budget: ``rate`` per ``per`` s and/or several ``limits`` as ``(n, seconds)``.

        ``pause_429`` is how long a 429 without ``Retry-After`` holds the key (1 s unless given);
        ``retries`` overrides the pool's automatic retries for requests under the key (0: none).
        The first declaration of a key wins: one budget per account, whoever declares it.
        """
        lim = self.limiter(key)
        if key not in self._declared:
            # In place: requests already in flight under the key (or a 429 seen before) still count.
            self._declared.add(key)
            lim.declared = [(int(n), float(w)) for n, w in [*([(rate, per)] if rate else []), *limits] if n > 0]
            lim.limits = self._shared(lim.declared)
            lim.pause_429 = pause_429 if pause_429 is not None else lim.pause_429
            lim.retries = retries
        return lim

    def set_user_agent(self, agent: str) -> None:
        """What every request says it is from now on (started or not)."""
        self.user_agent = agent
        if self._session is not None:
            self._session.headers["User-Agent"] = agent

    def set_share(self, nodes: int, rank: int) -> None:
        """``nodes`` nodes share every account's budget now (this one ranked ``rank``): re-cut each one."""
        if (nodes, rank) == self.share:
            return
        self.share = (nodes, rank)
        for lim in self._limits.values():
            lim.limits = self._shared(lim.declared)
            lim._changed.set()  # a caller waiting on the old cut looks again

    def _shared(self, limits: list[tuple[int, float]]) -> list[tuple[int, float]]:
        from .ownership import split_limits  # the pure policy lives with the rest of the cluster's

        return split_limits(limits, *self.share) if self.share[0] > 1 else list(limits)

    def limiter(self, key: str) -> RateLimiter:
        """The budget under ``key`` (an unlimited one until someone declares it)."""
        lim = self._limits.get(key)
        if lim is None:
            lim = self._limits[key] = RateLimiter(clock=self.clock)
        return lim

    def pause(self, key: str, seconds: float) -> None:
        """Hold every request under ``key`` for ``seconds`` (the provider said 429 with Retry-After)."""
        self.limiter(key).pause(seconds)

    def clear_pauses(self) -> None:
        """Forget every Retry-After pause (a test moving on, or an operator who knows the provider recovered)."""
        for lim in self._limits.values():
            lim.clear_pause()

    def paused_for(self, key: str) -> float:
        lim = self._limits.get(key)
        return lim.paused_for() if lim else 0.0

    @asynccontextmanager
    async def slot(self, keys: Sequence[str]) -> AsyncIterator[None]:
        """Hold a place under every key (in order) for one attempt, from sending until the answer is in."""
        async with AsyncExitStack() as stack:
            for key in keys:
                await stack.enter_async_context(self.limiter(key).slot())
            yield

    def for_connector(self, logger: logging.Logger) -> Http:
        return Http(self, logger)


class Http:
    """A connector's handle on the shared pool (``ctx.http``); requests log under the connector's name."""

    def __init__(self, pool: HttpPool, logger: logging.Logger):
        self.pool = pool
        self.log = logger
        # Bounded: tokens refreshed every hour for a year would otherwise be thousands of values
        # scanned on every request. The first PINNED_SECRETS are kept for good (what a connector
        # knows early: a static token, its first refresh token); after them, the newest MAX_SECRETS.
        self._pinned: dict[str, None] = {}
        self._recent: dict[str, None] = {}  # an ordered set, newest last
        self._secrets: list[str] = []

    @property
    def user_agent(self) -> str | None:
        """The User-Agent the daemon's requests carry (a cluster node's names the node); None: aiohttp's."""
        return self.pool.user_agent

    def add_secret(self, value: str) -> None:
        """Never log ``value`` (an access token fetched at run time, say) in any request or response line.

        A refreshed token stops working once renewed, so only the newest ``MAX_SECRETS`` run-time
        values are kept, beside the first ``PINNED_SECRETS`` added, which never are dropped."""
        if not value or value in self._pinned:
            return
        if len(self._pinned) < PINNED_SECRETS:
            self._pinned[value] = None
        else:
            self._recent.pop(value, None)
            self._recent[value] = None
            while len(self._recent) > MAX_SECRETS:
                del self._recent[next(iter(self._recent))]
        self._secrets = [*self._pinned, *self._recent]

    def limit(
        self,
        key: str,
        rate: float | None = None,
        per: float = 1.0,
        *,
        limits: Iterable[tuple[float, float]] = (),
        pause_429: float | None = None,
        retries: int | None = None,
    ) -> RateLimiter:
        """Declare the provider's rate limits for one account; shared with every connector using ``key``."""
        return self.pool.limit(key, rate, per, limits=limits, pause_429=pause_429, retries=retries)

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
        rate_key: str | Sequence[str] | None = None,
        check: bool = True,
        classify: Callable[[Response], Exception | None] | None = None,
        retries: int | None = None,
        request_id_headers: Iterable[str] = REQUEST_ID_HEADERS,
    ) -> Response:
        """Send one request (every attempt through ``rate_key``'s limiter) and read the whole answer.

        ``classify`` sees every answer first and may return the error it means (a Fault inside a 200);
        then, with ``check`` (the default), a non-2xx answer raises the matching integrand error, and with
        ``check=False`` the caller gets the response to sort out. A 429 pauses the first ``rate_key`` for
        its ``Retry-After`` or the key's ``pause_429``. ``retries`` overrides the automatic retries.
        """
        if self.pool._session is None:
            await self.pool.start()  # a standalone context's private pool starts on first use
        keys = [rate_key] if isinstance(rate_key, str) else list(rate_key or ())
        if retries is None:
            declared = [self.pool.limiter(k).retries for k in keys]
            retries = next((r for r in declared if r is not None), self.pool.retries)
        policy = self.pool.policy
        attempts = 1 + max(0, retries) if method.upper() in policy.methods else 1
        hdrs = dict(headers or {})
        body: Any = data
        if json is not None:
            body = orjson.dumps(json)
            hdrs.setdefault("Content-Type", "application/json")
        full_url = url
        if params:
            full_url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
        shown = redact_text(redact_url(full_url), self._secrets)
        kwargs: dict[str, Any] = {"data": body, "headers": hdrs}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        for attempt in range(1, attempts + 1):
            self.log.debug("→ %s %s headers=%s", method, shown, redact_headers(hdrs))
            started = time.perf_counter()
            try:
                async with self.pool.slot(keys), self.pool.session.request(method, full_url, **kwargs) as resp:
                    raw = await resp.read()
                    status = resp.status
                    resp_headers = CIMultiDict(resp.headers)  # case-insensitive, as HTTP/2 lowercases names
            except TimeoutError:
                limit = timeout if timeout is not None else self.pool.timeout
                self.log.info("✗ %s %s: no answer within %g s", method, shown, limit)
                raise RetryableError(f"{shown} did not answer within {limit:g} s") from None
            except aiohttp.ClientError as e:
                self.log.info("✗ %s %s: %s", method, shown, type(e).__name__)
                if attempt < attempts and isinstance(e, tuple(policy.exceptions)):
                    await asyncio.sleep(policy.get_timeout(attempt))
                    continue
                raise RetryableError(
                    f"cannot reach {shown}: {type(e).__name__}: {redact_text(str(e), self._secrets)}"
                ) from None
            res = self._response(status, resp_headers, raw, shown, request_id_headers, keys, method, started)
            if attempt < attempts and status in policy.statuses:
                await asyncio.sleep(policy.get_timeout(attempt))
                continue
            break
        err = classify(res) if classify is not None else None
        if err is None and check and not res.ok:
            snippet = redact_text(raw[:LOG_BODY_CHARS].decode("utf-8", errors="replace"), self._secrets)
            err = error_for_status(
                status,
                f"HTTP {status} from {shown}: {snippet.strip() or '(empty body)'}"[:1000],
                retry_after=res.retry_after,
                request_id=res.request_id,
            )
        if err is not None:
            raise err
        return res

    def _response(
        self,
        status: int,
        headers: CIMultiDict[str],
        raw: bytes,
        shown: str,
        request_id_headers: Iterable[str],
        keys: Sequence[str],
        method: str,
        started: float,
    ) -> Response:
        """The answer as a Response, logged (redacted); a 429 pauses the first key."""
        lower = {k.lower(): v for k, v in headers.items()}
        request_id = next((lower[h.lower()] for h in request_id_headers if h.lower() in lower), None)
        retry_after = parse_retry_after(lower.get("retry-after"), time.time())
        if status == 429 and keys:
            if retry_after is None:
                retry_after = self.pool.limiter(keys[0]).pause_429
            self.pool.pause(keys[0], retry_after)
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
        return Response(status, headers, raw, shown, request_id, retry_after)

    async def get(self, url: str, **kw: Any) -> Response:
        """``request("GET", url, …)``."""
        return await self.request("GET", url, **kw)

    async def post(self, url: str, **kw: Any) -> Response:
        """``request("POST", url, …)``."""
        return await self.request("POST", url, **kw)
