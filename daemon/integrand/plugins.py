"""Connector discovery through the ``integrand.connectors`` entry-point group."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

GROUP = "integrand.connectors"


class PluginError(Exception):
    """A connector that is not installed or does not load; the message names it and the cause."""


@dataclass(frozen=True)
class ConnectorInfo:
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
        for ep in eps:
            self._eps.setdefault(ep.name, ep)
        self._loaded: dict[str, type[Any]] = {}

    @classmethod
    def default(cls) -> Registry:
        return cls(entry_points(group=GROUP))

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
