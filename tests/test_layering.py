"""Import layering the architecture relies on, read from the modules' own import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import integrand.routes
import integrand.store.engine


def relative_imports(module: object) -> set[str]:
    """Every ``from .x import …`` in a module, at the top or inside a function."""
    tree = ast.parse(Path(module.__file__).read_text())  # type: ignore[attr-defined]
    return {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}


def test_routes_do_not_import_config() -> None:
    """config imports routes (routes own their settings); routes importing config, even lazily, is a cycle."""
    assert ".config" not in relative_imports(integrand.routes)


def test_the_store_engine_imports_nothing_above_it() -> None:
    """The engine runs operations it does not know about: it imports no part of the store built on it."""
    assert relative_imports(integrand.store.engine) == {"..errors"}
