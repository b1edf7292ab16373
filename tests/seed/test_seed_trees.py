"""Seed tests about tree shapes, live blocks, checkpoints and output aliasing, ported to the
``backend="cgtree"`` compile path (the seed's ``torch.compile`` / ``mode="reduce-overhead"``).

Live blocks are the manager's own count (``live_block_count``); on CUDA it is checked against
the allocator's view of the pool, which is what the seed's ``all_live_block_count`` reads.
"""

from __future__ import annotations

import gc

import torch

import cgtree.compile as cgtree_compile
from cgtree.manager import TreeManager


def compile_cgtree(fn=None, **kwargs):
    if fn is None:
        return lambda f: torch.compile(f, backend="cgtree", **kwargs)
    return torch.compile(fn, backend="cgtree", **kwargs)


def manager(device) -> TreeManager:
    mgr = cgtree_compile.get_manager(device)
    assert mgr is not None, f"no cgtree manager on {device}"
    return mgr


def live_blocks(device) -> int:
    mgr = cgtree_compile.get_manager(device)
    if mgr is None:
        return 0
    gc.collect()
    count = mgr.live_block_count()
    if mgr.backend_name == "cuda":
        assert mgr.backend.pool_stats()["allocator_live_blocks"] == count
    return count


def run_twice(fn, *args):
    fn(*args)
    return fn(*args)


def test_run_simple(device):
    def foo(x):
        return x * x * x

    foo_opt = compile_cgtree(foo)
    ones = torch.ones([4, 4], device=device)
    zeros = torch.zeros([5, 5], device=device)
    run_twice(foo_opt, ones)
    run_twice(foo_opt, zeros)
    assert manager(device).root_children() == [0, 0]
    torch.testing.assert_close(foo_opt(ones), ones)


def test_function_compiled_multiple_times(device):
    def foo(x):
        y = foo2(x)
        y2 = foo2(y)
        return y + y2

    def foo2(x):
        torch._dynamo.graph_break()
        return x * x * x

    foo_opt = compile_cgtree(foo)
    ones = torch.ones([4, 4], device=device)
    foo(ones)
    foo_opt(ones)
    foo_opt(ones)
    torch.testing.assert_close(foo_opt(ones), foo(ones))
    # one root (foo2's graph on x) with two descendants (foo2's on y, then y + y2)
    assert manager(device).root_children() == [2]


def test_end_recording_early(device):
    from torch._dynamo.mutation_guard import GenerationTracker

    def foo(x):
        y = x * x * x
        torch._dynamo.graph_break()
        z = x + y
        return z

    @compile_cgtree
    def foo2(x):
        return x + 4

    foo_opt = compile_cgtree(foo)
    for _ in range(3):
        out = foo_opt(torch.ones([4, 4], device=device))
        del out
        # As the seed: make foo2's call look like part of foo's invocation.
        GenerationTracker.generation -= 1
        out = foo2(torch.ones([4, 4], device=device))
        del out
    foo_opt(torch.ones([4, 4], device=device))
    # two separate traces: one has a child, one doesn't
    assert manager(device).root_children() == [1, 0]


def test_execution_into_recording(device):
    def foo(x):
        y = x + x
        if y.sum() > 0:
            return y + 10
        else:
            return y - 10

    foo_opt = compile_cgtree(foo)
    inp = torch.zeros([4, 4], dtype=torch.float, device=device)
    torch.testing.assert_close(foo_opt(inp), foo(inp))
    torch.testing.assert_close(foo_opt(inp), foo(inp))

    inp.add_(1)
    out_eager = foo(inp)
    out_warmup = foo_opt(inp)
    torch.testing.assert_close(out_warmup, out_eager)
    # the warmup output is an allocator block of the pool
    assert live_blocks(device) == 1

    out_live = foo_opt(inp)
    torch.testing.assert_close(out_live, out_eager)
    # recording mode: its output is the one live block, the warmup's was freed
    assert live_blocks(device) == 1
    del out_warmup
    assert live_blocks(device) == 1
    del out_live
    assert live_blocks(device) == 0

    out = foo_opt(inp)
    torch.testing.assert_close(foo(inp), out)
    # execution mode: replay outputs are graph memory, not allocator blocks
    assert live_blocks(device) == 0


def test_accumulate_multiple_recordings(device):
    def foo(x):
        y = x + x + x
        torch._dynamo.graph_break()
        if y.sum() <= 0:
            return y
        else:
            return y * 10

    foo_opt = compile_cgtree(foo)
    # two separate compilations & recordings
    out1 = run_twice(foo_opt, torch.zeros([5], device=device))
    # out1 is invalidated (its block freed) by the next invocation's generation
    out2 = run_twice(foo_opt, torch.zeros([6], device=device))
    assert live_blocks(device) == 1
    out3 = run_twice(foo_opt, torch.ones([5], device=device))
    torch.testing.assert_close(out3, foo(torch.ones([5], device=device)))
    assert live_blocks(device) == 1
    del out1, out2
    assert live_blocks(device) == 1
    del out3
    gc.collect()
    assert live_blocks(device) == 0


def test_live_outputs_multiple_graphs(device):
    def foo(x):
        x = x + x + x
        y = x + 1
        torch._dynamo.graph_break()
        z = x * x
        if z.sum() > 0:
            return y + 1
        else:
            return y

    foo_opt = compile_cgtree(foo)
    run_twice(foo_opt, torch.zeros([5], device=device))
    assert manager(device).counters["checkpoints"] == 0
    out = run_twice(foo_opt, torch.ones([5], device=device))
    torch.testing.assert_close(out, torch.full([5], 5.0, device=device))
    assert live_blocks(device) == 1
    del out
    assert live_blocks(device) == 0
    # one checkpoint from execution to warm up y + 1, and another to record it
    assert manager(device).counters["checkpoints"] == 2


def test_expanded_inputs(device):
    x = torch.rand(1, 512, device=device).expand(4, 512)

    def foo(x):
        return x + 4 + torch.ones([4, 512], device=x.device)

    foo_opt = compile_cgtree(foo)
    for _ in range(3):
        torch.testing.assert_close(foo_opt(x), foo(x))
    assert manager(device).counters["recordings"] >= 1  # the seed: new_graph_id() != 0


def test_tensor_dies_between_checkpoint(device):
    # The seed calls cudagraphify_impl directly (no dynamo, no generations): the direct API.
    mgr = TreeManager(device, policy=cgtree_compile.policy().__class__(skip_warmup=True))
    try:
        foo = mgr.cudagraphify(lambda x: (x + 1, x + 2), name="foo", top_level=False)
        inp = torch.rand([4], device=device)
        foo(inp)
        foo(inp)
        out1, out2 = foo(inp)
        pending = [out1]
        del out1, out2

        foo2 = mgr.cudagraphify(lambda x: [x * x * x], name="foo2", top_level=False)
        assert mgr.counters["checkpoints"] == 0
        x = foo2(pending.pop())[0]
        torch.testing.assert_close(x, (inp + 1) ** 3)
        assert mgr.counters["checkpoints"] == 1
        # out2 died between the previous recording and this one: freed after the checkpoint
        gc.collect()
        assert mgr.live_block_count() == 1
        del x
        assert mgr.live_block_count() == 0
    finally:
        mgr.close()


def test_aliased_storage_single_weakref(device):
    @compile_cgtree
    def foo(x):
        x = x * 20
        x_alias = x[0]
        y = x * 10
        y_alias = y[0]
        torch._dynamo.graph_break()
        ind = torch.tensor(4, device=x.device)
        x_alias2 = x[ind:]
        y_alias2 = y[ind:]
        return x, x_alias, x_alias2, y_alias, y_alias2

    for _ in range(4):
        outs = foo(torch.rand([20, 20], device=device))
        ptr_to_ref = {out.untyped_storage().data_ptr(): out.untyped_storage()._cdata for out in outs}
        # two storages (x and y); every alias of one shares the very same storage object
        assert len(ptr_to_ref) == 2
        for out in outs:
            assert ptr_to_ref[out.untyped_storage().data_ptr()] == out.untyped_storage()._cdata
        del outs
        del out
    mgr = manager(device)
    assert mgr.live_output_count() == 0
    assert mgr.counters["recordings"] >= 1


def test_aliasing_static_ref(device):
    class Mod(torch.nn.Linear):
        def forward(self, x):
            return self.weight.T @ x, self.weight.T, self.weight[0:4]

    def cdata(t):
        return t.untyped_storage()._cdata

    m = Mod(10, 10).to(device)

    @compile_cgtree
    def foo(mod, x):
        return mod(x)

    @compile_cgtree
    def foo2(x):
        return x[2:]

    param_c = cdata(m.weight)
    for _ in range(3):
        x = torch.rand([10, 10], device=device, requires_grad=True)
        torch.compiler.cudagraph_mark_step_begin()
        out1, alias_1, alias_2 = foo(m, x)
        # outputs that alias a parameter are views of the parameter itself
        assert len({param_c, cdata(alias_1), cdata(alias_2)}) == 1
        out2 = foo2(out1)
        out2.sum().backward()
        # an output of a graph that aliases its (tree-managed) input is a view of that input
        assert cdata(out1) == cdata(out2)
        m.weight.grad = None
        m.bias.grad = None
    assert manager(device).counters["recordings"] >= 1


def test_constant_output(device):
    # The seed runs this under inductor's freezing (parameters become constants); the observable
    # part is that returning a parameter and a view of it next to a computed output is correct.
    class Mod(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.param = torch.nn.Parameter(torch.tensor([float(i) for i in range(10)], device=device))

        def forward(self, inp):
            return self.param, self.param[0:2], inp + 2

    inp = torch.tensor([2], device=device)
    m = Mod()
    with torch.no_grad():
        out_eager = m(inp)
        m_comp = compile_cgtree(m)
        for _ in range(3):
            out = m_comp(inp)
            for got, expected in zip(out, out_eager):
                torch.testing.assert_close(got, expected)
            assert out[0].data_ptr() == m.param.data_ptr()


def test_sparsity(device):
    aten = torch.ops.aten

    def foo(view_6, buf31):
        return aten._sparse_coo_tensor_with_dims_and_tensors(
            1, 1, [1000000, 64], view_6, buf31,
            dtype=torch.float32, layout=torch.sparse_coo, device=view_6.device, pin_memory=None,
        )

    foo_opt = compile_cgtree(foo)
    view_6 = torch.zeros([1, 1024], dtype=torch.int64, device=device)
    buf31 = torch.rand([1024, 64], device=device)
    for _ in range(3):
        got, expected = foo_opt(view_6, buf31), foo(view_6, buf31)
        assert got.layout == torch.sparse_coo and got.shape == expected.shape
        torch.testing.assert_close(got._indices(), expected._indices())
        torch.testing.assert_close(got._values(), expected._values())


def test_index_put(device):
    def fn(x, y, z):
        x = torch.zeros_like(x)
        return x.index_put_([y], z, True)

    fn_c = compile_cgtree(fn)

    def args():
        x = torch.zeros((512, 512), dtype=torch.bool, device=device)
        y = torch.arange(512, dtype=torch.int64, device=device)
        z = torch.ones((512, 512), dtype=torch.bool, device=device)
        return x, y, z

    # (the seed also checks inductor's code for index_put_: inductor-only, see docs/seed-tests.md)
    for _ in range(3):
        torch.testing.assert_close(fn_c(*args()), fn(*args()))
