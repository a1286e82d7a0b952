"""The durable queue and state: events, deliveries, audit, rejections, cursors, the entity ledger, connector state.

A package with one job per module (see docs/architecture.md, "The store"):

- ``engine``: one writer task, group commit, checkpoints, the writer lock and roles, the migration
  runner; it applies (grouped) operations it does not need to know about and imports nothing above it;
- ``schema``: the migrations; ``records``: what operations take and return;
- ``ledger``: the rule for which version is newer and what is a delete (queue, replay, reconciliation);
- ``queue``: enqueue, lease with a fencing token, complete, reclaim, cursors;
- ``deadletters``: the DLQ and the operator's views; ``retention``: pruning; ``state``: connector state;
- ``backend``: ``StoreBackend``, the Protocol of the public operations every backend implements.

``Store`` is the SQLite backend, composed of those parts. Every name other modules import from
``integrand.store`` is re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..events import version_newer
from ..store_views import OperatorViews
from .backend import StoreBackend
from .deadletters import REJECTIONS_BUFFERED, DeadLetters
from .engine import CHECKPOINT_EVERY, PROBE_BYTES, WAL_MAX_FRAMES, Conn, Engine, Role, StoreLocked
from .ledger import data_hash, is_delete, judge, superseded
from .queue import Queue
from .records import (
    AuditEntry,
    CursorRow,
    DeadLetter,
    DeliveryDetail,
    EnqueueResult,
    EntityVersion,
    Leased,
    Outcome,
    Rejection,
    ReplayResult,
    UnstorableEvent,
)
from .retention import LOOP_GUARD_SCOPE, Retention
from .schema import MIGRATIONS
from .state import ConnectorState

__all__ = [
    "CHECKPOINT_EVERY",
    "LOOP_GUARD_SCOPE",
    "MIGRATIONS",
    "PROBE_BYTES",
    "REJECTIONS_BUFFERED",
    "WAL_MAX_FRAMES",
    "AuditEntry",
    "Conn",
    "CursorRow",
    "DeadLetter",
    "DeliveryDetail",
    "Engine",
    "EnqueueResult",
    "EntityVersion",
    "Leased",
    "Outcome",
    "Rejection",
    "ReplayResult",
    "Role",
    "Store",
    "StoreBackend",
    "StoreLocked",
    "UnstorableEvent",
    "data_hash",
    "is_delete",
    "judge",
    "superseded",
    "version_newer",
]


class Store(Queue, DeadLetters, Retention, ConnectorState, OperatorViews):
    """The SQLite store, opened in one of four roles.

    ``daemon`` owns the file: it takes the writer lock, releases a dead run's leases and checkpoints.
    ``writer`` is a CLI write command with no daemon running: it takes the same lock (``StoreLocked``
    if a daemon holds it: the command must then go through the daemon). ``reader`` opens the file
    read-only (``mode=ro``): no writer task, no migration, no lock; every write raises. ``client``
    writes beside a running daemon without the lock (kept for compatibility; ids and fencing make
    it safe, but one writer per store is the rule: prefer ``writer`` or the daemon's admin API).
    """

    MIGRATIONS = MIGRATIONS

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        busy_timeout: float = 5.0,
        max_size_mb: int | None = None,
        commit_max_rows: int = 4000,
        clock: Callable[[], float] = time.time,
        role: Role = "daemon",
    ):
        super().__init__(
            path,
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            max_size_mb=max_size_mb,
            commit_max_rows=commit_max_rows,
            clock=clock,
            role=role,
        )
        self._init_queue()
        self._init_dead_letters()
        self._init_retention()
