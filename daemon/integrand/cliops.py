"""The CLI's way to the store: through the running daemon's admin socket, else on the store itself.

A daemon is the store's only writer, so while one runs every CLI command asks it over the unix socket
in the state directory (``admin.socket``). With none running, read commands open the store beside
nobody, and write commands take the store's writer lock first, so a daemon starting meanwhile waits
its turn instead of writing beside them."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from . import reports
from .config import Settings
from .errors import StoreUnavailable
from .ownership import singleton_holder, source_singleton
from .store import Store, StoreLocked
from .store.backends import cli_store
from .types import parse_duration


class Ops(Protocol):
    """What the CLI asks; the same answers (reports' dicts) whichever way they come."""

    via: str

    async def status(self) -> dict[str, Any]: ...
    async def dlq_list(self, sink: str | None, limit: int) -> list[dict[str, Any]]: ...
    async def dlq_show(self, ident: str) -> list[dict[str, Any]]: ...
    async def dlq_replay(self, body: dict[str, Any]) -> dict[str, Any]: ...
    async def dlq_purge(self, body: dict[str, Any]) -> dict[str, Any]: ...
    async def events_show(self, ident: str) -> list[dict[str, Any]]: ...
    async def events_list(
        self, source: str | None, since: str | None, state: str | None, limit: int
    ) -> list[dict[str, Any]]: ...
    async def cursor_set(self, source: str, value: Any) -> dict[str, Any]: ...
    async def state_get(self, scope: str, key: str) -> Any: ...
    async def state_set(self, scope: str, key: str, value: Any) -> None: ...


class LocalOps:
    """Answers from a store this process opened (no daemon is running)."""

    via = "store"

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings

    async def status(self) -> dict[str, Any]:
        return await reports.status(self.store, self.settings)

    async def dlq_list(self, sink: str | None, limit: int) -> list[dict[str, Any]]:
        return await reports.dlq_list(self.store, sink=sink, limit=limit)

    async def dlq_show(self, ident: str) -> list[dict[str, Any]]:
        return await reports.dlq_show(self.store, ident)

    async def dlq_replay(self, body: dict[str, Any]) -> dict[str, Any]:
        return await reports.dlq_replay(self.store, body)

    async def dlq_purge(self, body: dict[str, Any]) -> dict[str, Any]:
        return await reports.dlq_purge(self.store, body)

    async def events_show(self, ident: str) -> list[dict[str, Any]]:
        return await reports.events_show(self.store, ident)

    async def events_list(
        self, source: str | None, since: str | None, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        after = time.time() - parse_duration(since) if since else None
        return await reports.events_list(self.store, source=source, since=after, state=state, limit=limit)

    async def cursor_set(self, source: str, value: Any) -> dict[str, Any]:
        # A shared store with no daemon here: a node elsewhere may run the source (and its commits would win).
        if (holder := await singleton_holder(self.store, source_singleton(source))) is not None:
            raise reports.runs_elsewhere(source, holder)
        old = await self.store.cursor_get(source)
        await self.store.cursor_set(source, value)
        return {"source": source, "old": old, "new": value}

    async def state_get(self, scope: str, key: str) -> Any:
        return await self.store.state_get(scope, key)

    async def state_set(self, scope: str, key: str, value: Any) -> None:
        await self.store.state_set(scope, key, value)


class DaemonError(Exception):
    """The daemon answered with an error the CLI reports as it is."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RemoteOps:
    """Answers from the running daemon over its admin unix socket."""

    via = "daemon"

    def __init__(self, session: aiohttp.ClientSession, socket: Path):
        self.session = session
        self.socket = socket

    async def call(
        self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None, seconds: float = 60.0
    ) -> Any:
        data = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            async with self.session.request(
                method,
                f"http://integrand{path}",
                data=data,
                params=query,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise StoreUnavailable(f"the daemon on {self.socket} did not answer: {e or type(e).__name__}") from None
        try:
            payload = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            payload = {"error": raw.decode(errors="replace")[:500]}
        if status == 404:
            raise reports.NotFound(_message(payload))
        if status == 400:
            raise reports.BadRequest(_message(payload))
        if status == 409:
            raise reports.Conflict(_message(payload))
        if status == 503:
            raise StoreUnavailable(_message(payload))
        if status >= 300:
            raise DaemonError(status, f"the daemon answered {status}: {_message(payload)}")
        return payload

    async def status(self) -> dict[str, Any]:
        return dict(await self.call("GET", "/api/status"))

    async def dlq_list(self, sink: str | None, limit: int) -> list[dict[str, Any]]:
        q = {"limit": str(limit), **({"sink": sink} if sink else {})}
        return list(await self.call("GET", "/api/dlq", query=q))

    async def dlq_show(self, ident: str) -> list[dict[str, Any]]:
        return list(await self.call("GET", f"/api/dlq/{_quote(ident)}"))

    async def dlq_replay(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.call("POST", "/api/dlq/replay", body))

    async def dlq_purge(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.call("POST", "/api/dlq/purge", body))

    async def events_show(self, ident: str) -> list[dict[str, Any]]:
        return list(await self.call("GET", f"/api/events/{_quote(ident)}"))

    async def events_list(
        self, source: str | None, since: str | None, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        q = {"limit": str(limit)}
        for k, v in (("source", source), ("since", since), ("state", state)):
            if v:
                q[k] = v
        return list(await self.call("GET", "/api/events", query=q))

    async def cursor_set(self, source: str, value: Any) -> dict[str, Any]:
        if value is None:
            return dict(await self.call("DELETE", f"/api/cursors/{_quote(source)}"))
        return dict(await self.call("PUT", f"/api/cursors/{_quote(source)}", {"value": value}))

    async def reconcile(self, source: str, body: dict[str, Any]) -> dict[str, Any]:
        # A full pass over a large remote system can take long: no total timeout beyond an hour.
        return dict(await self.call("POST", f"/api/sources/{_quote(source)}/reconcile", body, seconds=3600))

    async def state_get(self, scope: str, key: str) -> Any:
        return (await self.call("GET", f"/api/state/{_quote(scope)}/{_quote(key)}"))["value"]

    async def state_set(self, scope: str, key: str, value: Any) -> None:
        await self.call("PUT", f"/api/state/{_quote(scope)}/{_quote(key)}", {"value": value})


def _quote(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")


def _message(payload: Any) -> str:
    if isinstance(payload, dict) and "error" in payload:
        return str(payload["error"])
    return str(payload)


async def _daemon_session(settings: Settings) -> tuple[aiohttp.ClientSession, Path] | None:
    """A session on the running daemon's admin socket, or None when no daemon answers there."""
    path = settings.admin_socket
    if path is None or not path.exists():
        return None
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)))
    try:
        async with session.get("http://integrand/healthz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status == 200:
                return session, path
    except (aiohttp.ClientError, TimeoutError, OSError):
        pass  # a socket file left by a daemon that died: nobody listens
    await session.close()
    return None


@contextlib.asynccontextmanager
async def open_ops(settings: Settings, *, write: bool) -> AsyncIterator[Ops | RemoteOps]:
    """The running daemon if there is one, else the store (with its writer lock for ``write``)."""
    found = await _daemon_session(settings)
    if found is not None:
        session, path = found
        try:
            yield RemoteOps(session, path)
        finally:
            await session.close()
        return
    async with local_store(settings, write=write) as store:
        yield LocalOps(store, settings)


@contextlib.asynccontextmanager
async def local_store(settings: Settings, *, write: bool) -> AsyncIterator[Store]:
    """The store opened by this process: read-only, or as its one writer (the daemon's lock)."""
    if settings.store.backend == "postgres":  # a database several nodes share: no file, no lock (store/backends.py)
        pg = cli_store(settings, write=write)
        await pg.open()
        try:
            yield pg
        finally:
            await pg.close()
        return
    path = settings.db_path
    if not write and not path.exists():  # a write (auth before the first run) may create it
        raise StoreUnavailable(f"no store at {path} yet (has `integrand run` been started?)")
    # A writer takes the daemon's lock: no daemon can start beside it, and a running daemon whose
    # admin socket is off or unreachable is reported instead of written beside.
    store = Store(path, busy_timeout=settings.store.busy_timeout, role="writer" if write else "reader")
    try:
        await store.open()
    except StoreLocked:
        where = settings.admin_socket
        raise StoreUnavailable(
            f"a daemon is running on {path}, but its admin socket "
            + (f"{where} does not answer" if where else "is turned off ([admin] socket)")
            + "; write commands go through the running daemon"
        ) from None
    try:
        yield store
    finally:
        await store.close()
        if write:
            keep_owner(path)


def keep_owner(db: Path) -> None:
    """Run as root beside a store the service owns, give back what SQLite created (WAL, shared memory,
    the lock file) to the store's owner: a root-owned ``-shm`` would keep the service from opening it."""
    if os.geteuid() != 0:
        return
    try:
        st = db.stat()
    except FileNotFoundError:
        return
    if st.st_uid == 0:
        return
    for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.lock")):
        with contextlib.suppress(FileNotFoundError):
            if f.stat().st_uid != st.st_uid:
                os.chown(f, st.st_uid, st.st_gid)
