"""Routes: which sinks get which events from a source, decided when the event is stored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .config import RouteSettings
from .events import Event


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
    def __init__(self, routes: Sequence[RouteSettings]):
        self._by_source: dict[str, list[Route]] = {}
        for r in routes:
            route = Route(r.from_, tuple(r.to), tuple(r.filter.type), tuple(r.filter.entity))
            self._by_source.setdefault(r.from_, []).append(route)

    def sinks_for(self, event: Event) -> list[str]:
        out: list[str] = []
        for route in self._by_source.get(event.source, ()):
            if route.matches(event):
                out.extend(s for s in route.sinks if s not in out)
        return out
