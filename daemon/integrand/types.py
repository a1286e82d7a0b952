"""Small config value types shared by the core and connectors: durations, addresses, paths."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, WrapValidator
from pydantic_core import PydanticCustomError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or from ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"``."""
    if isinstance(value, bool):
        raise PydanticCustomError("duration", "expected a duration, got a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise PydanticCustomError("duration", "a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise PydanticCustomError(
        "duration", "expected seconds or a duration like '30s', '5m', '7d', got {value}", {"value": repr(value)}
    )


Duration = Annotated[float, BeforeValidator(parse_duration)]


class HostPort(NamedTuple):
    """A listen address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: Any) -> HostPort:
    if isinstance(value, HostPort):
        return value
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if sep and host and port.isdigit() and 0 <= int(port) <= 65535:
            return HostPort(host, int(port))
    raise PydanticCustomError(
        "listen", "expected 'host:port' such as '127.0.0.1:8080', got {value}", {"value": repr(value)}
    )


ListenAddress = Annotated[HostPort, BeforeValidator(parse_host_port)]


def _resolve_path(value: Any, handler: Any, info: ValidationInfo) -> Path:
    path: Path = handler(value)
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


RelPath = Annotated[Path, WrapValidator(_resolve_path)]
"""A path; relative ones are taken from the config file's folder, not the working directory."""


class StrictModel(BaseModel):
    """Frozen, and unknown keys are errors: a typo in config must not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
