"""Secrets given by reference (env, file, systemd credential) and a value type that never prints itself."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import GetCoreSchemaHandler, ValidationInfo
from pydantic_core import PydanticCustomError, core_schema

from .errors import ConfigError

# Header, query-parameter and JSON key names whose values never reach a log line or the rejections
# table. One list for every place that redacts (the listener's rejections, the HTTP helper's logs), so
# a credential header hidden in one is hidden in all. Whole words where a bare substring would catch
# ordinary names ("key" in "monkey", "sig" in "design", "auth" in "author").
_CREDENTIAL_NAME = re.compile(
    r"authorization|token|secret|passw|credential|cookie|session|signature|hmac|api[-_]?key"
    r"|auth_code|(?:^|[-_])(?:auth|key|sig)(?:$|[-_])",
    re.IGNORECASE,
)
REDACTED = "***"


def is_credential_name(name: str) -> bool:
    """Whether a header, query parameter or JSON key name looks like it holds a credential."""
    return _CREDENTIAL_NAME.search(name) is not None


class SecretValue:
    """A secret; ``repr``/``str`` show only where it came from, so logs never hold it.

    A lazy one (``SecretValue.deferred``) is read only when revealed: the CLI's read commands load the
    config without the systemd credentials or environment that only the service has."""

    __slots__ = ("_base", "_ref", "_value", "origin")

    def __init__(self, value: str, origin: str):
        self._value: str | None = value
        self._ref: Any = None
        self._base: Path | None = None
        self.origin = origin

    @classmethod
    def deferred(cls, ref: Any, base_dir: Path | None, origin: str) -> SecretValue:
        s = cls("", origin)
        s._value, s._ref, s._base = None, ref, base_dir
        return s

    @property
    def resolved(self) -> bool:
        """Whether the value has been read (always, unless loaded with ``lazy_secrets``)."""
        return self._value is not None

    def reveal(self) -> str:
        if self._value is None:
            try:
                self._value = resolve_secret(self._ref, self._base).reveal()
            except PydanticCustomError as e:
                raise ConfigError([f"secret {self.origin}: {e.message()}"]) from None
        return self._value

    def __repr__(self) -> str:
        return f"SecretValue(<{self.origin}>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretValue) and other.reveal() == self.reveal()

    def __hash__(self) -> int:
        return hash(self.reveal())

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(
            _validate_secret,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda v: repr(v)),
        )


def resolve_secret(ref: Any, base_dir: Path | None = None) -> SecretValue:
    """Turn ``"literal"``, ``{env=…}``, ``{file=…}`` or ``{credential=…}`` into a SecretValue."""
    if isinstance(ref, SecretValue):
        return ref
    if isinstance(ref, str):
        if not ref:
            raise PydanticCustomError("secret", "secret is empty")
        return SecretValue(ref, "inline")
    if not isinstance(ref, dict) or len(ref) != 1:
        raise PydanticCustomError(
            "secret",
            'a secret is a string or one of {{env = "VAR"}}, {{file = "path"}}, {{credential = "name"}}',
        )
    ((kind, name),) = ref.items()
    if not isinstance(name, str) or not name:
        raise PydanticCustomError("secret", "secret reference {kind} needs a non-empty string", {"kind": kind})
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise PydanticCustomError("secret", "environment variable {name} is not set", {"name": name})
        if not value:
            raise PydanticCustomError("secret", "environment variable {name} is empty", {"name": name})
        return SecretValue(value, f"env:{name}")
    if kind == "file":
        path = Path(name)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return SecretValue(_read_secret_file(path, f"secret file {path}"), f"file:{path}")
    if kind == "credential":
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise PydanticCustomError(
                "secret",
                "credential {name} needs $CREDENTIALS_DIRECTORY (set by systemd LoadCredential=)",
                {"name": name},
            )
        if "/" in name or name in (".", ".."):
            raise PydanticCustomError("secret", "credential name {name} must not contain '/'", {"name": name})
        return SecretValue(_read_secret_file(Path(creds) / name, f"credential {name}"), f"credential:{name}")
    raise PydanticCustomError(
        "secret", "unknown secret reference {kind} (use env, file or credential)", {"kind": repr(kind)}
    )


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        raise PydanticCustomError("secret", "{what} does not exist", {"what": what}) from None
    except OSError as e:
        raise PydanticCustomError("secret", "{what} cannot be read: {err}", {"what": what, "err": e.strerror}) from None
    if not value:
        raise PydanticCustomError("secret", "{what} is empty", {"what": what})
    return value


def _validate_secret(value: Any, info: ValidationInfo) -> SecretValue:
    context = info.context if isinstance(info.context, dict) else {}
    base = context.get("base_dir")
    if context.get("lazy_secrets") and isinstance(value, dict) and len(value) == 1:
        ((kind, name),) = value.items()
        if kind in ("env", "file", "credential") and isinstance(name, str) and name:
            return SecretValue.deferred(value, base, f"{kind}:{name}")
    return resolve_secret(value, base)


class SecretList(tuple[SecretValue, ...]):
    """One secret or a list of them (key rotation: any one verifies); always a non-empty tuple."""

    __slots__ = ()

    def reveal_all(self) -> list[str]:
        return [s.reveal() for s in self]

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(
            _validate_secret_list,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda v: [repr(x) for x in v]),
        )


def _validate_secret_list(value: Any, info: ValidationInfo) -> SecretList:
    items = value if isinstance(value, list | tuple) else [value]
    if not items:
        raise PydanticCustomError("secret", "give at least one secret")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(_validate_secret(item, info))
        except PydanticCustomError as e:
            if len(items) == 1:
                raise
            raise PydanticCustomError("secret", "secret [{i}]: {msg}", {"i": i, "msg": e.message()}) from None
    return SecretList(out)
