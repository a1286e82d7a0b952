"""State on disk is private to the daemon's user whatever the umask: webhook bodies and tokens live there."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as 0700, and tighten it if it exists more open."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != DIR_MODE:
        path.chmod(DIR_MODE)


def private_file(path: Path) -> None:
    """Create ``path`` empty as 0600 if missing, else tighten it to 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def private_database(db: Path) -> None:
    """The SQLite file made 0600 before SQLite opens it: its -wal and -shm are created with the same mode.

    Existing ones from a run under a looser umask are tightened too."""
    private_dir(db.parent)
    private_file(db)
    for suffix in ("-wal", "-shm", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{db}{suffix}").chmod(FILE_MODE)
