"""Helpers shared by the core tests."""

from __future__ import annotations

import gc

from cgtree.manager import TreeManager


def live_blocks(mgr: TreeManager) -> int:
    """The manager's live block count; on CUDA also checked against the allocator itself."""
    gc.collect()
    count = mgr.live_block_count()
    if mgr.backend_name == "cuda":
        assert mgr.backend.pool_stats()["allocator_live_blocks"] == count
    return count
