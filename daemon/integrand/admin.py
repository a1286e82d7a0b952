"""The admin port (never the webhook port): health, readiness, Prometheus metrics, status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .errors import StoreUnavailable
from .metrics import Metrics
from .store import Store


class Admin:
    def __init__(self, store: Store, metrics: Metrics, status: Callable[[], dict[str, Any]], ready: Callable[[], bool]):
        self.store = store
        self.metrics = metrics
        self.status_extra = status
        self.ready = ready

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_view)
        app.router.add_get("/status", self.status)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.ready():
            return web.json_response({"status": "not ready", "reason": "starting or shutting down"}, status=503)
        try:
            await self.store.ping()
        except StoreUnavailable as e:
            return web.json_response({"status": "not ready", "reason": str(e)}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_view(self, request: web.Request) -> web.Response:
        await self._refresh()
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        counts = await self.store.counts()
        sinks: dict[str, dict[str, int]] = {}
        for (sink, state), n in counts.items():
            sinks.setdefault(sink, {})[state] = n
        rejections = [
            {"at": r.at, "source": r.source, "status": r.status, "reason": r.reason}
            for r in await self.store.rejections(limit=20)
        ]
        return web.json_response(
            {
                "version": __version__,
                "deliveries": sinks,
                "recent_rejections": rejections,
                **self.status_extra(),
            }
        )

    async def _refresh(self) -> None:
        self.metrics.queue.clear()
        for (sink, state), n in (await self.store.counts()).items():
            self.metrics.queue.labels(sink, state).set(n)
        self.metrics.commits.set(self.store.commits)
        self.metrics.committed_ops.set(self.store.committed_ops)
        self.metrics.inline_checkpoints.set(self.store.inline_checkpoints)
        self.metrics.inline_checkpoint_seconds.set(self.store.inline_checkpoint_seconds)
