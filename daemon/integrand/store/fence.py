"""The fencing token a singleton's commits carry: set for the tasks of a source this node holds the lease of.

The ownership module (``integrand.ownership``) runs a source's tasks with :data:`CURRENT` set to its
:class:`Fence`; the PostgreSQL store checks that fence inside the transaction of every cursor, resume
position and state commit made from those tasks (so nothing in between the check and the commit can
change hands), and refuses the commit when the lease has moved on. A context variable rather than an
argument: the poller, streamer and connectors stay unaware of clustering, and SQLite ignores it.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Fence:
    """One holding of one lease: ``token`` is the lease's value when this node acquired it."""

    lease: str
    token: int
    # Local monotonic time until which the lease is surely still ours (renewals push it on); a task that
    # is about to start work (a poll) after it has passed stops instead: another node may hold it by now.
    valid_until: float = 0.0
    on_refused: Callable[[Fence, str], None] | None = field(default=None, repr=False)
    lost: bool = False

    def locally_valid(self, now: float | None = None) -> bool:
        return not self.lost and (time.monotonic() if now is None else now) < self.valid_until

    def refused(self, why: str) -> None:
        """The store refused a commit under this fence (or found it lapsed): stop the singleton, once."""
        first = not self.lost
        self.lost = True
        if first and self.on_refused is not None:
            self.on_refused(self, why)


CURRENT: contextvars.ContextVar[Fence | None] = contextvars.ContextVar("integrand_fence", default=None)
