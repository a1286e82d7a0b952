"""The connector author's kit: a pytest plugin with a contract suite, a fake clock, a temporary store, fake APIs.

A connector's whole contract test module is a few lines::

    from integrand.testing import ConnectorContract
    from my_plugin import MyConnector

    class TestMyConnector(ConnectorContract):
        connector_class = MyConnector
        config = {"base_url": "http://127.0.0.1:1", "token": "t"}

Override the fixtures ``fake_api`` (start a local fake of the provider's API),
``connector_config`` (the config table, usually pointing at ``fake_api``),
``webhook_body``, ``sink_events`` and ``thin_event`` to give the suite real inputs.
This module is registered as a pytest plugin (entry point ``pytest11``), so the
fixtures ``fake_clock``, ``temp_store`` and ``http_pool`` are available in any
test once integrand is installed.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar, cast

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDict

from .app import ScopedState
from .config import parse_config
from .connector import (
    AuthError,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Enricher,
    Event,
    HttpPool,
    PermanentError,
    PollingSource,
    ReconcilingSource,
    RetryableError,
    Role,
    SignatureError,
    Sink,
    WebhookRequest,
    WebhookSource,
    utcnow_iso,
)
from .errors import ConfigError
from .events import version_key
from .plugins import Registry
from .signing import standard_sign
from .store import Store

__all__ = [
    "ConnectorContract",
    "DaemonProcess",
    "FakeClock",
    "ScopedState",
    "SignedSender",
    "TcpProxy",
    "assert_arrived_once_in_order",
    "connector_context",
    "daemon_config",
    "fake_api_server",
    "first_copies",
    "in_entity_order",
    "read_jsonl",
    "running_connector",
    "running_daemon",
    "signed_webhook_source",
    "standard_webhook_headers",
    "stored_event_ids",
    "temp_store",
    "validate_config",
    "wait_for",
]

CONTRACT_NAME = "contract"


class FakeClock:
    """A clock tests move by hand: ``clock()`` is now, ``clock.advance(s)`` moves it; pass it as ``ctx.clock``."""

    def __init__(self, start: float = 1_750_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def temp_store(path: Path, clock: Callable[[], float] | None = None) -> AsyncIterator[Store]:
    """A real SQLite store at ``path`` (use ``tmp_path``), opened and closed around the block."""
    store = Store(path, synchronous="normal", clock=clock or FakeClock())
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def fake_api_server(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app (your fake of the provider's API) on 127.0.0.1 and yield its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []  # the bound socket; needed because we asked for port 0
    port = int(sockets[0].getsockname()[1]) if sockets else 0
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _role_of(cls: type[Connector[Any]]) -> Role:
    return "source" if "source" in cls.roles() else "sink"


def validate_config(
    cls: type[Connector[Any]], table: Mapping[str, Any], *, base_dir: Path, role: Role | None = None
) -> ConnectorConfig:
    """Validate ``table`` exactly as the daemon does at startup; raises ConfigError with key paths."""
    role = role or _role_of(cls)
    raw = {f"{role}s": {CONTRACT_NAME: {"connector": CONTRACT_NAME, **table}}}
    settings = parse_config(raw, base_dir=base_dir, registry=Registry.of({CONTRACT_NAME: cls}))
    table_ = settings.sources if role == "source" else settings.sinks
    return cast(ConnectorConfig, table_[CONTRACT_NAME].options)


def connector_context(
    store: Store,
    *,
    name: str = CONTRACT_NAME,
    role: Role = "source",
    base_dir: Path,
    pool: HttpPool | None = None,
    clock: Callable[[], float] | None = None,
    public_url: str | None = None,
) -> ConnectorContext:
    """The context the daemon would build for ``name``: state in ``store``, the shared HTTP pool, the clock."""
    logger = logging.getLogger(f"integrand.{role}.{name}")
    return ConnectorContext(
        name=name,
        role=role,
        base_dir=base_dir,
        state=ScopedState(store, f"{role}:{name}"),
        public_url=public_url,
        logger=logger,
        http=(pool or HttpPool()).for_connector(logging.getLogger(f"integrand.{role}.{name}.http")),
        clock=clock or FakeClock(),
    )


@asynccontextmanager
async def running_connector(
    cls: type[Connector[Any]],
    table: Mapping[str, Any],
    store: Store,
    *,
    base_dir: Path,
    role: Role | None = None,
    name: str = CONTRACT_NAME,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Connector[Any]]:
    """Validate ``table``, build the connector with a real context, ``start`` it, and ``close`` it afterwards."""
    role = role or _role_of(cls)
    options = validate_config(cls, table, base_dir=base_dir, role=role)
    pool = HttpPool(timeout=10.0)
    await pool.start()
    ctx = connector_context(store, name=name, role=role, base_dir=base_dir, pool=pool, clock=clock)
    inst = cls(options, ctx)
    try:
        await inst.start()
        try:
            yield inst
        finally:
            await inst.close()
    finally:
        await pool.close()


async def wait_for(
    predicate: Callable[[], Awaitable[bool] | bool],
    timeout: float = 10.0,  # noqa: ASYNC109 - the deadline is the point: it fails the test, it does not cancel
    interval: float = 0.02,
) -> None:
    """Poll ``predicate`` (plain or async) until it holds, failing after ``timeout`` s: waiting without guessing sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        res = predicate()
        if isinstance(res, Awaitable):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def daemon_config(tmp_path: Path, body: str) -> Path:
    """Write ``tmp_path/config.toml`` for ``running_daemon``: webhooks on a free port, state under
    ``tmp_path/var``, no admin port, retries in milliseconds; ``body`` adds the sources, sinks and routes."""
    path = tmp_path / "config.toml"
    path.write_text(
        """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
shutdown_grace = "5s"

[admin]
enabled = false

[dispatcher.retry]
base = "50ms"
cap = "1s"
"""
        + body
    )
    return path


class TcpProxy:
    """A TCP proxy on 127.0.0.1 (``port``) in front of a server that a test can cut: ``cut()`` aborts every
    connection through it at once, dropping whatever bytes are in flight (requests not yet at the server,
    answers not yet at the client), and ``refuse()`` / ``accept()`` make the server unreachable for a while.
    How a test loses connections to a server it shares with others and must not stop."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self.cuts = 0
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        for w in list(self._links):
            w.transport.abort()
        self._links.clear()
        self.cuts += 1

    def refuse(self) -> None:
        self.refusing = True
        self.cut()

    def accept(self) -> None:
        self.refusing = False

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._links.difference_update((writer, up_writer))


def read_jsonl(path: Path, *, torn_tail_ok: bool = False) -> list[dict[str, Any]]:
    """The lines a ``jsonl`` sink wrote (none yet: an empty list), for end-to-end assertions; a torn (partial)
    line fails the test. Read under a shared ``flock`` (the sink writes each batch under an exclusive one):
    never half a batch mid-append. ``torn_tail_ok``: right after a kill -9 the last line may be torn (the
    write was cut short; its event was never acknowledged and the sink cuts it off at start)."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            data = f.read()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    lines = data.split(b"\n")
    if torn_tail_ok and not data.endswith(b"\n"):
        lines = lines[:-1]  # only the last line can be torn; every other one must parse
    out = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            raise AssertionError(f"{path}: line {n + 1} is not a JSON object (torn write?): {line[:200]!r}") from None
    return out


def stored_event_ids(db: Path, source: str) -> list[str]:
    """The ids of the events a daemon's SQLite store (``var/integrand.db``) holds from ``source``, in the
    order they were stored: each once, whatever was redelivered (for crash tests)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT event_id FROM events WHERE source = ? ORDER BY id", (source,))]


def first_copies(lines: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Versions by entity id, in sink order, keeping only the first copy of each event id: what an
    idempotent sink ends with, for asserting per-entity order after at-least-once delivery."""
    seen: set[str] = set()
    by_entity: dict[str, list[Any]] = {}
    for ln in lines:
        if ln["id"] not in seen:
            seen.add(ln["id"])
            by_entity.setdefault(str(ln["entity_id"]), []).append(ln["version"])
    return by_entity


def in_entity_order(lines: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every entity's first copies (``first_copies``) reached the sink oldest version first."""
    return all(vs == sorted(vs, key=lambda v: version_key(str(v))) for vs in first_copies(lines).values())


def standard_webhook_headers(body: bytes, msg_id: str, secret: str, ts: int | None = None) -> dict[str, str]:
    """The headers a provider using Standard Webhooks sends with a JSON ``body``, signed with ``secret``."""
    ts = int(time.time()) if ts is None else ts
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": standard_sign(secret, msg_id, ts, body),
    }


def signed_webhook_source(name: str, secret: str) -> str:
    """The TOML of a Standard Webhooks source whose JSON bodies carry ``entity``, ``id`` and ``version``
    (what ``SignedSender`` posts): the usual front of an end-to-end test through a daemon."""
    return (
        f'[sources.{name}]\nconnector = "webhook"\nsignature = "standard-webhooks"\nsecret = "{secret}"\n'
        'entity_field = "entity"\nentity_id_field = "id"\nversion_field = "version"\n'
    )


class SignedSender:
    """Posts signed webhooks ``{"entity": "order", "id": "o<i % entities>", "version": i, "n": i}`` with id
    ``w<i>`` to a daemon's source, asserts each got 200, and keeps the event ids acknowledged (``sent``)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, secret: str, *, entities: int = 12) -> None:
        self.session, self.url, self.secret, self.entities = session, url, secret, entities
        self.source = url.rstrip("/").rsplit("/", 1)[-1]
        self.sent: list[str] = []

    async def send(self, numbers: Iterable[int]) -> None:
        """Send ``numbers`` one after another (a version order per entity)."""
        for i in numbers:
            body = orjson.dumps({"entity": "order", "id": f"o{i % self.entities}", "version": i, "n": i})
            headers = standard_webhook_headers(body, f"w{i}", self.secret)
            async with self.session.post(self.url, data=body, headers=headers) as r:
                assert r.status == 200, f"webhook w{i}: {r.status} {await r.text()}"
            self.sent.append(f"{self.source}:w{i}")

    def lanes(self, n: int, lanes: int) -> asyncio.Future[list[None]]:
        """Send 0..n-1 from ``lanes`` concurrent senders, lane k sending k, k+lanes, …: each entity's versions
        stay in order as long as ``entities`` is a multiple of ``lanes``. Returns the running future."""
        return asyncio.ensure_future(asyncio.gather(*(self.send(range(k, n, lanes)) for k in range(lanes))))


def assert_arrived_once_in_order(out: Path, sent: Sequence[str]) -> None:
    """Every acknowledged event id of ``sent`` reached the jsonl file ``out`` (nothing else did), and each
    entity's first copies in version order."""
    lines = read_jsonl(out)
    assert {ln["id"] for ln in lines} == set(sent), "the sink's ids differ from the acknowledged ones"
    assert in_entity_order(lines), "an entity's versions reached the sink out of order"


@asynccontextmanager
async def running_daemon(config: Path | Any) -> AsyncIterator[Any]:
    """A whole integrand on ``config`` (a path, or loaded Settings) in this event loop until the block ends.

    Listen on port 0 in the config; the bound ports are in ``daemon.ports``. Startup errors are raised.
    """
    from .app import Daemon, run
    from .config import load_config

    settings = load_config(config) if isinstance(config, Path) else config
    ready: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(settings, on_ready=ready.set_result))
    waiting: list[asyncio.Future[Any]] = [task, ready]
    done, _ = await asyncio.wait(waiting, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what went wrong at startup
    assert ready.done(), "daemon did not become ready within 30 s"
    d = ready.result()
    try:
        yield d
    finally:
        d.stop()
        await asyncio.wait_for(task, 30)


class DaemonProcess:
    """``integrand run`` as a real child process, for crash and lifecycle tests: ``start``, ``kill`` (-9),
    ``stop`` (SIGTERM), ``signal``, ``wait``; ``port``/``admin_port`` are read from its ``ready`` line.

    Its log goes to a file (nothing blocks on a full pipe); ``output()`` is this run's part of it (a
    restart appends to the same file). ``env`` adds variables (e.g. ``PYTHONPATH``) to the child's
    environment; ``python`` is what runs ``integrand run`` (the module by default, a ``-c`` wrapper for
    fault injection); ``pass_fds`` are inherited (socket activation)."""

    READY = re.compile(r"ready: webhooks on [^:]+:(\d+), admin on (?:[^:]+:(\d+)|off)")

    def __init__(
        self,
        config: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
        *,
        python: Sequence[str] = ("-m", "integrand.cli"),
        pass_fds: Sequence[int] = (),
    ):
        self.config = config
        self.log = log
        self.env = dict(env or {})
        self.python = tuple(python)
        self.pass_fds = tuple(pass_fds)
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.admin_port: int | None = None
        self._log_from = 0

    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a deadline that fails the test
        import sys

        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *self.python,
                "run",
                "--config",
                str(self.config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                pass_fds=self.pass_fds,
            )
        await wait_for(self._ready, timeout=timeout, interval=0.05)

    def _ready(self) -> bool:
        assert self.proc is not None
        m = self.READY.search(self.output())
        if m is None:
            if self.proc.returncode is not None:
                raise AssertionError(f"integrand exited with {self.proc.returncode}:\n{self.output()}")
            return False
        self.port = int(m.group(1))
        self.admin_port = int(m.group(2)) if m.group(2) else None
        return True

    def output(self) -> str:
        if not self.log.exists():
            return ""
        return self.log.read_bytes()[self._log_from :].decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, source: str = "demo") -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{source}"

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:  # noqa: ASYNC109
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        """SIGKILL and reap: nothing of this process runs afterwards."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def stop(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """SIGTERM and wait for the exit code (0 for a clean stop)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        return await asyncio.wait_for(self.proc.wait(), timeout)


# --- fixtures every test gets once integrand is installed ------------------------------------------


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock that only moves when the test says so."""
    return FakeClock()


@pytest_asyncio.fixture
async def integrand_store(tmp_path: Path, fake_clock: FakeClock) -> AsyncIterator[Store]:
    """A real store in ``tmp_path`` on the fake clock."""
    async with temp_store(tmp_path / "integrand-test.db", fake_clock) as store:
        yield store


@pytest_asyncio.fixture
async def http_pool() -> AsyncIterator[HttpPool]:
    """A started HTTP pool (what the daemon shares between connectors), closed after the test."""
    pool = HttpPool(timeout=10.0)
    await pool.start()
    yield pool
    await pool.close()


# --- the contract suite -----------------------------------------------------------------------------


class ConnectorContract:
    """What every connector must do; subclass it as ``TestSomething`` and set ``connector_class`` and ``config``.

    Each check runs only for the capabilities the class declares. Give it real
    inputs by overriding the fixtures below; the defaults suit a connector with no
    required keys and a sink that accepts any JSON object.
    """

    connector_class: ClassVar[type[Connector[Any]] | None] = None
    config: ClassVar[Mapping[str, Any]] = {}
    #: Set when the connector's job is to write files named by its config (a file sink); otherwise any
    #: file it creates in its base folder or the working folder fails the suite: state belongs in ``ctx.state``.
    writes_files: ClassVar[bool] = False
    #: Polls and reconciliations must finish within this many pages against the fake API.
    max_pages: ClassVar[int] = 100

    # Fixtures an author overrides ------------------------------------------------------------------

    @pytest.fixture
    def connector_cls(self) -> type[Connector[Any]]:
        """The class under test (override to load it another way, e.g. through its entry point)."""
        if self.connector_class is None:
            raise AssertionError(f"{type(self).__name__}: set connector_class = YourConnector")
        return self.connector_class

    @pytest.fixture
    def fake_api(self) -> Any:
        """A local fake of the provider's API (override; usually yields its base URL)."""
        return None

    @pytest.fixture
    def connector_config(self, fake_api: Any) -> Mapping[str, Any]:
        """The connector's config table (override to point it at ``fake_api``)."""
        return dict(self.config)

    @pytest.fixture
    def webhook_body(self) -> bytes:
        """A body the provider would POST (webhook sources)."""
        return b'{"test": 1}'

    @pytest.fixture
    def sink_events(self) -> Sequence[Event]:
        """Events to deliver (sinks)."""
        return [Event(id="contract-1", source="contract-src", type="test.created", data={"id": "1", "name": "A"})]

    @pytest.fixture
    def api_faults(self) -> Callable[[int | None, dict[str, str]], None] | None:
        """``fail(status, headers)``: the fake API answers every request so until ``fail(None, {})``; None skips."""
        return None

    @pytest.fixture
    def request_id_header(self) -> str:
        """The response header in which the provider (and so the fake) sends its request id."""
        return "X-Request-Id"

    @pytest.fixture
    def thin_event(self) -> Event | None:
        """An event as a webhook would produce it, for ``fetch`` (enrichers); None skips that check."""
        return None

    # The connector under test --------------------------------------------------------------------

    @pytest.fixture
    def base_dir(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        """An empty folder that is both the config's folder and the working folder."""
        base = tmp_path / "base"
        base.mkdir()
        monkeypatch.chdir(base)
        return base

    @pytest_asyncio.fixture
    async def connector(
        self,
        connector_cls: type[Connector[Any]],
        connector_config: Mapping[str, Any],
        base_dir: Path,
        integrand_store: Store,
        fake_clock: FakeClock,
    ) -> AsyncIterator[Connector[Any]]:
        async with running_connector(
            connector_cls, connector_config, integrand_store, base_dir=base_dir, clock=fake_clock
        ) as inst:
            yield inst

    # The checks ----------------------------------------------------------------------------------

    def test_declares_capabilities_and_a_config_model(self, connector_cls: type[Connector[Any]]) -> None:
        assert issubclass(connector_cls, Connector)
        assert connector_cls.capabilities(), "subclass at least one of WebhookSource, PollingSource, Sink, …"
        assert issubclass(connector_cls.Config, ConnectorConfig), "Config must subclass ConnectorConfig"
        assert (connector_cls.__doc__ or "").strip(), "say in one line what the connector is for"

    def test_config_errors_name_the_key_path(
        self, connector_cls: type[Connector[Any]], connector_config: Mapping[str, Any], tmp_path: Path
    ) -> None:
        validate_config(connector_cls, connector_config, base_dir=tmp_path)
        plural = _role_of(connector_cls) + "s"
        with pytest.raises(ConfigError) as err:
            validate_config(connector_cls, {**connector_config, "no_such_key_xyz": 1}, base_dir=tmp_path)
        assert err.value.problems == [f"{plural}.{CONTRACT_NAME}.no_such_key_xyz: unknown key"]
        for key, info in connector_cls.Config.model_fields.items():
            alias = info.alias or key
            if info.is_required() and alias in connector_config:
                table = {k: v for k, v in connector_config.items() if k != alias}
                with pytest.raises(ConfigError) as missing:
                    validate_config(connector_cls, table, base_dir=tmp_path)
                assert f"{plural}.{CONTRACT_NAME}.{alias}: required key is missing" in missing.value.problems

    @pytest.mark.asyncio
    async def test_keeps_state_in_the_store_not_in_files(self, connector: Connector[Any], base_dir: Path) -> None:
        await _exercise(connector)
        if not self.writes_files:
            left = sorted(str(p.relative_to(base_dir)) for p in base_dir.rglob("*"))  # noqa: ASYNC240 - a test
            assert left == [], f"the connector wrote files of its own (use ctx.state): {left}"

    @pytest.mark.asyncio
    async def test_webhook_verify_then_parse(
        self, connector: Connector[Any], webhook_body: bytes, fake_clock: FakeClock
    ) -> None:
        if not isinstance(connector, WebhookSource):
            pytest.skip("not a webhook source")
        now = fake_clock()
        headers = connector.sign(webhook_body, now, "contract-delivery-1")
        if headers is None:
            pytest.skip("the connector cannot sign test webhooks (sign() returned None)")
        req = _request(connector, webhook_body, headers)
        connector.verify(req, now)
        events = connector.parse(req)
        assert events, "a verified webhook produced no events"
        again = connector.parse(req)
        assert [e.id for e in events] == [e.id for e in again], "event ids must be stable (they are the dedup key)"
        for e in events:
            assert e.id
            assert e.source == connector.ctx.name
            assert e.type
        tampered = _request(connector, webhook_body + b" ", headers)
        with pytest.raises(SignatureError):
            connector.verify(tampered, now)
        with pytest.raises(SignatureError):
            connector.verify(_request(connector, webhook_body, {"Content-Type": "application/json"}), now)

    @pytest.mark.asyncio
    async def test_poll_pages_end_and_cursor_is_json(self, connector: Connector[Any]) -> None:
        if not isinstance(connector, PollingSource):
            pytest.skip("not a polling source")
        seen: set[str] = set()
        cursor: Any = None
        for _ in range(self.max_pages):
            res = await connector.poll(cursor)
            assert orjson.loads(orjson.dumps(res.cursor)) == res.cursor, "the cursor must survive a JSON round trip"
            for e in res.events:
                assert e.source == connector.ctx.name
                assert e.id
                seen.add(e.id)
            cursor = res.cursor
            if not res.more:
                break
        else:
            raise AssertionError(f"poll still had more after {self.max_pages} pages against an unchanging API")
        res = await connector.poll(cursor)
        new = {e.id for e in res.events} - seen
        assert not new, f"polling again from the last cursor produced events never seen before: {sorted(new)[:5]}"

    @pytest.mark.asyncio
    async def test_reconcile_pages_are_bounded_and_versioned(self, connector: Connector[Any]) -> None:
        if not isinstance(connector, ReconcilingSource):
            pytest.skip("not a reconciling source")
        cursor: Any = None
        for _ in range(self.max_pages):
            res = await connector.reconcile(None, cursor)
            assert len(res.events) <= type(connector).page_size
            for e in res.events:
                assert e.entity and e.entity_id and e.version, f"reconciled event {e.id} lacks entity/id/version"
                assert e.source == connector.ctx.name
            for gone in res.deleted:
                assert len(gone) == 2 and all(isinstance(x, str) for x in gone), "deleted holds (entity, entity_id)"
            assert orjson.loads(orjson.dumps(res.cursor)) == res.cursor, "the cursor must survive a JSON round trip"
            cursor = res.cursor
            if not res.more:
                return
        raise AssertionError(f"reconcile did not finish within {self.max_pages} pages")

    @pytest.mark.asyncio
    async def test_fetch_keeps_the_event_identity(self, connector: Connector[Any], thin_event: Event | None) -> None:
        if not isinstance(connector, Enricher):
            pytest.skip("not an enricher")
        if thin_event is None:
            pytest.skip("no thin_event fixture given")
        identity = (thin_event.id, thin_event.source, thin_event.entity, thin_event.entity_id)
        full = await connector.fetch(thin_event)
        assert (full.id, full.source, full.entity, full.entity_id) == identity
        [many] = await connector.fetch_many([thin_event])
        assert isinstance(many, Event), f"fetch_many failed where fetch succeeded: {many!r}"
        assert (many.id, many.source, many.entity, many.entity_id) == identity

    @pytest.mark.asyncio
    async def test_errors_are_mapped_at_the_edge(
        self,
        connector: Connector[Any],
        api_faults: Callable[[int | None, dict[str, str]], None] | None,
        request_id_header: str,
        sink_events: Sequence[Event],
    ) -> None:
        if api_faults is None:
            pytest.skip("no api_faults fixture given")
        if isinstance(connector, Sink):
            call: Callable[[], Awaitable[Any]] = lambda: connector.deliver(sink_events[0])  # noqa: E731
        elif isinstance(connector, PollingSource):
            call = lambda: connector.poll(None)  # noqa: E731
        else:
            pytest.skip("neither a sink nor a polling source")
        rid = {request_id_header: "contract-rid"}
        api_faults(429, {"Retry-After": "7", **rid})
        with pytest.raises(RetryableError) as throttled:
            await call()
        assert throttled.value.retry_after == 7, "Retry-After must reach RetryableError.retry_after"
        connector.ctx.http.pool.clear_pauses()  # the helper honours that 429 for the account; move on now
        api_faults(503, rid)
        with pytest.raises(RetryableError) as down:
            await call()
        assert down.value.request_id == "contract-rid", "keep the provider's request id in the error"
        api_faults(400, rid)
        with pytest.raises(PermanentError) as refused:
            await call()
        assert refused.value.request_id == "contract-rid", "keep the provider's request id in the error"
        api_faults(401, rid)
        with pytest.raises(AuthError):
            await call()
        api_faults(None, {})
        await call()  # and it recovers once the API does

    @pytest.mark.asyncio
    async def test_sink_delivers_and_redelivery_is_harmless(
        self, connector: Connector[Any], sink_events: Sequence[Event]
    ) -> None:
        if not isinstance(connector, Sink):
            pytest.skip("not a sink")
        for e in sink_events:
            await connector.deliver(e)
            await connector.deliver(e)  # at-least-once: the same event (same key) again must not fail
        results = await connector.deliver_batch(list(sink_events))
        assert len(results) == len(sink_events)
        assert all(r is None for r in results), results


async def _exercise(connector: Connector[Any]) -> None:
    """Use every capability once (with no inputs beyond the defaults) so file-writing would show."""
    if isinstance(connector, PollingSource):
        await connector.poll(None)
    if isinstance(connector, ReconcilingSource):
        await connector.reconcile(None, None)


def _request(connector: Connector[Any], body: bytes, headers: Mapping[str, str]) -> WebhookRequest:
    url = f"{connector.ctx.public_url or 'http://127.0.0.1:8080'}/hooks/{connector.ctx.name}"
    hdrs = CIMultiDict({"Content-Type": "application/json", **headers})  # case-insensitive, as aiohttp gives them
    return WebhookRequest(
        source=connector.ctx.name,
        method="POST",
        url=url,
        headers=hdrs,
        body=body,
        received_at=utcnow_iso(),
        content_type=hdrs["Content-Type"].split(";")[0].strip(),
        remote="127.0.0.1",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """Show that the kit is active and which plugins the run may discover."""
    return f"integrand.testing: INTEGRAND_PLUGINS={os.environ.get('INTEGRAND_PLUGINS', '(all)')}"
