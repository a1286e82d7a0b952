"""TOML → frozen, validated settings; every problem reported at once with its key path."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from . import connections
from .errors import ConfigError
from .keypaths import format_errors as _format
from .keypaths import suggest as _suggest
from .plugins import PluginError, Registry
from .routes import FilterSettings as FilterSettings  # re-exported: routes own their settings
from .routes import RouteSettings as RouteSettings
from .routes import load_mapping
from .sagarunner import SagaSettings, parse_sagas
from .secrets import SecretValue
from .types import Duration, HostPort, ListenAddress, RelPath, StrictModel, parse_duration
from .validate import compile_validator

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class DaemonSettings(StrictModel):
    listen: ListenAddress = HostPort("127.0.0.1", 8080)
    # Relative (the default too) to the config file's folder, never to the working directory the command runs in.
    state_dir: RelPath = Field(default=Path("var"), validate_default=True)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # Levels for named loggers, e.g. {aiosqlite = "debug"}: libraries' loggers stay at warning otherwise.
    log_levels: dict[str, Literal["debug", "info", "warning", "error"]] = {}
    public_url: str | None = None
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    shutdown_grace: Duration = 10.0
    rejections_kept: int = Field(default=1000, ge=0)
    # Peers (addresses or CIDR networks) whose X-Forwarded-For is believed for the client's address.
    trusted_proxies: list[str] = []

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network (e.g. '10.0.0.0/8')") from None
        return v

    # Refused webhooks written to the store at most this many a second (the rest are counted in metrics).
    rejections_per_second: float = Field(default=10.0, ge=0)
    # Limits a hostile client cannot exceed (docs/reliability.md). orjson cannot store JSON nested 255 deep.
    max_json_depth: int = Field(default=64, ge=1, le=200)
    max_connections: int = Field(default=4096, ge=1)
    max_connections_per_ip: int = Field(default=256, ge=1)
    header_timeout: Duration = 10.0
    body_timeout: Duration = 30.0
    keepalive_timeout: Duration = 15.0


class AdminSettings(StrictModel):
    enabled: bool = True
    listen: ListenAddress = HostPort("127.0.0.1", 8081)
    # The CLI's way in: a unix socket (mode 0600) under state_dir unless absolute; "" turns it off.
    socket: str = "admin.sock"
    # Bearer token every TCP admin request must carry; required when `listen` is not a loopback address.
    token: SecretValue | None = None


class AlertSettings(StrictModel):
    """``[alerts]``: post docs/alerts.yml's conditions to a chat webhook, once per change of state."""

    # A Slack-compatible incoming-webhook URL, by secret reference (the URL is the credential).
    webhook_url: SecretValue | None = None
    check_every: Duration = 30.0
    # The thresholds, the same as the shipped Prometheus rules'.
    dlq_window: Duration = 900.0
    breaker_open_for: Duration = 300.0
    oldest_pending: Duration = 900.0
    poll_lag_factor: float = Field(default=2.0, gt=0)
    reconcile_window: Duration = 3600.0


class StoreSettings(StrictModel):
    path: RelPath | None = None
    synchronous: Literal["full", "extra", "normal"] = "full"
    busy_timeout: Duration = 5.0
    retention: Duration = 7 * 86400.0
    max_size_mb: int | None = Field(default=None, gt=0)
    commit_max_rows: int = Field(default=4000, gt=0)
    # "postgres": a PostgreSQL database several nodes share (docs/operations.md, "A PostgreSQL store").
    backend: Literal["sqlite", "postgres"] = "sqlite"
    # The PostgreSQL connection URL (postgresql://user@host:port/db), by secret reference only: {env = "…"}.
    dsn: SecretValue | None = None
    pool_size: int = Field(default=8, gt=0)  # connections per node to the PostgreSQL store


class ClusterSettings(StrictModel):
    """``[cluster]``: several nodes on one PostgreSQL store (ignored on SQLite but for the node id)."""

    # How this node is named in `integrand status`, the nodes table and metrics; default host:pid.
    node_id: str | None = Field(default=None, min_length=1, max_length=200)
    # A singleton's lease lapses this long after its holder's last renewal (renewed every lease_ttl / 3):
    # the longest a dead node's sources wait for another node.
    lease_ttl: Duration = Field(default=15.0, ge=1.0, le=3600.0)


class RetrySettings(StrictModel):
    base: Duration = 1.0
    cap: Duration = 3600.0
    max_attempts: int = Field(default=25, ge=1)
    max_age: Duration = 3 * 86400.0


class BreakerSettings(StrictModel):
    failure_threshold: int = Field(default=5, ge=1)
    open_for: Duration = 5.0
    max_open_for: Duration = 60.0


class DispatcherSettings(StrictModel):
    workers: int = Field(default=8, ge=1, le=1024)
    lease: Duration = 60.0
    batch_size: int = Field(default=256, ge=1)
    linger: Duration = 0.005
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()


class PollSettings(StrictModel):
    """``[sources.NAME.poll]``: how often a polling source is asked for changes, and reconciliation."""

    # false: never poll on a schedule (a webhook source that only reconciles).
    enabled: bool = True
    min_interval: Duration = 5.0
    max_interval: Duration = 900.0
    target_latency: Duration = 60.0
    max_requests_per_hour: int | None = Field(default=None, ge=1)
    budget_reserve: float = Field(default=0.2, ge=0, lt=1)
    aggressiveness: float = Field(default=0.2, gt=0)
    # Unset: 60 target latencies (1 h at the default 60 s target).
    rate_half_life: Duration | None = None
    seasonal: bool = True
    # A webhook accepted for this source brings the next poll forward to `nudge_debounce` from now.
    nudge: bool = True
    nudge_debounce: Duration = 2.0
    # Cron syntax ("0 2 * * *", UTC) or an interval ("6h"); off when unset.
    reconcile: str | None = None
    # How far back each reconciliation looks; unset = the full remote state.
    reconcile_window: Duration | None = None

    @field_validator("reconcile")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        if v is not None:
            reconcile_schedule(v)
        return v

    @model_validator(mode="after")
    def _bounds(self) -> PollSettings:
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("poll: need 0 < min_interval <= max_interval")
        if self.target_latency <= 0:
            raise ValueError("poll: target_latency must be positive")
        return self


def reconcile_schedule(spec: str) -> float | str:
    """A reconcile schedule as seconds (an interval) or a validated cron expression."""
    try:
        return parse_duration(spec)
    except PydanticCustomError:
        pass
    from croniter import croniter

    if not croniter.is_valid(spec):
        raise ValueError(f"reconcile: {spec!r} is neither cron syntax ('0 2 * * *') nor an interval ('6h')")
    return spec


class StreamSettings(StrictModel):
    """``[sources.NAME.streaming]``: how integrand runs a streaming source (a broker consumer, a CDC slot)."""

    # Reconnect after a retryable error (or a refused commit) with full-jitter backoff from base to cap.
    backoff_base: Duration = 0.5
    backoff_cap: Duration = 30.0
    # After an error that needs a human (AuthError, PermanentError) the stream alerts and waits this long
    # before trying again (fix the credentials or the upstream meanwhile; a restart retries at once).
    alert_retry: Duration = 300.0

    @model_validator(mode="after")
    def _bounds(self) -> StreamSettings:
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ValueError("stream: need 0 < backoff_base <= backoff_cap")
        return self


class SyncSettings(StrictModel):
    """``[[syncs]]``: a sync from a source that can list its records to a sink, on a schedule (integrand.sync)."""

    from_: str = Field(alias="from")
    to: str
    # Cron syntax ("0 3 * * *", UTC) or an interval ("6h"), as for reconciliation.
    schedule: str
    # full: everything, staged and merged (deletes what is gone); incremental: what changed since the last run.
    mode: Literal["full", "incremental"] = "full"

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        reconcile_schedule(v)
        return v


class SourceCore(StrictModel):
    """Keys every source table accepts whatever its connector."""

    connector: str
    max_body_bytes: int | None = Field(default=None, gt=0)
    max_json_depth: int | None = Field(default=None, ge=1, le=200)
    poll: PollSettings = PollSettings()
    # Not `stream`: that is what brokers call their streams, and connectors own their keys.
    streaming: StreamSettings = StreamSettings()


class SinkCore(StrictModel):
    """Keys every sink table accepts whatever its connector."""

    connector: str
    batch_size: int | None = Field(default=None, ge=1)
    retry: RetrySettings | None = None
    breaker: BreakerSettings | None = None


SOURCE_CORE_KEYS = frozenset(SourceCore.model_fields)
SINK_CORE_KEYS = frozenset(SinkCore.model_fields)


@dataclass(frozen=True)
class ConnectorSettings:
    """A configured source or sink: its name, connector class and validated options."""

    name: str
    role: Literal["source", "sink"]
    connector: str
    cls: type[Any]
    options: BaseModel
    core: SourceCore | SinkCore
    connection: str | None = None  # the [connections.NAME] it shares credentials and state with

    @property
    def state_scope(self) -> str:
        """Where its durable state (tokens, cursors) lives: shared by everything on one connection."""
        return connections.scope(self.role, self.name, self.connection)


@dataclass(frozen=True)
class Settings:
    path: Path | None
    base_dir: Path
    daemon: DaemonSettings
    admin: AdminSettings
    store: StoreSettings
    dispatcher: DispatcherSettings
    sources: Mapping[str, ConnectorSettings]
    sinks: Mapping[str, ConnectorSettings]
    routes: tuple[RouteSettings, ...]
    warnings: tuple[str, ...] = field(default=())
    syncs: tuple[SyncSettings, ...] = field(default=())
    alerts: AlertSettings = field(default_factory=AlertSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    sagas: tuple[SagaSettings, ...] = field(default=())  # [[sagas]]: multi-step routes (integrand.sagarunner)

    @property
    def admin_socket(self) -> Path | None:
        """Where the daemon's admin unix socket lives (None: turned off)."""
        if not self.admin.enabled or not self.admin.socket:
            return None
        return self.daemon.state_dir / self.admin.socket

    @property
    def db_path(self) -> Path:
        return self.store.path or self.daemon.state_dir / "integrand.db"

    def retry_for(self, sink: str) -> RetrySettings:
        core = self.sinks[sink].core
        assert isinstance(core, SinkCore)
        return core.retry or self.dispatcher.retry

    def breaker_for(self, sink: str) -> BreakerSettings:
        core = self.sinks[sink].core
        assert isinstance(core, SinkCore)
        return core.breaker or self.dispatcher.breaker


def config_path(arg: str | None) -> Path:
    """``--config``, else ``$INTEGRAND_CONFIG``, else ``./config.toml``."""
    return Path(arg or os.environ.get("INTEGRAND_CONFIG") or "config.toml")


def _store_problems(store: StoreSettings) -> list[str]:
    """The [store] keys that only make sense together: a PostgreSQL backend needs a postgresql:// DSN."""
    if store.backend != "postgres":
        return ['store.dsn: only used with store.backend = "postgres"'] if store.dsn is not None else []
    if store.dsn is None:
        return [
            'store.dsn: required when store.backend = "postgres" '
            '(give a secret reference such as {env = "INTEGRAND_STORE_DSN"})'
        ]
    if store.dsn.origin == "inline":
        return [
            "store.dsn: give it by reference ({env = …}, {file = …} or {credential = …}), not inline: "
            "a DSN carries the database's password"
        ]
    if store.dsn.resolved and not store.dsn.reveal().startswith(("postgresql://", "postgres://")):
        return [f"store.dsn: expected a postgresql:// URL (from {store.dsn.origin})"]
    return []


def load_config(path: Path, registry: Registry | None = None, *, lazy_secrets: bool = False) -> Settings:
    """Read and validate a config file; ``lazy_secrets`` leaves env/file/credential secrets unread until used."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config: {e.strerror}"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    return parse_config(raw, base_dir=path.resolve().parent, path=path, registry=registry, lazy_secrets=lazy_secrets)


def parse_config(
    raw: dict[str, Any],
    *,
    base_dir: Path,
    path: Path | None = None,
    registry: Registry | None = None,
    lazy_secrets: bool = False,
) -> Settings:
    """Validate a parsed TOML document; raise ConfigError listing every problem found."""
    registry = registry or Registry.default()
    problems: list[str] = []
    ctx: dict[str, Any] = {"base_dir": base_dir, "lazy_secrets": lazy_secrets}
    known = {
        "daemon", "admin", "store", "dispatcher", "sources", "sinks", "routes", "sagas", "syncs", "alerts",
        "connections", "cluster",
    }  # fmt: skip
    for key in raw:
        if key not in known:
            problems.append(f"{key}: unknown table{_suggest(key, known)}")

    def section(name: str, model: type[StrictModel]) -> Any:
        try:
            return model.model_validate(raw.get(name, {}), context=ctx)
        except ValidationError as e:
            problems.extend(_format(e, name, model))
            return model.model_construct()

    daemon = section("daemon", DaemonSettings)
    admin = section("admin", AdminSettings)
    store = section("store", StoreSettings)
    dispatcher = section("dispatcher", DispatcherSettings)
    alerts = section("alerts", AlertSettings)
    cluster = section("cluster", ClusterSettings)

    raw, shared = connections.expand(raw, {"sources": SOURCE_CORE_KEYS, "sinks": SINK_CORE_KEYS}, problems)
    sources = _connectors(raw.get("sources", {}), "source", registry, ctx, problems)
    sinks = _connectors(raw.get("sinks", {}), "sink", registry, ctx, problems)
    sources = {n: replace(s, connection=shared.get(("sources", n))) for n, s in sources.items()}
    sinks = {n: replace(s, connection=shared.get(("sinks", n))) for n, s in sinks.items()}

    routes: list[RouteSettings] = []
    raw_routes = raw.get("routes", [])
    if not isinstance(raw_routes, list):
        problems.append("routes: expected [[routes]] entries")
        raw_routes = []
    pairs: set[tuple[str, str]] = set()
    all_sources = set(raw.get("sources", {}) or {}) if isinstance(raw.get("sources"), dict) else set()
    all_sinks = set(raw.get("sinks", {}) or {}) if isinstance(raw.get("sinks"), dict) else set()
    for i, r in enumerate(raw_routes):
        try:
            route = RouteSettings.model_validate(r, context=ctx)
        except ValidationError as e:
            problems.extend(_format(e, f"routes[{i}]", RouteSettings))
            continue
        if route.from_ not in all_sources:
            problems.append(f"routes[{i}].from: no source named {route.from_!r}{_suggest(route.from_, all_sources)}")
        for j, sink in enumerate(route.to):
            if sink not in all_sinks:
                problems.append(f"routes[{i}].to[{j}]: no sink named {sink!r}{_suggest(sink, all_sinks)}")
            if (route.from_, sink) in pairs:
                problems.append(f"routes[{i}].to[{j}]: a route from {route.from_!r} to {sink!r} is already defined")
            pairs.add((route.from_, sink))
        guard = route.loop_guard
        if guard is not None and guard.echo_source is not None and guard.echo_source not in all_sources:
            problems.append(
                f"routes[{i}].loop_guard.echo_source: no source named {guard.echo_source!r}"
                f"{_suggest(guard.echo_source, all_sources)}"
            )
        if route.enrich and route.from_ in sources and "fetch" not in sources[route.from_].cls.capabilities():
            problems.append(
                f"routes[{i}].enrich: source {route.from_!r} (connector {sources[route.from_].connector!r}) "
                "cannot fetch records"
            )
        problems.extend(load_mapping(route, f"routes[{i}]")[1])
        problems.extend(compile_validator(route.validate_, f"routes[{i}]")[1])
        routes.append(route)

    syncs = _syncs(raw.get("syncs", []), sources, all_sources, all_sinks, ctx, problems)
    sagas = parse_sagas(raw.get("sagas", []), ctx, sources, all_sources, all_sinks, problems)

    if admin.enabled and daemon.listen == admin.listen and daemon.listen.port != 0:
        problems.append("admin.listen: must differ from daemon.listen (admin endpoints are never on the webhook port)")

    if admin.enabled and admin.token is None and not _loopback(admin.listen.host):
        problems.append(
            f"admin.token: required when admin.listen ({admin.listen}) is not a loopback address "
            '(give a secret reference such as {credential = "admin-token"})'
        )
    if admin.enabled and admin.socket:
        sock = (daemon.state_dir / admin.socket) if isinstance(daemon.state_dir, Path) else Path(admin.socket)
        if len(os.fsencode(sock)) > 100:
            problems.append(
                f"admin.socket: {sock} is too long for a unix socket (at most 100 bytes); give a shorter path"
            )
    problems.extend(_store_problems(store))
    hook = alerts.webhook_url
    if hook is not None and hook.resolved and not hook.reveal().startswith(("http://", "https://")):
        problems.append(f"alerts.webhook_url: expected an http:// or https:// URL (from {hook.origin})")

    if problems:
        raise ConfigError(problems)
    warnings = tuple(
        f"sources.{name}: no route sends its events anywhere; they are stored but not delivered"
        for name in sources
        if not any(r.from_ == name for r in routes) and not any(sg.from_ == name for sg in sagas)
    ) + tuple(  # a connector's own "accepted, but know this" (e.g. an unsigned webhook source)
        f"{cs.role}s.{name}: {w}"
        for table in (sources, sinks)
        for name, cs in table.items()
        for w in getattr(cs.options, "warnings", list)()
    )
    return Settings(
        path=path,
        base_dir=base_dir,
        daemon=daemon,
        admin=admin,
        store=store,
        dispatcher=dispatcher,
        sources=sources,
        sinks=sinks,
        routes=tuple(routes),
        warnings=warnings,
        syncs=syncs,
        alerts=alerts,
        cluster=cluster,
        sagas=sagas,
    )


def _syncs(
    raw: Any,
    sources: Mapping[str, ConnectorSettings],
    source_names: set[str],
    sinks: set[str],
    ctx: dict[str, Any],
    problems: list[str],
) -> tuple[SyncSettings, ...]:
    if not isinstance(raw, list):
        problems.append("syncs: expected [[syncs]] entries")
        return ()
    out = []
    for i, r in enumerate(raw):
        try:
            sync = SyncSettings.model_validate(r, context=ctx)
        except ValidationError as e:
            problems.extend(_format(e, f"syncs[{i}]", SyncSettings))
            continue
        cs = sources.get(sync.from_)
        if sync.from_ not in source_names:
            problems.append(f"syncs[{i}].from: no source named {sync.from_!r}{_suggest(sync.from_, source_names)}")
        elif cs is not None and "reconcile" not in cs.cls.capabilities():
            problems.append(f"syncs[{i}].from: connector {cs.connector!r} cannot list its records (reconcile)")
        if sync.to not in sinks:
            problems.append(f"syncs[{i}].to: no sink named {sync.to!r}{_suggest(sync.to, sinks)}")
        out.append(sync)
    return tuple(out)


def _loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can reach an admin port bound there."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _connectors(
    tables: Any, role: Literal["source", "sink"], registry: Registry, ctx: dict[str, Any], problems: list[str]
) -> dict[str, ConnectorSettings]:
    plural = role + "s"
    out: dict[str, ConnectorSettings] = {}
    if not isinstance(tables, dict):
        problems.append(f"{plural}: expected tables [{plural}.NAME]")
        return out
    core_model: type[SourceCore | SinkCore] = SourceCore if role == "source" else SinkCore
    core_keys = SOURCE_CORE_KEYS if role == "source" else SINK_CORE_KEYS
    for name, table in tables.items():
        where = f"{plural}.{name}"
        if not NAME.match(name):
            problems.append(f"{where}: name must be letters, digits, '-' or '_' (it appears in URLs and logs)")
            continue
        if not isinstance(table, dict):
            problems.append(f"{where}: expected a table")
            continue
        core_raw = {k: v for k, v in table.items() if k in core_keys}
        rest = {k: v for k, v in table.items() if k not in core_keys}
        try:
            core = core_model.model_validate(core_raw, context=ctx)
        except ValidationError as e:
            problems.extend(_format(e, where, core_model))
            continue
        try:
            cls = registry.load(core.connector)
        except PluginError as e:
            problems.append(f"{where}.connector: {e}")
            continue
        if role not in cls.roles():
            problems.append(
                f"{where}.connector: connector {core.connector!r} cannot be a {role} "
                f"(it can be: {', '.join(sorted(cls.roles())) or 'nothing'})"
            )
            continue
        if isinstance(core, SourceCore) and core.poll.reconcile is not None and "reconcile" not in cls.capabilities():
            problems.append(f"{where}.poll.reconcile: connector {core.connector!r} cannot reconcile")
            continue
        try:
            options = cls.Config.model_validate(rest, context=ctx)
        except ValidationError as e:
            problems.extend(_format(e, where, cls.Config, extra_known=core_keys))
            continue
        out[name] = ConnectorSettings(name, role, core.connector, cls, options, core)
    return out
