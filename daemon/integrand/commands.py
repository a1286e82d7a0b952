"""Plugin commands: ``integrand <plugin> …`` subcommands from the entry-point group ``integrand.commands``.

A plugin registers a function ``register(subparsers, api)`` under the group; it adds its own
subparser (``subparsers.add_parser("postgres", …)``) and sets ``fn`` to a function of the parsed
arguments returning the exit status, as the core's commands do. ``api`` (:class:`CommandAPI`)
gives it the two things a command needs from the core: ``--config`` handling and a configured
source or sink (its connector class and validated options), so a plugin never parses config itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

GROUP = "integrand.commands"

Role = Literal["source", "sink"]


@dataclass(frozen=True)
class Configured:
    """A source or sink as the config declares it: name, connector class and its validated options."""

    name: str
    role: Role
    connector: str
    cls: type[Any]
    options: Any
    base_dir: Path


class CommandAPI:
    """What the core hands a plugin's ``register``."""

    def __init__(self, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]):
        self.with_config = with_config

    def configured(self, args: argparse.Namespace, name: str, role: Role, connector: str | None = None) -> Configured:
        """The configured ``[sources.NAME]`` / ``[sinks.NAME]``; exits with one clear line if there is none."""
        from .config import config_path, load_config

        settings = load_config(config_path(getattr(args, "config", None)))
        table = settings.sources if role == "source" else settings.sinks
        cs = table.get(name)
        if cs is None:
            raise SystemExit(f"error: no {role} named {name!r} in {settings.path}")
        if connector is not None and cs.connector != connector:
            raise SystemExit(f"error: {role} {name!r} uses connector {cs.connector!r}, not {connector!r}")
        return Configured(name, role, cs.connector, cs.cls, cs.options, settings.base_dir)


def add_plugin_commands(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser], group: str = GROUP
) -> None:
    """Let every installed plugin add its subcommands; a broken one is reported and skipped, never fatal."""
    api = CommandAPI(with_config)
    for ep in entry_points(group=group):
        try:
            ep.load()(sub, api)
        except Exception as e:
            print(f"warning: plugin commands {ep.name!r} ({ep.value}) failed to load: {e}", file=sys.stderr)
