"""Fixtures and helpers shared by the core tests.

Test modules import ``make_manager`` by name (``from core_helpers import make_manager``); the
parametrized ``device`` fixture it uses (cpu, and cuda:0 marked gpu) is in tests/conftest.py.
"""

from __future__ import annotations

import gc

import pytest
import torch

from cgtree import Policy
from cgtree.manager import TreeManager

@pytest.fixture
def make_manager(device):
    """Build managers on the test's device; each is closed, and on CUDA the seed's tearDown
    invariant is checked: no live blocks and no pool segments remain."""
    managers = []

    def build(**policy) -> TreeManager:
        mgr = TreeManager(device, policy=Policy(**policy))
        managers.append(mgr)
        return mgr

    yield build
    for mgr in managers:
        mgr.close()
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        for mgr in managers:
            pool = tuple(mgr.backend.pool)
            segments = [s for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) == pool]
            assert segments == [], f"pool segments left after close(): {len(segments)}"


def live_blocks(mgr: TreeManager) -> int:
    """The manager's live block count; on CUDA also checked against the allocator itself."""
    gc.collect()
    count = mgr.live_block_count()
    if mgr.backend_name == "cuda":
        assert mgr.backend.pool_stats()["allocator_live_blocks"] == count
    return count
