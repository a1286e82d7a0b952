"""Where integrand writes, checked before it starts: under the shipped systemd unit only the state
directory is writable (ProtectSystem=strict, StateDirectory=), so a path elsewhere fails at start."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings


@dataclass(frozen=True)
class PathProblems:
    errors: list[str]
    warnings: list[str]


def written_paths(s: Settings) -> list[tuple[str, Path]]:
    """(config key, absolute path) of everything integrand writes."""
    out: list[tuple[str, Path]] = [("daemon.state_dir", s.daemon.state_dir)]
    if s.store.path is not None:
        out.append(("store.path", s.store.path))
    for plural, table in (("sources", s.sources), ("sinks", s.sinks)):
        for name, cs in table.items():
            for key in getattr(cs.cls, "writes_paths", ()):
                value = getattr(cs.options, key, None)
                if isinstance(value, Path):
                    out.append((f"{plural}.{name}.{key}", value))
    return out


STATE_DIR_GIVEN = "daemon.state_dir (given)"


def relative_keys(raw: dict[str, Any]) -> set[str]:
    """Keys (``sinks.NAME.path``) given as relative paths in the TOML: resolving made them absolute.
    With ``STATE_DIR_GIVEN`` when the config sets ``state_dir`` (a default one is not a deployment's)."""
    out: set[str] = set()
    daemon = raw.get("daemon")
    if isinstance(daemon, dict) and daemon.get("state_dir") is not None:
        out.add(STATE_DIR_GIVEN)
    store = raw.get("store")
    if isinstance(store, dict) and isinstance(store.get("path"), str) and not Path(store["path"]).is_absolute():
        out.add("store.path")
    for plural in ("sources", "sinks"):
        tables = raw.get(plural)
        if not isinstance(tables, dict):
            continue
        for name, table in tables.items():
            if isinstance(table, dict):
                for key, value in table.items():
                    if isinstance(value, str) and not Path(value).is_absolute():
                        out.add(f"{plural}.{name}.{key}")
    return out


def _unwritable(path: Path) -> str | None:
    """Why ``path`` (a file or directory to create) cannot be written, or None when it can."""
    p = path
    while not p.exists():
        if p.parent == p:
            return "no existing parent directory"
        p = p.parent
    if p != path and not p.is_dir():
        return f"{p} is not a directory"
    if not os.access(p, os.W_OK):
        try:  # os.access says no for a read-only mount as for a permission; tell which
            st = os.statvfs(p)
            readonly = bool(st.f_flag & os.ST_RDONLY)
        except OSError:
            readonly = False
        return (
            f"{p} is on a read-only file system" if readonly else f"{p} is not writable ({os.strerror(errno.EACCES)})"
        )
    return None


def check_paths(s: Settings, *, raw_relative: set[str] | None = None) -> PathProblems:
    """Errors: a path integrand cannot write, or one given relative to the config file that is outside
    the ``daemon.state_dir`` the config sets (next to /etc/integrand/config.toml means /etc: read-only
    for the service). Warnings: other paths outside ``state_dir``, writable here but not under the unit."""
    errors: list[str] = []
    warnings: list[str] = []
    state = s.daemon.state_dir.resolve()
    for key, path in written_paths(s):
        why = _unwritable(path)
        if why is not None:
            errors.append(f"{key}: integrand cannot write {path}: {why}")
            continue
        if key == "daemon.state_dir" or path.resolve().is_relative_to(state):
            continue
        if raw_relative is not None and key in raw_relative and STATE_DIR_GIVEN in raw_relative:
            errors.append(
                f"{key}: {path} (a relative path, taken from the config file's folder) is outside "
                f"daemon.state_dir {state}; the systemd unit lets integrand write only there: give a path "
                f"under the state directory (e.g. {state / path.name})"
            )
        else:
            warnings.append(
                f"{key}: {path} is outside daemon.state_dir {state}; under the shipped systemd unit "
                "(ProtectSystem=strict) only the state directory is writable"
            )
    return PathProblems(errors, warnings)
