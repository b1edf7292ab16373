"""0-dim CPU tensors given to a CUDA graph (saved scalars of backward graphs, SDPA's RNG seed,
step counters) replay with the value of each call, never the one baked in at capture."""

from __future__ import annotations

import pytest
import torch

from cgtree import Policy
from cgtree.manager import TreeManager

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_changing_cpu_scalar_is_read_on_every_replay():
    mgr = TreeManager("cuda:0", policy=Policy(skip_warmup=False))
    f = mgr.cudagraphify(lambda x, s: x * s + 1, (torch.ones(4, device="cuda"), torch.tensor(2.0)))
    x = torch.arange(4.0, device="cuda")
    for step in range(6):
        out = f(x, torch.tensor(float(step)))
        torch.testing.assert_close(out, x * step + 1)
    assert mgr.counters["skipped_calls"] == 0
    assert mgr.counters["replays"] == 4
