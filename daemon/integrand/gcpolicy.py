"""Garbage collection for a daemon whose startup builds a large, permanent object graph.

Startup (config, connectors, routes, every imported module) leaves some 65,000 objects the collector tracks.
A full collection walks all of them — 15-45 ms with the loop stopped, a stall for every connection at once —
and connection churn (a flood of short connections, each a few cyclic objects that live long enough to be
promoted) makes full collections frequent. ``integrand run`` freezes what startup built
(``gc.freeze``: moved to a permanent generation the collector skips); a reload thaws, collects and freezes
again once what it replaced is let go, so the old config's cycles are not kept for ever."""

from __future__ import annotations

import gc


def freeze() -> None:
    """Collect what startup threw away, then freeze the rest (once ready; ``integrand run`` only)."""
    gc.collect()
    gc.freeze()


def refreeze() -> None:
    """After a reload let go of the old config and connectors: collect what they left, freeze again. Only in
    a process that froze at start (in-process tests do not)."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
        gc.freeze()
