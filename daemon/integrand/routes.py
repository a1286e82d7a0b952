"""Routes: which sinks get which events, and what happens between source and sink (enrich, map, loop guard).

Which sinks an event goes to is decided when it is stored (:class:`Router`). What
each sink receives is decided at delivery time (:class:`RouteRuntime`), per
(source, sink) pair:

1. **enrich** — with ``enrich = true`` the source's ``fetch`` turns a thin event
   into one carrying the record's current data;
2. **map** — a declarative field mapping (``[routes.map]`` inline or a ``mapping``
   file): target fields from source paths, constants or templates, with
   conversions (case, ISO-8601 dates, numbers) and lookups in small tables;
3. **loop guard** — with ``[routes.loop_guard]``, integrand remembers a
   fingerprint of what it writes to the sink, keyed by a target field that names
   the record (``key``), in the store. When the sink's own system then reports
   that change back through ``echo_source``, the echo is recognised (same
   fingerprint over the mapped fields) and dropped instead of being written back
   to where it came from; and a payload identical to the last one written to the
   same record is never written again. So a change written by integrand does not
   bounce between two systems.

Paths are dotted, with numbers for list positions (``data.Line.0.Amount``), rooted
at the event envelope (``id``, ``type``, ``entity``, ``entity_id``, ``version``,
``data``, ``meta``). That covers record fields without pulling in a JSONPath engine;
filters and wildcards are not needed to pick one value per target field.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import logging
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import Annotated, Any, Protocol

import orjson
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from .aggregate import AggregateSettings, virtual_sink
from .connector import Enricher
from .errors import AuthError, PermanentError, RetryableError
from .events import Event
from .keypaths import format_errors
from .types import RelPath, StrictModel
from .validate import RouteValidator, ValidateSettings, compile_validator

log = logging.getLogger("integrand.routes")

_PATH = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")
_TEMPLATE_REF = re.compile(r"\{([^{}]+)\}")


# --- conversions ------------------------------------------------------------------------------------


class MappingError(PermanentError):
    """A route's mapping cannot be applied to this event (missing required field, bad value): dead-letter it."""


def _parse_instant(v: Any) -> datetime:
    """A datetime from epoch seconds or milliseconds (numbers or digit strings) or an ISO-8601 string."""
    if isinstance(v, bool):
        raise ValueError("a boolean is not a date")
    if isinstance(v, str) and re.fullmatch(r"-?\d+(\.\d+)?", v.strip()):
        v = float(v)
    if isinstance(v, int | float):
        seconds = v / 1000 if abs(v) > 1e11 else v  # HubSpot dates are epoch milliseconds
        return datetime.fromtimestamp(seconds, UTC)
    if isinstance(v, str):
        d = datetime.fromisoformat(v.strip())
        return d if d.tzinfo else d.replace(tzinfo=UTC)
    raise ValueError(f"cannot read {v!r} as a date")


def _decimal(v: Any) -> Decimal:
    if isinstance(v, bool):
        raise ValueError("a boolean is not a number")
    try:
        d = Decimal(str(v).strip().replace(",", ""))
    except InvalidOperation:
        raise ValueError(f"{v!r} is not a number") from None
    if not d.is_finite():
        raise ValueError(f"{v!r} is not a finite number")
    # "1e890994" would become an 890,994-digit int (seconds of CPU on the loop): nothing real is that large.
    if d and abs(d.adjusted()) > MAX_EXPONENT:
        raise ValueError(f"{str(v)[:40]!r} is out of range (beyond 1e{MAX_EXPONENT})")
    return d


MAX_EXPONENT = 308  # a double's range: what every sink's JSON can hold anyway


def _to_int(v: Any) -> int:
    d = _decimal(v)
    if d != d.to_integral_value():
        raise ValueError(f"{v!r} is not a whole number")
    return int(d)


def _to_number(v: Any) -> int | float:
    d = _decimal(v)
    return int(d) if d == d.to_integral_value() else float(d)


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "yes", "1", "y", "on"):
        return True
    if s in ("false", "no", "0", "n", "off", ""):
        return False
    raise ValueError(f"{v!r} is not a boolean")


def _to_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


CONVERSIONS: dict[str, Callable[[Any], Any]] = {
    "lower": lambda v: _to_str(v).lower(),
    "upper": lambda v: _to_str(v).upper(),
    "title": lambda v: _to_str(v).title(),
    "strip": lambda v: _to_str(v).strip(),
    "str": _to_str,
    "int": _to_int,
    "float": lambda v: float(_decimal(v)),
    "number": _to_number,
    "bool": _to_bool,
    # ISO-8601: a calendar date as written (its own offset), an instant in UTC, or epoch milliseconds.
    "date": lambda v: _parse_instant(v).date().isoformat(),
    "datetime": lambda v: _parse_instant(v).astimezone(UTC).isoformat().replace("+00:00", "Z"),
    "epoch_ms": lambda v: int(_parse_instant(v).timestamp() * 1000),
}


# --- config models -----------------------------------------------------------------------------------


def _path_ok(p: str) -> str:
    if not _PATH.match(p):
        raise ValueError(f"{p!r} is not a dotted path such as 'data.customer.email'")
    return p


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class FieldSpec(StrictModel):
    """Where one target field's value comes from: exactly one of ``path``, ``const``, ``template``."""

    path: str | None = None
    const: Any = None
    template: str | None = None
    convert: Annotated[list[str], BeforeValidator(_as_list)] = []
    lookup: str | None = None
    default: Any = None
    required: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else _path_ok(v)

    @field_validator("convert")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in CONVERSIONS:
                close = difflib.get_close_matches(name, list(CONVERSIONS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown conversion {name!r}{hint}; known: {', '.join(CONVERSIONS)}")
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            refs = _TEMPLATE_REF.findall(v)
            if not refs:
                raise ValueError("a template needs at least one {path}")
            for r in refs:
                _path_ok(r)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> FieldSpec:
        given = [k for k in ("path", "const", "template") if k in self.model_fields_set]
        if len(given) != 1:
            raise ValueError("give exactly one of path, const or template")
        if "const" in given and self.const is None:
            raise ValueError("const needs a value")
        return self


def _spec(v: Any) -> Any:
    return {"path": v} if isinstance(v, str) else v


FieldSpecIn = Annotated[FieldSpec, BeforeValidator(_spec)]


class LoopGuardSettings(StrictModel):
    """Stop integrand's own writes from bouncing back: see the module docstring."""

    key: str
    echo_source: str | None = None
    echo_path: str = "data"

    @field_validator("echo_path")
    @classmethod
    def _echo_path(cls, v: str) -> str:
        return _path_ok(v)


class MappingFile(StrictModel):
    """A mapping kept in its own TOML file: ``[map]`` and optional ``[lookups.NAME]`` tables."""

    map: dict[str, FieldSpecIn] = Field(min_length=1)
    lookups: dict[str, dict[str, Any]] = {}


class FilterSettings(StrictModel):
    type: list[str] = []
    entity: list[str] = []


class RouteSettings(StrictModel):
    from_: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    filter: FilterSettings = FilterSettings()
    enrich: bool = False
    map: dict[str, FieldSpecIn] | None = None
    mapping: RelPath | None = None
    lookups: dict[str, dict[str, Any]] = {}
    loop_guard: LoopGuardSettings | None = None
    validate_: ValidateSettings | None = Field(default=None, alias="validate")
    # Windows by count and/or time, one aggregated event per window (integrand.aggregate).
    aggregate: AggregateSettings | None = None

    @field_validator("map")
    @classmethod
    def _targets(cls, v: dict[str, FieldSpec] | None) -> dict[str, FieldSpec] | None:
        for target in v or {}:
            _path_ok(target)
        return v

    @model_validator(mode="after")
    def _one_mapping(self) -> RouteSettings:
        if self.map is not None and self.mapping is not None:
            raise ValueError("give the mapping inline (map) or as a file (mapping), not both")
        return self


def load_mapping(route: RouteSettings, where: str) -> tuple[FieldMapping | None, list[str]]:
    """The route's compiled mapping, or the problems with it as ``key.path: message`` lines."""

    spec: dict[str, FieldSpec] | None = route.map
    lookups = dict(route.lookups)
    if route.mapping is not None:
        path = route.mapping
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            return None, [f"{where}.mapping: cannot read {path}: {e.strerror}"]
        except tomllib.TOMLDecodeError as e:
            return None, [f"{where}.mapping: {path} is not valid TOML: {e}"]
        try:
            mf = MappingFile.model_validate(raw)
        except ValidationError as e:
            return None, format_errors(e, f"{where}.mapping({path.name})", MappingFile)
        spec = mf.map
        lookups = {**mf.lookups, **lookups}
    if spec is None:
        if route.loop_guard is not None:
            return None, [f"{where}.loop_guard: a loop guard needs a mapping (map or mapping)"]
        return None, []
    problems = []
    for target, f in spec.items():
        if f.lookup is not None and f.lookup not in lookups:
            known = ", ".join(sorted(lookups)) or "none"
            problems.append(f"{where}.map.{target}.lookup: no lookup table {f.lookup!r} (tables: {known})")
    if route.loop_guard is not None and route.loop_guard.key not in spec:
        problems.append(
            f"{where}.loop_guard.key: {route.loop_guard.key!r} is not a target of the mapping "
            f"(targets: {', '.join(spec)})"
        )
    if problems:
        return None, problems
    return FieldMapping(spec, lookups), []


# --- applying a mapping ----------------------------------------------------------------------------


_MISSING = object()
_ENVELOPE = ("id", "source", "type", "data", "received_at", "entity", "entity_id", "version", "occurred_at", "meta")


def envelope(event: Event) -> dict[str, Any]:
    """The event as the root paths start from: its fields, not a deep copy (mapping only reads; asdict was most
    of a mapping's cost)."""
    return {k: getattr(event, k) for k in _ENVELOPE}


def dig(root: Any, path: str) -> Any:
    """Follow a dotted path into JSON-like data; None where it leads nowhere."""
    for part in path.split("."):
        if isinstance(root, Mapping):
            root = root.get(part)
        elif isinstance(root, list) and part.lstrip("-").isdigit() and -len(root) <= int(part) < len(root):
            root = root[int(part)]
        else:
            return None
        if root is None:
            return None
    return root


def _put(out: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        nxt = out.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise MappingError(f"target {path!r} collides with another target at {p!r}")
        out = nxt
    out[parts[-1]] = value


class FieldMapping:
    """A validated mapping: ``apply`` turns an event into the target record."""

    def __init__(self, spec: Mapping[str, FieldSpec], lookups: Mapping[str, Mapping[str, Any]]):
        self.spec = dict(spec)
        self.lookups = {name: {str(k): v for k, v in table.items()} for name, table in lookups.items()}

    @property
    def targets(self) -> list[str]:
        return list(self.spec)

    def _value(self, target: str, f: FieldSpec, root: Any) -> Any:
        if "const" in f.model_fields_set:
            return f.const
        if f.template is not None:
            parts = {ref: dig(root, ref) for ref in _TEMPLATE_REF.findall(f.template)}
            if all(v is None or v == "" for v in parts.values()):
                value: Any = None
            else:
                text = _TEMPLATE_REF.sub(lambda m: _to_str(parts[m.group(1)] or ""), f.template)
                value = " ".join(text.split())  # missing parts leave no doubled or trailing spaces
        else:
            assert f.path is not None
            value = dig(root, f.path)
        if value is None or value == "":
            return _MISSING
        for name in f.convert:
            try:
                value = CONVERSIONS[name](value)
            except (ValueError, TypeError, OverflowError, OSError) as e:  # OSError: an epoch the C library refuses
                raise MappingError(f"map.{target}: cannot convert {value!r} with {name!r}: {e}") from None
        if f.lookup is not None:
            table = self.lookups[f.lookup]
            key = _to_str(value)
            if key in table:
                value = table[key]
            elif "default" in f.model_fields_set:
                return f.default
            else:
                raise MappingError(f"map.{target}: no entry for {key!r} in lookup {f.lookup!r}")
        return value

    def apply(self, event: Event) -> dict[str, Any]:
        """The target record for ``event``; MappingError (permanent) when a required field cannot be filled."""
        return self.apply_root(envelope(event), event.id)

    def apply_root(self, root: Mapping[str, Any], event_id: str) -> dict[str, Any]:
        """``apply`` from a prepared root (a saga step's: the envelope plus ``steps.<name>`` results)."""
        out: dict[str, Any] = {}
        for target, f in self.spec.items():
            value = self._value(target, f, root)
            if value is _MISSING:
                if "default" in f.model_fields_set:
                    value = f.default
                elif f.required:
                    where = f.path or f.template
                    raise MappingError(f"map.{target}: required, but {where} is missing in event {event_id}")
                else:
                    continue
            _put(out, target, value)
        return out


# --- fingerprints for the loop guard ----------------------------------------------------------------


def _leaves(value: Any, prefix: str, out: dict[str, str]) -> None:
    """Flatten to ``{dotted.path: text}``; absent, null and empty values are all "nothing"."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _leaves(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _leaves(v, f"{prefix}.{i}", out)
    elif value is None or value == "":
        return
    elif isinstance(value, float) and value.is_integer():
        out[prefix] = str(int(value))  # 42.0 and "42" (HubSpot sends every property as a string) are equal
    else:
        out[prefix] = _to_str(value)


def fingerprint(flat: Mapping[str, str]) -> str:
    return hashlib.sha256(orjson.dumps(dict(flat), option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def written_fields(record: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    _leaves(record, "", out)
    return out


def observed_fields(root: Any, targets: Sequence[str]) -> dict[str, str]:
    """The mapping's target fields as the target system reports them (an echo), flattened like a write."""
    out: dict[str, str] = {}
    for t in targets:
        _leaves(dig(root, t), t, out)
    return out


# --- the runtime the dispatcher calls ----------------------------------------------------------------


class SagaRoute(Protocol):
    """What the router needs of a ``[[sagas]]`` entry (integrand.sagarunner.SagaSettings)."""

    @property
    def from_(self) -> str: ...
    @property
    def filter(self) -> FilterSettings: ...
    @property
    def virtual_sink(self) -> str: ...


class StateAccess(Protocol):
    async def state_get(self, scope: str, key: str) -> Any: ...

    async def state_set(self, scope: str, key: str, value: Any) -> None: ...


@dataclass(frozen=True)
class CompiledRoute:
    source: str
    sinks: tuple[str, ...]
    enrich: bool
    mapping: FieldMapping | None
    guard: LoopGuardSettings | None
    validator: RouteValidator | None = None


def _scope(sink: str) -> str:
    return f"loop-guard:{sink}"


class RouteRuntime:
    """What the dispatcher runs around each delivery: ``prepare`` before the sink, ``delivered`` after success."""

    def __init__(
        self,
        routes: Sequence[RouteSettings],
        mappings: Sequence[FieldMapping | None],
        sources: Mapping[str, object],
        state: StateAccess,
        validators: Sequence[RouteValidator | None] = (),
    ):
        self.sources = sources
        self.state = state
        self.pairs: dict[tuple[str, str], CompiledRoute] = {}
        self.echoes: dict[str, list[CompiledRoute]] = {}
        checks = list(validators) or [None] * len(routes)
        for r, m, v in zip(routes, mappings, checks, strict=True):
            cr = CompiledRoute(r.from_, tuple(r.to), r.enrich, m, r.loop_guard, v)
            for sink in r.to:
                self.pairs[(r.from_, sink)] = cr
            if r.loop_guard is not None and r.loop_guard.echo_source is not None:
                self.echoes.setdefault(r.loop_guard.echo_source, []).append(cr)

    @classmethod
    def build(cls, routes: Sequence[RouteSettings], sources: Mapping[str, object], state: StateAccess) -> RouteRuntime:
        mappings, validators = [], []
        for i, r in enumerate(routes):
            m, problems = load_mapping(r, f"routes[{i}]")
            v, schema_problems = compile_validator(r.validate_, f"routes[{i}]")
            if problems or schema_problems:  # config validation already reported these; a file changed since
                from .errors import ConfigError

                raise ConfigError(problems + schema_problems)
            mappings.append(m)
            validators.append(v)
        return cls(routes, mappings, sources, state, validators)

    async def prepare(self, sink: str, event: Event) -> Event | None:
        """The event as ``sink`` should receive it, or None when it must not be written (an echo, or no change)."""
        [res] = await self.prepare_batch(sink, [event])
        if isinstance(res, BaseException):
            raise res
        return res

    async def prepare_batch(self, sink: str, events: Sequence[Event]) -> list[Event | BaseException | None]:
        """``prepare`` for a batch: enrichment goes to each source once (``fetch_many``), the rest per event."""
        out: list[Event | BaseException | None] = list(events)
        by_source: dict[str, list[int]] = {}
        for i, event in enumerate(events):
            cr = self.pairs.get((event.source, sink))
            if cr is not None and cr.enrich and isinstance(self.sources.get(event.source), Enricher):
                by_source.setdefault(event.source, []).append(i)
        for source, idxs in by_source.items():
            src = self.sources[source]
            assert isinstance(src, Enricher)
            try:
                fetched = await src.fetch_many([events[i] for i in idxs])
                if len(fetched) != len(idxs):
                    raise RuntimeError(f"fetch_many returned {len(fetched)} results for {len(idxs)} events")
            except Exception as e:
                fetched = [e] * len(idxs)
            for i, res in zip(idxs, fetched, strict=True):
                out[i] = self._enrich_error(source, events[i], res) if isinstance(res, BaseException) else res
        todo = [(i, item) for i, item in enumerate(out) if isinstance(item, Event)]
        if any(self.guards(item.source, sink) or item.source in self.echoes for _, item in todo):
            # Concurrently, so the loop guard's state reads and writes for the batch share group commits.
            routed = await asyncio.gather(*(self._route(sink, item) for _, item in todo), return_exceptions=True)
            for (i, _), outcome in zip(todo, routed, strict=True):
                out[i] = outcome
            return out
        for i, item in todo:  # no loop guard: nothing to wait for, so no task per event
            cr = self.pairs.get((item.source, sink))
            if cr is not None and cr.mapping is None and cr.validator is None and not self.echoes.get(item.source):
                continue  # a plain route: the event goes as it is (no coroutine per event)
            try:
                out[i] = await self._route(sink, item)
            except Exception as e:
                out[i] = e
        return out

    def guards(self, source: str, sink: str) -> bool:
        """Whether the route from ``source`` to ``sink`` has a loop guard (state is kept around its deliveries)."""
        cr = self.pairs.get((source, sink))
        return cr is not None and cr.guard is not None and cr.mapping is not None

    async def _route(self, sink: str, event: Event) -> Event | None:
        cr = self.pairs.get((event.source, sink))
        if cr is None:
            return event  # stored under a route that no longer exists: deliver as it was
        if await self._is_echo(event):
            log.info(
                "%s → %s: event %s is the echo of integrand's own write; not sent back", event.source, sink, event.id
            )
            return None
        if cr.mapping is None:
            if cr.validator is not None:
                cr.validator.check(event)  # what the sink would receive breaks the contract: dead-letter it
            return event
        data = cr.mapping.apply(event)
        out = replace(event, data=data, meta={**event.meta, "route": {"from": event.source, "to": sink}})
        if cr.validator is not None:
            cr.validator.check(out)
        if cr.guard is not None:
            key = _to_str(dig(data, cr.guard.key) or "")
            if key:
                fp = fingerprint(written_fields(data))
                if await self.state.state_get(_scope(sink), f"written:{key}") == fp:
                    log.info(
                        "%s → %s: %s=%s unchanged since integrand last wrote it; skipped",
                        event.source,
                        sink,
                        cr.guard.key,
                        key,
                    )
                    return None
                # Remembered before the write, so an echo that overtakes our own bookkeeping is still recognised.
                await self.state.state_set(_scope(sink), f"echo:{key}", fp)
        return out

    async def delivered(self, sink: str, event: Event) -> None:
        """Remember what was written, so the same payload for the same record is not written again."""
        cr = self.pairs.get((event.source, sink))
        if cr is None or cr.guard is None or cr.mapping is None:
            return
        key = _to_str(dig(event.data, cr.guard.key) or "")
        if key:
            await self.state.state_set(_scope(sink), f"written:{key}", fingerprint(written_fields(event.data)))

    @staticmethod
    def _enrich_error(source: str, event: Event, e: BaseException) -> BaseException:
        if isinstance(e, AuthError):
            # The source's credentials, not the sink's: retry later without pausing the sink.
            log.error("source %s refused credentials while enriching event %s: %s", source, event.id, e)
            return RetryableError(f"enrichment by source {source!r} failed: {e}")
        return e

    async def _is_echo(self, event: Event) -> bool:
        """Whether ``event`` reports back exactly what a guarded route wrote to its source's system."""
        for cr in self.echoes.get(event.source, ()):
            assert cr.guard is not None and cr.mapping is not None
            root = dig(event.to_dict(), cr.guard.echo_path)
            seen = observed_fields(root, cr.mapping.targets)
            key = seen.get(cr.guard.key)
            if not key:
                continue
            fp = fingerprint(seen)
            for sink in cr.sinks:
                if await self.state.state_get(_scope(sink), f"echo:{key}") == fp:
                    return True
        return False


# --- deciding the sinks when an event is stored --------------------------------------------------


@dataclass(frozen=True)
class Route:
    source: str
    sinks: tuple[str, ...]
    types: tuple[str, ...]
    entities: tuple[str, ...]

    def matches(self, event: Event) -> bool:
        """Glob filters on type and entity; an empty filter lets everything through."""
        if self.types and not any(fnmatchcase(event.type, p) for p in self.types):
            return False
        return not (self.entities and not any(fnmatchcase(event.entity or "", p) for p in self.entities))


class Router:
    def __init__(self, routes: Sequence[RouteSettings], sagas: Sequence[SagaRoute] = ()):
        self._by_source: dict[str, list[Route]] = {}
        for i, r in enumerate(routes):
            # An aggregated route's events go to its aggregators (virtual sinks), which feed the real ones.
            to = tuple(virtual_sink(i, s) for s in r.to) if r.aggregate is not None else tuple(r.to)
            route = Route(r.from_, to, tuple(r.filter.type), tuple(r.filter.entity))
            self._by_source.setdefault(r.from_, []).append(route)
        for sg in sagas:  # a saga's events go to its runner (a virtual sink), which runs the steps in order
            route = Route(sg.from_, (sg.virtual_sink,), tuple(sg.filter.type), tuple(sg.filter.entity))
            self._by_source.setdefault(sg.from_, []).append(route)

    def sinks_for(self, event: Event) -> list[str]:
        out: list[str] = []
        for route in self._by_source.get(event.source, ()):
            if route.matches(event):
                out.extend(s for s in route.sinks if s not in out)
        return out
