"""Figures into docs/reliability.md: each harness owns a block between ``<!-- soak:NAME -->`` markers."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def put_block(name: str, text: str) -> None:
    """Replace what lies between ``<!-- soak:NAME -->`` and ``<!-- /soak:NAME -->``."""
    doc = DOC.read_text()
    start, end = f"<!-- soak:{name} -->", f"<!-- /soak:{name} -->"
    if start not in doc:
        return
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{start}\n{text.strip()}\n{end}{tail}")
