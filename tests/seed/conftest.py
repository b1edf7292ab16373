"""Fixtures for the seed tests (PyTorch's test_cudagraph_trees.py, ported to cgtree).

Every test starts and ends with ``torch._dynamo.reset()`` (which also resets the cgtree
backend's managers, as it resets PyTorch's trees) and the backend's default policy. Tests
taking ``device`` run on the cpu-replay manager in CI and on cuda:0 on a GPU host (those cases
carry the ``gpu`` marker). On CUDA the seed's tearDown invariant is checked: once the managers
are closed, no segment of their pools is left.
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch

import cgtree.compile as cgtree_compile

SKIP_LOGGER = "cgtree.skips"

@pytest.fixture(autouse=True)
def fresh_backend():
    torch._dynamo.reset()
    cgtree_compile.reset()
    yield
    pools = [
        tuple(mgr.backend.pool)
        for mgr in cgtree_compile.managers().values()
        if mgr.backend_name == "cuda"
    ]
    torch._dynamo.reset()
    cgtree_compile.reset()
    assert cgtree_compile.managers() == {}
    if pools:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        left = [s for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) in pools]
        assert left == [], f"pool segments left after reset: {len(left)}"


@pytest.fixture
def skip_messages(caplog):
    """``skip_messages()``: the "skipping cudagraphs due to ..." lines logged so far."""
    caplog.set_level(logging.WARNING, logger=SKIP_LOGGER)

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == SKIP_LOGGER]

    return messages
