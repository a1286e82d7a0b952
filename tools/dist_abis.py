"""Add the compiled parts of other CPython versions to the one-file build's site-packages.

    python tools/dist_abis.py SITE 3.12 3.13

``pip install --target SITE`` put in the wheels for the Python that builds (3.11). A compiled module
is named per version (``_pydantic_core.cpython-312-x86_64-linux-gnu.so``), so the same package
directory can hold one per version and each interpreter imports its own. For every version-specific
wheel in SITE (``Root-Is-Purelib: false`` and not abi3), this fetches the same release built for each
other version and adds the files SITE lacks, so one zipapp runs on all of them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from email.parser import Parser
from pathlib import Path


def version_specific(site: Path) -> list[str]:
    """``name==version`` of the wheels in ``site`` that are built for one CPython version only."""
    out = []
    for info in sorted(site.glob("*.dist-info")):
        wheel = info / "WHEEL"
        if not wheel.exists():
            continue
        meta = Parser().parsestr(wheel.read_text())
        tags = meta.get_all("Tag") or []
        if meta.get("Root-Is-Purelib", "true").lower() == "true" or all("abi3" in t or "none" in t for t in tags):
            continue
        m = Parser().parsestr((info / "METADATA").read_text())
        out.append(f"{m['Name']}=={m['Version']}")
    return out


def merge(src: Path, dst: Path) -> int:
    """Copy the files of ``src`` that ``dst`` does not have; the number copied."""
    n = 0
    for f in src.rglob("*"):
        if f.is_file() and ".dist-info" not in f.parts[len(src.parts)] and "__pycache__" not in f.parts:
            target = dst / f.relative_to(src)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
                n += 1
    return n


def main(site: Path, versions: list[str]) -> None:
    reqs = version_specific(site)
    for version in versions:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:"]
            cmd += ["--python-version", version, "--target", tmp, *reqs]
            subprocess.run(cmd, check=True)
            added = merge(Path(tmp), site)
        print(f"python {version}: {added} files from {len(reqs)} compiled packages ({', '.join(reqs)})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
