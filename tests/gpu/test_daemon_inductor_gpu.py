"""``daemon.compile = "inductor"`` on cuda:0: a registered graph is compiled at registration and
its recording replays inductor's kernels (a graph compiled lazily under the tree manager's
inspection mode used to be recorded as plain ATen kernels: ``cgtree.daemon.compiling``)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


class Block(torch.nn.Module):
    """Elementwise work around a matmul: inductor fuses it into Triton kernels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(64, 64)
        self.norm = torch.nn.LayerNorm(64)

    def forward(self, x):
        return torch.nn.functional.gelu(self.norm(self.proj(x) + x)) * 2 + 1


def _register(runtime, module, example):
    from cgtree.client import lowering

    encoded = lowering.encode(lowering.lower(module, [example]))
    blobs = {h: memoryview(blob.data) for h, blob in encoded.weights.items()}
    return runtime.graphs.register(memoryview(encoded.graph_bytes), encoded.graph_id, blobs, {}, name="Block").entry


def _kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_an_inductor_daemon_records_inductors_kernels_and_matches_eager():
    from cgtree.config import Policy
    from cgtree.daemon.graphs import DeviceRuntime

    module = Block().cuda().eval()
    x = torch.randn(16, 64, device="cuda:0")
    runtime = DeviceRuntime("cuda:0", allowed_namespaces=lambda: (), compile_mode=lambda: "inductor")
    entry = _register(runtime, module, x)
    assert entry.fn is not entry.decoded.module  # compiled when registered
    manager = runtime.make_manager(Policy())
    fn = manager.cudagraphify(entry.fn, [*entry.weights, x], static_input_idxs=range(len(entry.weights)), name="Block")
    with torch.no_grad():
        for _ in range(3):
            (out,) = fn(*entry.weights, x)
        assert manager.last_execution.mode.value == "replayed"
        torch.testing.assert_close(out, module(x), rtol=1e-4, atol=1e-4)
        names = _kernel_names(lambda: fn(*entry.weights, x))
    assert any(name.startswith("triton_") for name in names), names
    manager.close()


def test_an_eager_daemon_keeps_the_aten_graph():
    from cgtree.daemon.graphs import DeviceRuntime

    runtime = DeviceRuntime("cuda:0", allowed_namespaces=lambda: (), compile_mode=lambda: "eager")
    entry = _register(runtime, Block().cuda().eval(), torch.randn(16, 64, device="cuda:0"))
    assert entry.fn is entry.decoded.module
