"""Which store a daemon opens: ``[store] backend`` picks SQLite (the default) or PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from .postgres import PgStore

if TYPE_CHECKING:
    from ..config import Settings
    from . import Store


def daemon_store(settings: Settings, clock: Callable[[], float] = time.time) -> Store:
    """The store a daemon opens (not yet opened).

    The daemon's modules are typed on ``Store``; ``PgStore`` provides every operation they use (the
    ``StoreBackend`` Protocol, the operator views, the writer's counters), which the contract suite
    and tests/test_store_postgres.py check, hence the cast."""
    from . import Store

    s = settings.store
    if s.backend == "postgres":
        assert s.dsn is not None  # config.py refuses a postgres backend without one
        pg = PgStore(s.dsn.reveal(), clock=clock, commit_max_rows=s.commit_max_rows, pool_size=s.pool_size)
        return cast("Store", pg)
    return Store(
        settings.db_path,
        synchronous=s.synchronous,
        busy_timeout=s.busy_timeout,
        max_size_mb=s.max_size_mb,
        commit_max_rows=s.commit_max_rows,
        clock=clock,
    )


def cli_store(settings: Settings, *, write: bool) -> Store:
    """The PostgreSQL store as a CLI command opens it: read-only, or writing beside the running nodes."""
    s = settings.store
    assert s.backend == "postgres" and s.dsn is not None
    return cast("Store", PgStore(s.dsn.reveal(), role="client" if write else "reader", pool_size=2))
