"""A local REST API that behaves like a real "list changed records" endpoint, for http-poll tests.

``GET /records?since=ISO&after=TOKEN`` lists records updated at or after ``since``
in (updated_at, id) order, ``limit`` per page with a keyset ``next`` token. Like a
real provider it can lag: a change is stamped when it happens but only shows up in
the listing after a random delay (late commits, a search index catching up), and
until then the listing shows the previous version. It can also rate-limit (429 with
``Retry-After``), fail transiently (500 on every n-th request), report its rate budget in headers, and send
a signed webhook for each change, dropping some.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .helpers import signed_headers


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Request:
    at: float
    status: int
    retry_after: float | None = None
    items: int = 0


@dataclass
class FakeRest:
    seed: int = 0
    page_size: int = 5
    lag_max: float = 0.0
    fail_every: int = 0  # every n-th request fails with 500
    # At most `limit_n` requests per `limit_window` seconds; beyond that: 429 with Retry-After.
    limit_n: int | None = None
    limit_window: float = 1.0
    # Whether 200s carry X-RateLimit-* headers; many APIs say nothing until the 429 itself.
    advertise_limit: bool = True
    retry_after: int = 1
    webhook_url: str | None = None
    webhook_drop: float = 0.0
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    versions: list[tuple[str, str]] = field(default_factory=list)
    webhooks_sent: int = 0
    webhooks_dropped: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._indexed: dict[str, dict[str, Any]] = {}
        self._pending: list[tuple[float, dict[str, Any]]] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._last_stamp = 0.0
        self.base = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/records", self._route)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession()
        return self.base

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- the remote system changing ----------------------------------------------------------

    async def change(self, rid: str, *, delete: bool = False) -> dict[str, Any]:
        """Create or update a record now (a new version); it reaches the listing after the lag."""
        now = max(time.time(), self._last_stamp + 1e-6)  # strictly increasing stamps
        self._last_stamp = now
        old = self.records.get(rid)
        rec = {
            "id": rid,
            "v": (old["v"] + 1) if old else 1,
            "name": f"{rid}-{self.rng.randrange(10**6)}",
            "updated_at": iso(now),
            "archived": delete,
        }
        self.records[rid] = rec
        self.versions.append((rid, str(rec["updated_at"])))
        lag = self.rng.uniform(0, self.lag_max) if self.lag_max else 0.0
        self._pending.append((now + lag, dict(rec)))
        if self.webhook_url is not None:
            if self.rng.random() < self.webhook_drop:
                self.webhooks_dropped += 1
            else:
                await self._send_webhook(rec)
        return rec

    async def _send_webhook(self, rec: dict[str, Any]) -> None:
        assert self._session is not None
        assert self.webhook_url is not None
        body = orjson.dumps(rec)
        msg_id = f"msg_{rec['id']}_{rec['v']}"
        async with self._session.post(self.webhook_url, data=body, headers=signed_headers(body, msg_id)) as r:
            assert r.status == 200, await r.text()
        self.webhooks_sent += 1

    def _index(self, now: float) -> None:
        keep = []
        for at, rec in self._pending:
            if at <= now:
                cur = self._indexed.get(rec["id"])
                if cur is None or cur["updated_at"] < rec["updated_at"]:
                    self._indexed[rec["id"]] = rec
            else:
                keep.append((at, rec))
        self._pending = keep

    def settle(self) -> None:
        """Let the index catch up completely (the lag is over)."""
        self._index(float("inf"))

    # --- the API --------------------------------------------------------------------------------

    async def _route(self, request: web.Request) -> web.Response:
        return await self.list_records(request)  # looked up per request, so a test can wrap it

    async def list_records(self, request: web.Request) -> web.Response:
        now = time.time()
        if self.limit_n is not None:
            recent = [r for r in self.requests if r.at > now - self.limit_window and r.status != 429]
            if len(recent) >= self.limit_n:
                self.requests.append(Request(now, 429, self.retry_after))
                return web.json_response(
                    {"error": "rate limited"}, status=429, headers={"Retry-After": str(self.retry_after)}
                )
        if self.fail_every and (len(self.requests) + 1) % self.fail_every == 0:
            self.requests.append(Request(now, 500))
            return web.json_response({"error": "transient"}, status=500)
        self._index(now)
        since = request.query.get("since", "")
        after = request.query.get("after")
        rows = sorted(
            (r for r in self._indexed.values() if r["updated_at"] >= since), key=lambda r: (r["updated_at"], r["id"])
        )
        if after:
            u, _, i = after.partition("|")
            rows = [r for r in rows if (r["updated_at"], r["id"]) > (u, i)]
        page = rows[: self.page_size]
        nxt = f"{page[-1]['updated_at']}|{page[-1]['id']}" if len(rows) > self.page_size else None
        self.requests.append(Request(now, 200, items=len(page)))
        headers = {}
        if self.limit_n is not None and self.advertise_limit:
            window = [r.at for r in self.requests if r.at > now - self.limit_window and r.status == 200]
            headers = {
                "X-RateLimit-Limit": str(self.limit_n),
                "X-RateLimit-Remaining": str(max(0, self.limit_n - len(window))),
                "X-RateLimit-Reset": f"{min(window) + self.limit_window - now:.3f}",
            }
        return web.json_response({"results": page, "next": nxt}, headers=headers)

    def final_versions(self) -> dict[str, str]:
        return {rid: r["updated_at"] for rid, r in self.records.items()}


async def drive(api: FakeRest, changes: list[tuple[float, str]], *, delete: set[str] | None = None) -> None:
    """Apply (delay, record id) changes on a schedule; ids in ``delete`` are deleted on their last change."""
    last: dict[str, int] = {}
    for i, (_, rid) in enumerate(changes):
        last[rid] = i
    for i, (delay, rid) in enumerate(changes):
        await asyncio.sleep(delay)  # the remote system's schedule, not a wait for integrand
        await api.change(rid, delete=bool(delete and rid in delete and last[rid] == i))
