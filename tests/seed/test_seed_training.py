"""Seed tests about RNG, training steps (forward + backward graphs) and devices, ported to the
``backend="cgtree"`` compile path.

A training graph reaches cgtree as two graphs: the forward (kind "forward": the generation
stays open until its backward ran) and the backward (kind "backward", recorded as a child of
its forward). The seed's caching tests (FxGraphCache / AOTAutogradCache) are inductor's; the
parts of them about graphs and devices are ported, the cache counters are not (see
docs/seed-tests.md).
"""

from __future__ import annotations

import pytest
import torch

import cgtree.compile as cgtree_compile
from cgtree import Policy
from cgtree.manager import TreeManager

_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# (device, compiler): inductor on the GPU only (a cold CPU inductor compile takes ~18 s).
DEVICE_COMPILERS = pytest.mark.parametrize(
    "device, compiler",
    [("cpu", "eager"), pytest.param("cuda:0", "eager", marks=_GPU), pytest.param("cuda:0", "inductor", marks=_GPU)],
)



def manager(device) -> TreeManager:
    mgr = cgtree_compile.get_manager(device)
    assert mgr is not None, f"no cgtree manager on {device}"
    return mgr


def _check_rng(foo) -> None:
    """The seed's check_rng: replays draw what eager draws after the same seed. Outputs are
    cloned: a replay's output is overwritten by the next call (see docs/seed-tests.md)."""
    torch.manual_seed(0)
    first = [foo().clone() for _ in range(3)]
    assert len({tuple(t.tolist()) for t in first}) == 3  # fresh numbers on every call
    torch.manual_seed(0)
    for expected in first:
        torch.testing.assert_close(foo(), expected)


def test_rng_trees(device):
    @torch.compile(backend="cgtree")
    def foo():
        return torch.rand([20], device=device)

    _check_rng(foo)
    assert manager(device).counters["replays"] >= 3


def test_rng_non_trees(device):
    # cgtree has no non-tree mode: the same check through the manager called directly.
    mgr = TreeManager(device)
    try:
        _check_rng(mgr.cudagraphify(lambda: torch.rand([20], device=device), name="rand"))
        assert mgr.counters["replays"] >= 3
    finally:
        mgr.close()


def test_forward_with_skipped_cudagraphed_backward(device):
    # The seed forces inductor's "complex memory overlap" skip on the backward via an expanded
    # gradient. cgtree copies such inputs into dense buffers, so the backward is graphed; what
    # carries over: the gradient is right, and once it ran no backward is pending.
    @torch.compile(backend="cgtree")
    def foo(x):
        return x * x * x

    for _ in range(3):
        inp = torch.rand([20, 20], device=device, requires_grad=True)
        out = foo(inp)
        back_inp = torch.rand([20], device=device).expand(20, 20)
        out.backward(back_inp)
        torch.testing.assert_close(inp.grad, 3 * inp.detach() ** 2 * back_inp)
    mgr = manager(device)
    assert mgr.root_children() == [1]  # the backward is its forward's child
    # no pending backward: the next top-level call starts a new generation (out is overwritten)
    before = mgr.counters["overwritten_outputs"]
    foo(torch.rand([20, 20], device=device, requires_grad=True))
    assert mgr.counters["overwritten_outputs"] > before


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cached_boxed_forward_device_index():
    @torch.compile(backend="cgtree")
    def foo(x):
        return x * x * x

    with torch.cuda.device(1):
        for _ in range(3):
            torch._dynamo.reset()
            inp = torch.rand([20, 20], device="cuda", requires_grad=True)
            out = foo(inp)
            out.backward(torch.rand([20], device="cuda").expand(20, 20))
    # forward and backward both went to device 1's tree, none to device 0's
    assert cgtree_compile.get_manager("cuda:0") is None
    # each dynamo reset rebuilt the tree: one step since, so a forward and a backward warmup
    assert cgtree_compile.get_manager("cuda:1").counters["warmups"] == 2


def test_backward_gets_cached_cudagraphs():
    # The seed: CPU inputs disable CUDA graphs for the forward and the backward, also after a
    # dynamo reset. cgtree: CPU graphs go to the cpu-replay tree, never to a CUDA one.
    @torch.compile(backend="cgtree")
    def foo(x):
        return x * x * x

    for _ in range(2):
        torch._dynamo.reset()
        inp = torch.rand([20, 20], device="cpu", requires_grad=True)
        out = foo(inp)
        back = torch.rand([20], device="cpu").expand(20, 20)
        out.backward(back)
        torch.testing.assert_close(inp.grad, 3 * inp.detach() ** 2 * back)
        assert cgtree_compile.get_manager("cpu").counters["warmups"] == 2  # forward, backward
    assert [d for d in cgtree_compile.managers() if d.startswith("cuda")] == []


def test_cached_forward_backward(device):
    cgtree_compile.configure(Policy(skip_warmup=True, support_input_mutation=True))

    @torch.compile(backend="cgtree")
    def foo(x):
        torch.manual_seed(0)
        y = x * 2
        return torch.sin(y) * torch.nn.functional.dropout(x, p=0.4)

    inp = torch.rand([4, 4], requires_grad=True, device=device)
    inp2 = inp.detach().clone().requires_grad_(True)
    out = foo(inp).clone()
    out.sum().backward()
    assert manager(device).root_children() == [1]
    assert manager(device).counters["recordings"] == 2
    # inp.grad is the backward graph's output, in the tree's memory: the reset below frees
    # it (PyTorch's trees keep such blocks until they die; see docs/seed-tests.md)
    grad = inp.grad.clone()

    # The seed reruns after a dynamo reset (an AOTAutograd cache hit there): same values and
    # the same tree, rebuilt from scratch.
    torch._dynamo.reset()
    out2 = foo(inp2)
    out2.sum().backward()
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(grad, inp2.grad)
    assert manager(device).root_children() == [1]


@DEVICE_COMPILERS
def test_forward_backward_not_called(device, compiler):
    def foo(x, y):
        x_out = x * x * x
        torch._dynamo.graph_break()
        y_out = y * y * y
        return x_out, y_out

    foo = torch.compile(foo, backend="cgtree", options={"compiler": compiler})
    for _ in range(3):
        inps = [torch.rand([20, 20], requires_grad=True, device=device) for _ in range(2)]
        x_out, y_out = foo(inps[0], inps[1])
        x_out.sum().backward()
        torch.testing.assert_close(inps[0].grad, 3 * inps[0].detach() ** 2)
    mgr = manager(device)
    # graphs of x's forward, y's forward and x's backward; y's backward was never called
    assert mgr.counters["recordings"] == 3
    # and nothing waits for it: the backward that ran closed the pending forward, so the next
    # top-level call starts a new generation (the last step's outputs are overwritten)
    before = mgr.counters["overwritten_outputs"]
    foo(*[torch.rand([20, 20], requires_grad=True, device=device) for _ in range(2)])
    assert mgr.counters["overwritten_outputs"] > before
