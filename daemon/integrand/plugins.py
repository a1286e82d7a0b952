"""Connector discovery through the ``integrand.connectors`` entry-point group.

``INTEGRAND_PLUGINS`` (comma-separated glob patterns) restricts discovery to the
connectors whose distribution or name matches, so a test run or a locked-down
install never picks up a stray plugin that happens to be installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib.metadata import EntryPoint, entry_points
from typing import Any

GROUP = "integrand.connectors"
ALLOW_ENV = "INTEGRAND_PLUGINS"


def _normalise(name: str) -> str:
    """Distribution names compare the PEP 503 way: case, '-', '_' and '.' do not matter."""
    return name.lower().replace("_", "-").replace(".", "-")


def allowed(ep: EntryPoint, patterns: Iterable[str]) -> bool:
    """Whether an entry point's distribution name or connector name matches one of ``patterns``."""
    dist = _normalise(ep.dist.name) if ep.dist else ""
    return any(fnmatchcase(dist, _normalise(p)) or fnmatchcase(ep.name, p) for p in patterns)


def _origin(ep: EntryPoint) -> str:
    return f"{ep.value} from {ep.dist.name} {ep.dist.version}" if ep.dist else ep.value


class PluginError(Exception):
    """A connector that is not installed or does not load; the message names it and the cause."""


@dataclass(frozen=True)
class ConnectorInfo:
    """One row of ``integrand plugins``: where a connector comes from and what it can do."""

    name: str
    target: str
    distribution: str | None
    version: str | None
    capabilities: tuple[str, ...]
    config_keys: tuple[str, ...]
    error: str | None


class Registry:
    """The installed connectors, loaded lazily so one broken plugin only breaks configs that use it."""

    def __init__(self, eps: Iterable[EntryPoint]):
        self._eps: dict[str, EntryPoint] = {}
        self._clashes: dict[str, list[str]] = {}
        for ep in eps:
            first = self._eps.setdefault(ep.name, ep)
            if first is not ep and first.value != ep.value:
                self._clashes.setdefault(ep.name, [_origin(first)]).append(_origin(ep))
        self._loaded: dict[str, type[Any]] = {}

    @classmethod
    def default(cls, allow: str | None = None) -> Registry:
        """Every installed connector, or only those ``allow`` (default ``$INTEGRAND_PLUGINS``) matches."""
        spec = os.environ.get(ALLOW_ENV) if allow is None else allow
        eps: Iterable[EntryPoint] = entry_points(group=GROUP)
        if spec:
            patterns = [p.strip() for p in spec.split(",") if p.strip()]
            eps = [ep for ep in eps if allowed(ep, patterns)]
        return cls(eps)

    @classmethod
    def of(cls, classes: Mapping[str, type[Any]]) -> Registry:
        """A registry of exactly these classes (tests, the contract suite): nothing else is discovered."""
        reg = cls(EntryPoint(name, f"{c.__module__}:{c.__qualname__}", GROUP) for name, c in classes.items())
        reg._loaded.update(classes)
        return reg

    def names(self) -> list[str]:
        return sorted(self._eps)

    def load(self, name: str) -> type[Any]:
        from .connector import Connector

        if name in self._loaded:
            return self._loaded[name]
        ep = self._eps.get(name)
        if ep is None:
            installed = ", ".join(self.names()) or "none"
            raise PluginError(f"no connector named {name!r} is installed (installed: {installed})")
        if name in self._clashes:
            raise PluginError(
                f"connector {name!r} is registered by more than one distribution ({'; '.join(self._clashes[name])}); "
                "uninstall one, or narrow INTEGRAND_PLUGINS"
            )
        try:
            obj = ep.load()
        except Exception as e:
            dist = f" from {ep.dist.name}" if ep.dist else ""
            raise PluginError(f"connector {name!r}{dist} failed to import ({ep.value}): {type(e).__name__}: {e}") from e
        if not (isinstance(obj, type) and issubclass(obj, Connector)):
            raise PluginError(f"connector {name!r} ({ep.value}) is not a subclass of integrand.connector.Connector")
        self._loaded[name] = obj
        return obj

    def describe(self) -> list[ConnectorInfo]:
        out = []
        for name in self.names():
            ep = self._eps[name]
            dist = ep.dist.name if ep.dist else None
            ver = ep.dist.version if ep.dist else None
            try:
                cls = self.load(name)
            except PluginError as e:
                out.append(ConnectorInfo(name, ep.value, dist, ver, (), (), str(e)))
                continue
            keys = tuple(f.alias or n for n, f in cls.Config.model_fields.items())
            out.append(ConnectorInfo(name, ep.value, dist, ver, tuple(sorted(cls.capabilities())), keys, None))
        return out
