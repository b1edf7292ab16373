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


class WritesCache(torch.nn.Module):
    """A decoder-like step whose cache is an input it writes in place at a position."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, cache, x, pos):
        cache.index_copy_(1, pos, self.proj(x).unsqueeze(1))
        return cache.sum(1)


def test_a_compiled_graph_writes_a_static_input_in_place():
    from cgtree.client import lowering
    from cgtree.config import Policy
    from cgtree.daemon.graphs import DeviceRuntime

    module = WritesCache().cuda().eval()
    cache, reference = torch.zeros(8, 16, 64, device="cuda:0"), torch.zeros(8, 16, 64, device="cuda:0")
    x, pos = torch.randn(8, 64, device="cuda:0"), torch.zeros(1, dtype=torch.long, device="cuda:0")
    encoded = lowering.encode(lowering.lower(module, [cache.clone(), x, pos]))
    runtime = DeviceRuntime("cuda:0", allowed_namespaces=lambda: (), compile_mode=lambda: "inductor")
    blobs = {h: memoryview(blob.data) for h, blob in encoded.weights.items()}
    entry = runtime.graphs.register(memoryview(encoded.graph_bytes), encoded.graph_id, blobs, {}).entry
    assert entry.mutated_inputs == (0,) and entry.fn is not entry.decoded.module
    weights = len(entry.weights)
    manager = runtime.make_manager(Policy())
    fn = manager.cudagraphify(entry.fn, [*entry.weights, cache, x, pos], static_input_idxs=[*range(weights), weights],
                              name="WritesCache")
    with torch.no_grad():
        for step in range(5):
            x.copy_(torch.randn(8, 64, device="cuda:0"))
            pos.fill_(step)
            (out,) = fn(*entry.weights, cache, x, pos)
            expected = module(reference, x, pos)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(cache, reference, rtol=1e-4, atol=1e-4)
        assert manager.last_execution.mode.value == "replayed"
    manager.close()


def test_an_eager_daemon_keeps_the_aten_graph():
    from cgtree.daemon.graphs import DeviceRuntime

    runtime = DeviceRuntime("cuda:0", allowed_namespaces=lambda: (), compile_mode=lambda: "eager")
    entry = _register(runtime, Block().cuda().eval(), torch.randn(16, 64, device="cuda:0"))
    assert entry.fn is entry.decoded.module
