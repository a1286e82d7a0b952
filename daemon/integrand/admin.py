"""The admin listener (never the webhook port): health, metrics, the JSON admin API and the status page.

It listens on TCP (``admin.listen``, loopback by default) and on a unix socket in the state directory
(``admin.socket``, mode 0600) that the CLI uses to work beside a running daemon. A bearer token
(``admin.token``) guards every TCP request but the health checks; config refuses a non-loopback
``admin.listen`` without one. Posts must be JSON, which a cross-site form cannot send without a CORS
preflight this server never answers: a web page in the operator's browser cannot replay or purge."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__, reports
from .errors import AuthError, ConfigError, RetryableError, StoreUnavailable
from .ownership import singleton_holder, source_singleton
from .secrets import SecretValue
from .store.fence import CURRENT
from .types import parse_duration

if TYPE_CHECKING:
    from .app import Daemon

log = logging.getLogger("integrand.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes carry no token and learn nothing private
TOKEN_COOKIE = "integrand_admin"  # noqa: S105 - a cookie name, not a password


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status=status, content_type="application/json"
    )


def _problem(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


class Admin:
    def __init__(self, d: Daemon):
        self.d = d
        self._token: bytes | None = None
        self.set_token(d.settings.admin.token)

    def set_token(self, token: SecretValue | None) -> None:
        """The bearer token TCP requests must carry (a reload applies a new one to the next request;
        status-page cookies holding the old one stop working with it)."""
        self._token = token.reveal().encode() if token is not None else None

    # --- wiring ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=1024 * 1024)
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics_view)
        r.add_get("/status", self.status)
        r.add_get("/api/status", self.status)
        r.add_get("/api/sources", self.sources)
        r.add_get("/api/sinks", self.sinks)
        r.add_get("/api/rejections", self.rejections)
        r.add_get("/api/dlq", self.dlq_list)
        r.add_get("/api/dlq/{ident}", self.dlq_show)
        r.add_post("/api/dlq/replay", self.dlq_replay)
        r.add_post("/api/dlq/purge", self.dlq_purge)
        r.add_get("/api/events", self.events_list)
        r.add_get("/api/events/{ident}", self.events_show)
        r.add_get("/api/sagas/{ident}", self.saga_show)
        r.add_put("/api/cursors/{source}", self.cursor_set)
        r.add_delete("/api/cursors/{source}", self.cursor_set)
        r.add_post("/api/sources/{source}/reconcile", self.reconcile)
        r.add_get("/api/state/{scope}/{key}", self.state_get)
        r.add_put("/api/state/{scope}/{key}", self.state_set)
        r.add_get("/", self.page)
        r.add_post("/login", self.login)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        unix = _on_unix_socket(request)
        if self._token is None and not unix and not _loopback_host(request.host):
            # DNS rebinding: a web page whose name now points at 127.0.0.1 would be same-origin here.
            return _problem(403, f"Host {request.host!r} is not this machine's loopback name; use 127.0.0.1")
        guarded = self._token is not None and not unix and request.path not in OPEN_PATHS
        if guarded and request.path != "/login" and not self._authorized(request):
            if request.path == "/" and request.method == "GET":
                from .statuspage import login_page

                return web.Response(text=login_page(), status=401, content_type="text/html")
            return web.Response(
                status=401,
                text='{"error": "this admin listener needs Authorization: Bearer <admin.token>"}',
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="integrand"'},
            )
        if request.path.startswith("/api/state/") and not _on_unix_socket(request):
            # Connector state holds OAuth tokens: only the service's own user (the 0600 socket) may touch it.
            return _problem(403, "connector state is served on the admin unix socket only")
        if (
            request.method in ("POST", "PUT")
            and request.path != "/login"
            and request.content_type != "application/json"
        ):
            return _problem(415, "send a JSON body with Content-Type: application/json")
        try:
            return await handler(request)
        except reports.NotFound as e:
            return _problem(404, str(e))
        except reports.BadRequest as e:
            return _problem(400, str(e))
        except reports.Conflict as e:
            return _problem(409, str(e))
        except StoreUnavailable as e:
            return _problem(503, f"store unavailable: {e}")

    def _authorized(self, request: web.Request) -> bool:
        assert self._token is not None
        auth = request.headers.get("Authorization", "")
        given = (
            auth.removeprefix("Bearer ").strip()
            if auth.startswith("Bearer ")
            else request.cookies.get(TOKEN_COOKIE, "")
        )
        return hmac.compare_digest(given.encode(), self._token)

    async def login(self, request: web.Request) -> web.StreamResponse:
        """The status page's token form: a right token becomes an HttpOnly, same-site cookie."""
        if self._token is None:
            raise web.HTTPSeeOther("/")
        form = await request.post()
        given = str(form.get("token", ""))
        if not hmac.compare_digest(given.encode(), self._token):
            return web.Response(text="wrong token", status=401)
        resp = web.Response(status=303, headers={"Location": "/"})
        resp.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="Strict", path="/")
        return resp

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            return {}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise reports.BadRequest(f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise reports.BadRequest("body must be a JSON object")
        return body

    # --- health and metrics ---------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "version": __version__})

    async def readyz(self, request: web.Request) -> web.Response:
        if not (self.d.ready and not self.d.listener.stopping):
            return _json({"status": "not ready", "reason": "starting or shutting down"}, status=503)
        try:
            await self.d.store.ping()
        except StoreUnavailable as e:
            return _json({"status": "not ready", "reason": str(e)}, status=503)
        return _json({"status": "ready"})

    async def metrics_view(self, request: web.Request) -> web.Response:
        from .metrics import refresh

        await refresh(self.d)
        body = generate_latest(self.d.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # --- reads ----------------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return _json(await reports.status(self.d.store, self.d.settings, self.d))

    async def sources(self, request: web.Request) -> web.Response:
        return _json(await reports.sources(self.d.store, self.d.settings, self.d))

    async def sinks(self, request: web.Request) -> web.Response:
        return _json(await reports.sinks(self.d.store, self.d.settings, self.d))

    async def rejections(self, request: web.Request) -> web.Response:
        q = request.query
        return _json(await reports.rejections(self.d.store, limit=_int(q, "limit", 50), source=q.get("source")))

    async def dlq_list(self, request: web.Request) -> web.Response:
        q = request.query
        return _json(await reports.dlq_list(self.d.store, sink=q.get("sink"), limit=_int(q, "limit", 1000)))

    async def dlq_show(self, request: web.Request) -> web.Response:
        return _json(await reports.dlq_show(self.d.store, request.match_info["ident"]))

    async def events_show(self, request: web.Request) -> web.Response:
        return _json(await reports.events_show(self.d.store, request.match_info["ident"]))

    async def saga_show(self, request: web.Request) -> web.Response:
        """A multi-step route's record: its steps, their results and every attempt (integrand.sagarunner)."""
        from .sagarunner import find_sagas

        ident = request.match_info["ident"]
        found = await find_sagas(self.d.store.state_get, ident, [sg.name for sg in self.d.settings.sagas])
        if not found:
            return _problem(404, f"no saga {ident!r} (a saga id looks like SOURCE:EVENT_ID~SAGA)")
        return _json(found)

    async def events_list(self, request: web.Request) -> web.Response:
        q = request.query
        since = None
        if "since" in q:
            since = _since(q["since"])
        return _json(
            await reports.events_list(
                self.d.store, source=q.get("source"), since=since, state=q.get("state"), limit=_int(q, "limit", 100)
            )
        )

    async def state_get(self, request: web.Request) -> web.Response:
        value = await self.d.store.state_get(request.match_info["scope"], request.match_info["key"])
        return _json({"value": value})

    async def page(self, request: web.Request) -> web.Response:
        from .statuspage import render

        html = await render(self.d, request.query.get("q", "").strip(), fragment="fragment" in request.query)
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    # --- writes (the daemon is the store's only writer: the CLI's write commands land here) ---------

    async def dlq_replay(self, request: web.Request) -> web.Response:
        res = await reports.dlq_replay(self.d.store, await self._body(request))
        log.info("admin: replayed %d dead-lettered deliveries", res["replayed"], extra={"count": res["replayed"]})
        return _json(res)

    async def dlq_purge(self, request: web.Request) -> web.Response:
        res = await reports.dlq_purge(self.d.store, await self._body(request))
        log.info("admin: purged %d dead-lettered deliveries", res["purged"], extra={"count": res["purged"]})
        return _json(res)

    async def cursor_set(self, request: web.Request) -> web.Response:
        name = request.match_info["source"]
        cs = self.d.settings.sources.get(name)
        if cs is None or "poll" not in cs.cls.capabilities():
            raise reports.NotFound(f"no polling source named {name!r}")
        value = None
        if request.method == "PUT":
            body = await self._body(request)
            if "value" not in body or body["value"] is None:
                raise reports.BadRequest('give {"value": …} (DELETE resets the cursor)')
            value = body["value"]
        # On a cluster only the node running the source may write its cursor, under its lease's fence:
        # another node's write would be overwritten by the owner's next commit, or land after a takeover.
        fence = None
        if self.d.owner is not None and self.d.owner.clustered:
            single = source_singleton(name)
            fence = self.d.owner.fence_of(single)
            if fence is None:
                raise reports.runs_elsewhere(name, await singleton_holder(self.d.store, single))
        poller = self.d.pollers.get(name)
        # Between polls: a poll in flight would commit the cursor it started from, over this one.
        async with poller.cursor_lock if poller is not None else contextlib.nullcontext():
            old = await self.d.store.cursor_get(name)
            token = CURRENT.set(fence)
            try:
                await self.d.store.cursor_set(name, value)
            finally:
                CURRENT.reset(token)
        if poller is not None:
            poller.nudge()
        log.info("admin: cursor of %s %s", name, "reset" if value is None else "set", extra={"source": name})
        return _json({"source": name, "old": old, "new": value})

    async def reconcile(self, request: web.Request) -> web.Response:
        from .config import SourceCore
        from .connector import ReconcilingSource
        from .poller import reconcile_once

        name = request.match_info["source"]
        cs = self.d.settings.sources.get(name)
        inst = self.d.connectors.get(f"source:{name}")
        if cs is None or not isinstance(inst, ReconcilingSource):
            raise reports.NotFound(f"no source named {name!r} that can reconcile")
        body = await self._body(request)
        core = cs.core
        assert isinstance(core, SourceCore)
        window: float | None
        if body.get("full"):
            window = None
        elif body.get("window") is not None:
            try:
                window = parse_duration(body["window"])
            except ValueError as e:
                raise reports.BadRequest(f"window: {e}") from None
        else:
            window = core.poll.reconcile_window
        try:
            report = await reconcile_once(
                name, inst, self.d.store, self.d.listener.router, window=window, metrics=self.d.metrics
            )
        except (RetryableError, AuthError) as e:
            return _problem(502, f"reconciliation of {name} failed: {type(e).__name__}: {e}")
        if report is None:  # pragma: no cover - only a max_pages limit stops a pass early
            return _problem(500, f"reconciliation of {name} stopped early")
        return _json(
            {"source": name, "report": str(report), "checked": report.checked, "missed": report.missed,
             "stale": report.stale, "deleted": report.deleted}
        )  # fmt: skip

    async def state_set(self, request: web.Request) -> web.Response:
        """A connector's state written by ``integrand auth`` run beside the daemon (OAuth tokens)."""
        scope, key = request.match_info["scope"], request.match_info["key"]
        role, _, name = scope.partition(":")
        table = self.d.settings.sources if role == "source" else self.d.settings.sinks if role == "sink" else {}
        shared = role == "connection" and any(
            cs.connection == name for cs in (*self.d.settings.sources.values(), *self.d.settings.sinks.values())
        )  # a [connections.NAME] keeps one state for all its sources and sinks
        if name not in table and not shared:
            raise reports.NotFound(
                f"no {role or 'source or sink'} {name!r} (scope is source:NAME, sink:NAME or connection:NAME)"
            )
        body = await self._body(request)
        if "value" not in body:
            raise reports.BadRequest('give {"value": …}')
        await self.d.store.state_set(scope, key, body["value"])
        log.info("admin: state %s of %s written", key, scope, extra={"scope": scope})
        return _json({"scope": scope, "key": key})


def _loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback (``127.0.0.1:8081``, ``localhost``, ``[::1]``)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.endswith("]") or "]:" in host else host
    name = name.strip("[]").lower()
    if name in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _on_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


def _int(q: Any, key: str, default: int) -> int:
    raw = q.get(key)
    if raw is None:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise reports.BadRequest(f"{key} must be an integer, got {raw!r}") from None
    if n < 1:
        raise reports.BadRequest(f"{key} must be at least 1")
    return n


def _since(raw: str) -> float:
    import time

    try:
        return time.time() - parse_duration(raw)
    except ValueError:
        raise reports.BadRequest(f"since must be a duration such as 1h or 30m, got {raw!r}") from None


# --- starting and stopping --------------------------------------------------------------------------


async def start_admin(d: Daemon) -> list[web.BaseRunner]:
    """Bind the admin listener (TCP and the unix socket); records the TCP port in ``d.ports['admin']``."""
    s = d.settings
    if not s.admin.enabled:
        return []
    admin = Admin(d)
    d.admin = admin  # a reload gives it a new token
    app = admin.app()
    path = s.admin_socket
    if path is not None:

        async def unlink(app: web.Application) -> None:  # the CLI then knows no daemon runs here
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

        app.on_cleanup.append(unlink)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, s.admin.listen.host, s.admin.listen.port)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError([f"admin.listen: cannot listen on {s.admin.listen}: {e.strerror or e}"]) from None
        server = site._server  # aiohttp keeps the asyncio server here; needed when port 0 was asked for
        sockets = getattr(server, "sockets", None) or []
        d.ports["admin"] = int(sockets[0].getsockname()[1]) if sockets else s.admin.listen.port
        if path is not None:
            sock = bind_unix_socket(path)
            await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        raise
    return [runner]


def bind_unix_socket(path: Path) -> socket.socket:
    """A listening unix socket only its owner may connect to (mode 0600 from the start, not after a chmod)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The daemon holds the store's lock, so a socket file left here is a dead daemon's: replace it.
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise ConfigError([f"admin.socket: cannot listen on {path}: {e.strerror or e}"]) from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock
