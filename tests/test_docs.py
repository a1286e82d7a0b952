"""The connector author's guide cannot drift from the code: its examples are the tested example, its reference is generated."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

import integrand.connector as connector
import integrand.testing as testing
from integrand.plugins import GROUP

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "writing-connectors.md"
EXAMPLE = ROOT / "tests" / "example_plugin"
PLUGINS_README = ROOT / "plugins" / "README.md"

# Names whose objects carry no docstring of their own (typing aliases).
ALIAS_DOCS = {
    "Duration": "seconds as a float, given as a number or a string such as `'500ms'`, `'30s'`, `'5m'`, `'7d'`",
    "ListenAddress": "a `host:port` listen address (a `HostPort`)",
    "RelPath": "a path; relative ones are taken from the config file's folder",
}


def _sig(obj: Any, name: str) -> str:
    """``name(a, b, *, c)``: parameter names only, so the reference stays readable."""
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return name
    out: list[str] = []
    star = False
    for p in params:
        if p.name in ("self", "cls"):
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        else:
            out.append(p.name)
    return f"{name}({', '.join(out)})"


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ").replace("``", "`")


def render_reference() -> str:
    """The reference section of docs/writing-connectors.md, from integrand.connector itself."""
    lines: list[str] = []
    for name in sorted(connector.__all__, key=str.lower):
        obj = getattr(connector, name)
        if name in ALIAS_DOCS:
            lines.append(f"- **`{name}`** — {ALIAS_DOCS[name]}.")
            continue
        if inspect.isclass(obj):
            is_model = hasattr(obj, "model_fields")
            is_abc = inspect.isabstract(obj) or name in ("Sink", "Enricher", "StateStore")
            head = name if (is_model or is_abc or obj.__init__ is object.__init__) else _sig(obj, name)
            lines.append(f"- **`{head}`** — {_summary(obj)}")
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                fn = member.__func__ if isinstance(member, classmethod | staticmethod) else member
                if inspect.isfunction(fn) and fn.__doc__:
                    lines.append(f"  - `{_sig(fn, attr)}` — {_summary(fn)}")
        else:
            lines.append(f"- **`{_sig(obj, name)}`** — {_summary(obj)}")
    return "\n".join(lines)


def _blocks(text: str) -> dict[str, list[str]]:
    """Code blocks announced by ``<!-- file: PATH -->``, in order, per file."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"<!-- file: (\S+) -->\n```\w*\n(.*?)\n```", text, re.S):
        out.setdefault(m.group(1), []).append(m.group(2))
    return out


def _code_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def test_the_guides_code_is_the_tested_example_plugin() -> None:
    blocks = _blocks(GUIDE.read_text())
    assert set(blocks) == {"pyproject.toml", "integrand_example_notes/connector.py", "tests/test_contract.py"}
    for path, parts in blocks.items():
        shown = _code_lines("\n".join(parts))
        real = _code_lines((EXAMPLE / path).read_text())
        assert shown == real, f"docs/writing-connectors.md shows a different {path} than tests/example_plugin/{path}"


def test_the_guides_reference_matches_the_interface() -> None:
    text = GUIDE.read_text()
    ref = text.split("## Reference: `integrand.connector`", 1)[1]
    assert render_reference() in ref, "regenerate the reference: python -m tests.test_docs"


def test_every_public_name_is_explained_in_the_guide() -> None:
    text = GUIDE.read_text()
    body = text.split("## Reference", 1)[0]  # explained in prose, not only listed
    missing = [n for n in connector.__all__ if f"`{n}" not in body and n not in ALIAS_DOCS]
    assert not missing, f"not explained in docs/writing-connectors.md: {missing}"
    missing_kit = [n for n in testing.__all__ if f"`{n}" not in body]
    assert not missing_kit, f"integrand.testing names not in the guide: {missing_kit}"


def test_plugins_readme_shows_the_layout_and_the_entry_point_group() -> None:
    text = PLUGINS_README.read_text()
    assert f'[project.entry-points."{GROUP}"]' in text
    assert "integrand.testing" in text
    assert "ConnectorContract" in text
    assert "docs/writing-connectors.md" in text


def test_routes_guide_lists_every_conversion_and_mapping_key() -> None:
    from integrand.routes import CONVERSIONS, FieldSpec, LoopGuardSettings, RouteSettings

    text = (ROOT / "docs" / "routes.md").read_text()
    names = [*CONVERSIONS, *FieldSpec.model_fields, *LoopGuardSettings.model_fields]
    names += [f.alias or n for n, f in RouteSettings.model_fields.items()]
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"docs/routes.md does not mention: {missing}"


if __name__ == "__main__":
    # Rewrite the reference section after changing integrand.connector.
    text = GUIDE.read_text()
    head = text.split("## Reference: `integrand.connector`", 1)[0]
    intro = "\n\nEverything a connector may use, by name:\n\n"
    GUIDE.write_text(f"{head}## Reference: `integrand.connector`{intro}{render_reference()}\n")
    sys.stdout.write(f"wrote {GUIDE}\n")
