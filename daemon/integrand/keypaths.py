"""Config errors as key paths (``sources.qbo.poll.min_interval: …``) with "did you mean" hints.

Its own module so that ``config`` and ``routes`` (which validates mapping files) share it without
importing each other.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from pydantic import BaseModel, ValidationError


def format_errors(
    err: ValidationError, prefix: str, model: type[BaseModel] | None = None, extra_known: Iterable[str] = ()
) -> list[str]:
    """Pydantic errors as ``prefix.key.path: message`` lines, with a suggestion for misspelt keys."""
    lines = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        # Union members add their type name to the location; drop those to keep the key path. An unknown
        # key is always the last element and is the user's word, even when it reads "none" or "list".
        keep = loc[-1:] if e["type"] == "extra_forbidden" else []
        inner = loc[:-1] if keep else loc
        loc = [p for p in inner if not re.fullmatch(r"[a-z]+\[.*\]|list|str|dict|int|float|bool|none", p)] + keep
        parts = [prefix, *[f"[{p}]" if p.isdigit() else p for p in loc]]
        path = ".".join(parts).replace(".[", "[")
        if e["type"] == "extra_forbidden":
            fields = set(fields_at(model, loc[:-1]))
            if len(loc) == 1:
                fields |= set(extra_known)
            msg = f"unknown key{suggest(loc[-1], fields)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        lines.append(f"{path}: {msg}")
    return lines


def fields_at(model: type[BaseModel] | None, loc: list[str]) -> list[str]:
    """The keys a (nested) model accepts at ``loc``, for "did you mean" hints."""
    for key in loc:
        if model is None:
            return []
        found = next((f for n, f in model.model_fields.items() if key in (n, f.alias)), None)
        model = None
        if found is not None:
            for t in (found.annotation, *getattr(found.annotation, "__args__", ())):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    model = t
                    break
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
