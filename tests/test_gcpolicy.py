"""What `integrand run` freezes at start is not kept for ever once a reload lets go of it."""

from __future__ import annotations

import gc
import weakref

from integrand import gcpolicy


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_refreeze_collects_what_was_frozen_and_has_since_become_garbage() -> None:
    old = _Node()  # built before the freeze, like the config a reload replaces
    ref = weakref.ref(old)
    gcpolicy.freeze()
    try:
        del old
        gc.collect()
        assert ref() is not None, "a frozen cycle is skipped by collections: why refreeze exists"
        gcpolicy.refreeze()
        assert ref() is None
        assert gc.get_freeze_count() > 0, "frozen again after the reload"
    finally:
        gc.unfreeze()


def test_refreeze_does_nothing_in_a_process_that_never_froze() -> None:
    gc.unfreeze()
    gcpolicy.refreeze()
    assert gc.get_freeze_count() == 0
