"""Fixtures for the core tests: every test runs on the CPU replay backend, and on cuda:0 too
when a GPU is present (those cases carry the ``gpu`` marker, so CI deselects them)."""

from __future__ import annotations

import gc

import pytest
import torch

from cgtree import Policy
from cgtree.manager import TreeManager

DEVICES = [
    "cpu",
    pytest.param(
        "cuda:0",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


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
