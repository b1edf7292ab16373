"""Seed tests about skips and input mutation, ported to the ``backend="cgtree"`` compile path.

The seed's ``backend`` parameter ("inductor" / "cudagraphs") becomes cgtree's ``compiler``
option: "eager" runs AOT's ATen graph (CPU and GPU), "inductor" runs inductor's kernels under
cgtree's trees (GPU only: inductor on CPU costs ~18 s a compile). ``counters["inductor"]
["cudagraph_skips"]`` is the manager's ``counters["skips"]`` (distinct function/reason pairs),
and the skip text is cgtree's log line, which keeps PyTorch's wording.
"""

from __future__ import annotations

import pytest
import torch

import cgtree.compile as cgtree_compile
from cgtree.manager import TreeManager

_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# (device, compiler): inductor on the GPU only (a cold CPU inductor compile takes ~18 s).
DEVICE_COMPILERS = pytest.mark.parametrize(
    "device, compiler",
    [("cpu", "eager"), pytest.param("cuda:0", "eager", marks=_GPU), pytest.param("cuda:0", "inductor", marks=_GPU)],
)
MUTATION_PREFIX = "skipping cudagraphs due to mutated inputs (1 instances). Found from"



def compile_with(compiler: str):
    def compile_fn(fn):
        return torch.compile(fn, backend="cgtree", options={"compiler": compiler})

    return compile_fn


def skips(device) -> int:
    mgr = cgtree_compile.get_manager(device)
    return 0 if mgr is None else mgr.counters["skips"]


def test_mutation_reinplaced(device, skip_messages):
    class Model(torch.nn.Module):
        def forward(self, input, other, out):
            input = torch.logical_xor(input=input, other=other, out=out)
            return input

    x = torch.rand([1, 2, 1, 4, 9, 7], dtype=torch.float32, device=device)
    y = torch.rand([1, 2, 1, 4, 9, 7], dtype=torch.float32, device=device)
    z = torch.rand([1, 2, 1, 4, 9, 7], dtype=torch.float16, device=device)
    model = Model()
    eager = model(x, y, z.clone())
    out = torch.compile(model.forward, backend="cgtree")(x, y, z)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(z, eager)  # the out= argument was written, as eagerly
    (message,) = skip_messages()
    assert MUTATION_PREFIX in message and "torch.logical_xor" in message
    assert skips(device) == 1


def _cpu_input_part(device: str, skip_messages) -> None:
    def foo(x, y):
        return (x + 1, y + 2)

    foo = torch.compile(foo, backend="cgtree")
    x, y = torch.ones([10], device=device), torch.ones([20])
    out = foo(x, y)
    torch.testing.assert_close(out[1], torch.full([20], 3.0))
    message = skip_messages()[0]
    # cgtree names the argument by position and the graph by the user's function and line
    assert "skipping cudagraphs due to cpu device (arg1). Found from" in message
    assert "function foo" in message and f'defined at "{__file__}"' in message
    assert skips(device) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_multiple_devices_msg_cpu_input(skip_messages):
    """The single-GPU half of test_multiple_devices_msg: a CPU input to a CUDA graph."""
    _cpu_input_part("cuda:0", skip_messages)


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_multiple_devices_msg(skip_messages):
    _cpu_input_part("cuda:0", skip_messages)

    def foo(x, y):
        return (x + 1, y + 2)

    foo = torch.compile(foo, backend="cgtree")
    foo(torch.ones([10], device="cuda:0"), torch.ones([10], device="cuda:1"))
    assert any("skipping cudagraphs due to multiple devices" in m for m in skip_messages())
    assert skips("cuda:0") == 2


def test_skip_symbolic(device, skip_messages):
    cgtree_compile.configure(skip_dynamic_graphs=True)

    @torch.compile(backend="cgtree", dynamic=True)
    def foo(x, y):
        return x + y

    out = foo(torch.rand([10], device=device), torch.rand([10], device=device))
    assert out.shape == (10,)
    (message,) = skip_messages()
    assert "skipping cudagraphs due to graph with symbolic shapes inputs" in message
    assert skips(device) == 1


@DEVICE_COMPILERS
def test_mutation_on_inp(device, compiler, skip_messages):
    compile_fn = compile_with(compiler)

    def foo(x):
        x.add_(2)
        return x

    foo = compile_fn(foo)

    def inp():
        return torch.ones([10], device=device)

    x = inp()
    foo(x)
    torch.testing.assert_close(x, torch.full([10], 3.0, device=device))
    (message,) = skip_messages()
    assert MUTATION_PREFIX in message and ".add_(2)" in message
    assert skips(device) == 1
    # mutation of a caller's input never reaches graphs
    assert cgtree_compile.get_manager(device).root_children() == []

    # mutation of parameters/buffers does
    class Mod(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.buf = torch.ones([10], device=device)

        def forward(self, x):
            self.buf.add_(x)
            return self.buf + x

    def foo(mod, x):
        return mod(x)

    foo = compile_fn(foo)
    mod, mod2 = Mod(), Mod()
    for _ in range(3):
        torch.testing.assert_close(foo(mod, inp()), mod2(inp()))
        torch.testing.assert_close(mod.buf, mod2.buf)
    mgr = cgtree_compile.get_manager(device)
    assert mgr is not None and mgr.counters["recordings"] >= 1
    assert skips(device) == 1


def _mutation_pair(compile_fn):
    def foo(x):
        return x + 1

    def mut(x):
        x.add_(2)
        return x

    def non_mut(x):
        return x.add(2)

    return compile_fn(foo), compile_fn(mut), non_mut


@DEVICE_COMPILERS
def test_mutation_cudagraph_managed_tensors_config(device, compiler, skip_messages):
    cgtree_compile.configure(support_input_mutation=False)
    foo, mut, non_mut = _mutation_pair(compile_with(compiler))
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        inp = torch.rand([4], device=device)
        tmp = foo(inp)
        mut_out = mut(tmp)
        torch.testing.assert_close(mut_out, non_mut(foo(inp)))
    assert sum(MUTATION_PREFIX in m for m in skip_messages()) == 1


@DEVICE_COMPILERS
def test_mutation_cudagraph_managed_tensors(device, compiler, skip_messages):
    foo, mut, non_mut = _mutation_pair(compile_with(compiler))
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        inp = torch.rand([4], device=device)
        tmp = foo(inp)
        mut_out = mut(tmp)
        torch.testing.assert_close(mut_out, non_mut(foo(inp)))
    assert skip_messages() == []
    assert skips(device) == 0

    torch.compiler.cudagraph_mark_step_begin()
    inp = torch.rand([4], device=device)
    tmp = foo(inp)
    mut_inp = tmp.clone()
    # what was a tree-managed tensor is now an eager one: the mutating graph runs without graphs
    mut(mut_inp)
    (message,) = skip_messages()
    assert MUTATION_PREFIX in message and "x.add_(2)" in message
    torch.testing.assert_close(mut_inp, non_mut(foo(inp)))
    assert skips(device) == 1


@DEVICE_COMPILERS
def test_mutation_cudagraph_managed_tensor_warn(device, compiler, skip_messages):
    compile_fn = compile_with(compiler)

    def foo(x):
        return x.add_(1)

    def fee(y, z):
        return z.add(3)

    def inp():
        return torch.rand([4], device=device)

    foo, fee = compile_fn(foo), compile_fn(fee)
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        fee(inp(), foo(inp()))
    assert sum(MUTATION_PREFIX in m for m in skip_messages()) == 1
    assert skips(device) == 1


@DEVICE_COMPILERS
def test_mutation_cudagraph_managed_tensor_warn_only_once(device, compiler, skip_messages):
    foo, mut, _ = _mutation_pair(compile_with(compiler))

    def inp():
        return torch.rand([4], device=device)

    mut(inp())  # warns: not tree-managed
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        tmp = foo(inp())
        mut(tmp)  # tree-managed: graphed, no warning
    mut_inp = tmp.clone()
    mut(mut_inp)  # would warn, but mut has warned already
    assert sum(MUTATION_PREFIX in m for m in skip_messages()) == 1
    assert skips(device) == 1


# ---------------------------------------------------------------------------------------------
# Static inputs that are not aligned (the seed compiles with compile_fx_inner and
# static_input_idxs=[0]; here the graphed function gets the same static index directly).


class _CloneCounterMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.clone.default
        return func(*args, **(kwargs or {}))


def _unaligned_static_input(device: str, graphed_fn) -> None:
    def aligned():
        return [torch.rand([5, 5], device=device) for _ in range(2)]

    def unaligned():
        return [torch.rand([6, 5], device=device)[1:] for _ in range(2)]

    for _ in range(3):
        with _CloneCounterMode() as mode:
            x, y = unaligned()
            torch.testing.assert_close(graphed_fn(x, y)[0], x + y)
            assert mode.count == 0
            x, y = aligned()
            torch.testing.assert_close(graphed_fn(x, y)[0], x + y)
            assert mode.count == 0


def test_unaligned_static_input_trees(device):
    mgr = TreeManager(device)
    try:
        graphed = mgr.cudagraphify(lambda x, y: (x + y,), static_input_idxs=[0], name="fn")
        _unaligned_static_input(device, graphed)
        assert mgr.counters["recordings"] >= 1
    finally:
        mgr.close()


def test_unaligned_static_input_non_trees(device):
    # cgtree has no separate non-tree mode; the closest is recording on the first call.
    mgr = TreeManager(device, policy=cgtree_compile.policy().__class__(skip_warmup=True))
    try:
        graphed = mgr.cudagraphify(lambda x, y: (x + y,), static_input_idxs=[0], name="fn")
        _unaligned_static_input(device, graphed)
        assert mgr.counters["warmups"] == 0
    finally:
        mgr.close()


def test_unaligned_static_input_no_cudagraphs(device):
    # Graphs off for this function: every call is skipped (capture_sizes excludes its size).
    mgr = TreeManager(device, policy=cgtree_compile.policy().__class__(capture_sizes=(1,)))
    try:
        graphed = mgr.cudagraphify(lambda x, y: (x + y,), static_input_idxs=[0], name="fn")
        _unaligned_static_input(device, graphed)
        assert mgr.counters["recordings"] == 0 and mgr.counters["skipped_calls"] == 6
    finally:
        mgr.close()


# ---------------------------------------------------------------------------------------------
# Graph partition (inductor-only) keeps one observable behaviour worth porting: a model whose
# graph holds an op tagged cudagraph_unsafe computes what eager computes, and the op is never
# captured.

_UNSAFE_TAG = getattr(torch._C.Tag, "cudagraph_unsafe", None)


@pytest.mark.skipif(_UNSAFE_TAG is None, reason="this torch has no cudagraph_unsafe tag")
def test_graph_partition_with_memory_plan_reuse(device, skip_messages):
    batch, width = 4, 16

    @torch.library.custom_op("cgtree_seed::attention", mutates_args=["out"], tags=(_UNSAFE_TAG,))
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(q + k + v)

    @attention.register_fake
    def _(q, k, v, out):
        return None

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre_attn = torch.nn.Linear(width, width, bias=False)
            self.post_attn = torch.nn.Linear(width, width, bias=False)

        def forward(self, x):
            x = self.pre_attn(x)
            attn_output = torch.empty_like(x)
            torch.ops.cgtree_seed.attention(x, x, x, attn_output)
            return self.post_attn(attn_output)

    class TwoGraphs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_one, self.attn_two = Attention(), Attention()
            self.register_buffer("hidden_states", torch.zeros((batch, width)))

        def forward(self, x):
            bsz = x.shape[0]
            self.hidden_states[:bsz].copy_(x)
            x = self.attn_one(self.hidden_states[:bsz])
            self.hidden_states[:bsz].copy_(x)
            return self.attn_two(self.hidden_states[:bsz]) + x

    eager_model = TwoGraphs().eval().to(device)
    compiled = torch.compile(eager_model, backend="cgtree")
    inputs = torch.randn(batch, width, device=device)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(inputs), eager_model(inputs))
    assert any("skipping cudagraphs due to incompatible op" in m and "cgtree_seed.attention" in m
               for m in skip_messages())
