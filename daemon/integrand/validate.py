"""Validation on routes: a JSON Schema (Draft 2020-12) for what a sink receives, checked before it does.

A route's ``[routes.validate]`` names a schema for every event it delivers (``schema``) and/or one per
event type (``types``, glob patterns on ``event.type``); each is a path to a JSON file (relative to
the config file) or an inline table. The value checked is ``path`` of the event as the sink would
receive it (after enrichment and mapping; ``data`` by default). An event that fails is dead-lettered
with *every* violation and its JSON path, and never reaches the sink. Schemas are loaded and checked
against the 2020-12 meta-schema at startup, so ``integrand check`` reports a broken one with its key.

Why ``jsonschema`` and not ``fastjsonschema``: it implements Draft 2020-12 (fastjsonschema stops at
draft 7), ``iter_errors`` yields every violation with its ``json_path`` (fastjsonschema raises at the
first one), and ``check_schema`` validates the schema itself. Validators are built once per schema.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import Field, field_validator

from .errors import PermanentError
from .events import Event
from .types import RelPath, StrictModel

log = logging.getLogger("integrand.validate")

MAX_REPORTED = 50  # violations listed in one dead letter; the count says how many there were


# A schema file (relative to the config file's folder) or an inline table.
SchemaRef = dict[str, Any] | RelPath


class ValidateSettings(StrictModel):
    """``[routes.validate]``: JSON Schemas for what the route's sinks receive."""

    schema_: SchemaRef | None = Field(default=None, alias="schema")
    types: dict[str, SchemaRef] = {}
    path: str = "data"
    formats: bool = True

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if v and not all(v.split(".")):
            raise ValueError(f"not a dotted path: {v!r}")
        return v


class ValidationFailed(PermanentError):
    """The event does not match its route's schema: never delivered; every violation is in the message."""

    def __init__(self, message: str, violations: list[str]):
        super().__init__(message)
        self.violations = violations


class RouteValidator:
    """The compiled schemas of one route: ``check(event)`` raises ValidationFailed with every violation."""

    def __init__(
        self,
        path: str,
        common: list[tuple[str, Draft202012Validator]],
        typed: list[tuple[str, str, Draft202012Validator]],
    ):
        self.path = path
        self.common = common
        self.typed = typed

    def applicable(self, event: Event) -> list[tuple[str, Draft202012Validator]]:
        out = list(self.common)
        out += [(name, v) for pattern, name, v in self.typed if fnmatchcase(event.type, pattern)]
        return out

    def check(self, event: Event) -> None:
        validators = self.applicable(event)
        if not validators:
            return
        value = _dig(event, self.path)
        violations: list[str] = []
        for name, validator in validators:
            for err in sorted(validator.iter_errors(value), key=lambda e: (list(e.absolute_path), e.message)):
                violations.append(f"{err.json_path}: {err.message} ({name})")
        if violations:
            shown = violations[:MAX_REPORTED]
            more = f"; and {len(violations) - MAX_REPORTED} more" if len(violations) > MAX_REPORTED else ""
            raise ValidationFailed(
                f"event {event.id} ({event.type}) fails its route's schema with {len(violations)} "
                f"violation{'s' if len(violations) != 1 else ''}: " + "; ".join(shown) + more,
                violations,
            )


def _dig(event: Event, path: str) -> Any:
    root: Any = event.to_dict()
    for part in path.split(".") if path else ():
        root = root.get(part) if isinstance(root, Mapping) else None
    return root


def _load(ref: SchemaRef, where: str) -> tuple[str, dict[str, Any] | None, list[str]]:
    """(name for messages, schema, problems)."""
    if isinstance(ref, dict):
        return "inline schema", ref, []
    path = Path(ref)
    try:
        raw = path.read_bytes()
    except OSError as e:
        return path.name, None, [f"{where}: cannot read {path}: {e.strerror}"]
    try:
        schema = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return path.name, None, [f"{where}: {path} is not valid JSON: {e}"]
    if not isinstance(schema, dict | bool):
        return path.name, None, [f"{where}: {path} must hold a JSON object (a schema)"]
    return path.name, schema if isinstance(schema, dict) else {"not": {}} if schema is False else {}, []


def _compile(ref: SchemaRef, where: str, formats: bool) -> tuple[str, Draft202012Validator | None, list[str]]:
    name, schema, problems = _load(ref, where)
    if schema is None:
        return name, None, problems
    declared = schema.get("$schema")
    if declared not in (None, "https://json-schema.org/draft/2020-12/schema"):
        return name, None, [f"{where}: {name} declares $schema {declared!r}; integrand validates Draft 2020-12"]
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        at = "/".join(str(p) for p in e.absolute_path) or "(root)"
        return name, None, [f"{where}: {name} is not a valid JSON Schema at {at}: {e.message}"]
    checker = Draft202012Validator.FORMAT_CHECKER if formats else None
    return name, Draft202012Validator(schema, format_checker=checker), []


def compile_validator(settings: ValidateSettings | None, where: str) -> tuple[RouteValidator | None, list[str]]:
    """The route's validator, or the problems with its schemas as ``key.path: message`` lines."""
    if settings is None:
        return None, []
    problems: list[str] = []
    common: list[tuple[str, Draft202012Validator]] = []
    typed: list[tuple[str, str, Draft202012Validator]] = []
    if settings.schema_ is not None:
        name, v, p = _compile(settings.schema_, f"{where}.validate.schema", settings.formats)
        problems += p
        if v is not None:
            common.append((name, v))
    for pattern, ref in settings.types.items():
        name, v, p = _compile(ref, f"{where}.validate.types.{pattern}", settings.formats)
        problems += p
        if v is not None:
            typed.append((pattern, name, v))
    if not problems and not common and not typed:
        problems.append(f"{where}.validate: give a schema or types")
    return (RouteValidator(settings.path, common, typed) if not problems else None), problems
