"""Tree shapes, live blocks and checkpoints: the seed's tree tests ported to cgtree's API.

Where the seed uses torch.compile with graph breaks, these tests build the same pieces by
hand: each graph-broken piece is a ``cudagraphify``'d function with ``top_level=False`` and
the "compiled frame" calls ``begin_invocation()`` on entry, as dynamo's frame entry does.
"""

from __future__ import annotations

import gc

import pytest
import torch
from core_helpers import live_blocks, make_manager  # noqa: F401 (fixture)


def run_twice(fn, *args):
    fn(*args)
    return fn(*args)


def test_run_simple(make_manager, device):
    mgr = make_manager()
    foo = mgr.cudagraphify(lambda x: x * x * x, name="foo")
    ones = torch.ones([4, 4], device=device)
    zeros = torch.zeros([5, 5], device=device)
    run_twice(foo, ones)
    run_twice(foo, zeros)
    assert mgr.root_children() == [0, 0]
    torch.testing.assert_close(foo(ones), ones)
    assert mgr.last_execution.mode.value == "replayed"


def test_function_compiled_multiple_times(make_manager, device):
    mgr = make_manager()
    cube = mgr.cudagraphify(lambda x: x * x * x, name="foo2", top_level=False)
    add = mgr.cudagraphify(lambda a, b: a + b, name="add", top_level=False)

    def foo_opt(x):
        mgr.begin_invocation()
        y = cube(x)
        y2 = cube(y)
        return add(y, y2)

    def foo(x):
        y = x * x * x
        return y + y * y * y

    ones = torch.ones([4, 4], device=device)
    foo_opt(ones)
    foo_opt(ones)
    torch.testing.assert_close(foo_opt(ones), foo(ones))
    # one root (cube) with two descendants (cube on its output, then add)
    assert mgr.root_children() == [2]
    assert mgr.counters["replays"] == 3


def test_end_recording_early(make_manager, device):
    mgr = make_manager()
    cube = mgr.cudagraphify(lambda x: x * x * x, name="foo.cube", top_level=False)
    add = mgr.cudagraphify(lambda x, y: x + y, name="foo.add", top_level=False)
    # foo2 runs inside the same invocation (the seed winds dynamo's generation back to get this)
    foo2 = mgr.cudagraphify(lambda x: x + 4, name="foo2", top_level=False)

    def foo_opt(x):
        mgr.begin_invocation()
        return add(x, cube(x))

    for _ in range(3):
        out = foo_opt(torch.ones([4, 4], device=device))
        del out
        out = foo2(torch.ones([4, 4], device=device))
        del out
    foo_opt(torch.ones([4, 4], device=device))
    # two separate traces: one has a child, one doesn't
    assert mgr.root_children() == [1, 0]


def test_execution_into_recording(make_manager, device):
    mgr = make_manager()
    double = mgr.cudagraphify(lambda x: x + x, name="double", top_level=False)
    plus = mgr.cudagraphify(lambda y: y + 10, name="plus", top_level=False)
    minus = mgr.cudagraphify(lambda y: y - 10, name="minus", top_level=False)

    def foo_opt(x):
        mgr.begin_invocation()
        y = double(x)
        return plus(y) if y.sum() > 0 else minus(y)

    def foo(x):
        y = x + x
        return y + 10 if y.sum() > 0 else y - 10

    inp = torch.zeros([4, 4], dtype=torch.float, device=device)
    torch.testing.assert_close(foo_opt(inp), foo(inp))
    torch.testing.assert_close(foo_opt(inp), foo(inp))

    inp.add_(1)
    out_eager = foo(inp)
    out_warmup = foo_opt(inp)
    torch.testing.assert_close(out_warmup, out_eager)
    # the warmup output is an allocator block of the pool
    assert live_blocks(mgr) == 1

    out_live = foo_opt(inp)
    torch.testing.assert_close(out_live, out_eager)
    # recording mode: the recording's output is the one live block; the warmup was freed
    assert live_blocks(mgr) == 1
    del out_warmup
    assert live_blocks(mgr) == 1
    del out_live
    assert live_blocks(mgr) == 0

    out = foo_opt(inp)
    torch.testing.assert_close(out, foo(inp))
    # execution mode: replay outputs are graph memory, not allocator blocks
    assert live_blocks(mgr) == 0
    assert mgr.live_output_count() == 1


def test_accumulate_multiple_recordings(make_manager, device):
    mgr = make_manager()
    triple = mgr.cudagraphify(lambda x: x + x + x, name="triple", top_level=False)
    times10 = mgr.cudagraphify(lambda y: y * 10, name="times10", top_level=False)

    def foo_opt(x):
        mgr.begin_invocation()
        y = triple(x)
        return y if y.sum() <= 0 else times10(y)

    def foo(x):
        y = x + x + x
        return y if y.sum() <= 0 else y * 10

    out1 = run_twice(foo_opt, torch.zeros([5], device=device))
    # out1 is invalidated (and its block freed) by the next generation
    out2 = run_twice(foo_opt, torch.zeros([6], device=device))
    assert live_blocks(mgr) == 1
    out3 = run_twice(foo_opt, torch.ones([5], device=device))
    torch.testing.assert_close(out3, foo(torch.ones([5], device=device)))
    assert live_blocks(mgr) == 1
    del out1, out2
    assert live_blocks(mgr) == 1
    del out3
    gc.collect()
    assert live_blocks(mgr) == 0


def test_live_outputs_multiple_graphs(make_manager, device):
    mgr = make_manager()
    first = mgr.cudagraphify(lambda x: (x + x + x, x + x + x + 1), name="first", top_level=False)
    square = mgr.cudagraphify(lambda x: x * x, name="square", top_level=False)
    inc = mgr.cudagraphify(lambda y: y + 1, name="inc", top_level=False)

    def foo_opt(x):
        mgr.begin_invocation()
        x, y = first(x)
        z = square(x)
        return inc(y) if z.sum() > 0 else y

    run_twice(foo_opt, torch.zeros([5], device=device))
    assert mgr.counters["checkpoints"] == 0
    out = run_twice(foo_opt, torch.ones([5], device=device))
    torch.testing.assert_close(out, torch.full([5], 5.0, device=device))
    assert live_blocks(mgr) == 1
    del out
    assert live_blocks(mgr) == 0
    # one checkpoint to warm up inc after replays, another to record it
    assert mgr.counters["checkpoints"] == 2


def test_tensor_dies_between_checkpoint(make_manager, device):
    mgr = make_manager(skip_warmup=True)
    # called directly, as the seed's cudagraphify_impl: no generations, paths end when outputs die
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
    # out2 died between the recording of foo and this one: freed after the checkpoint
    assert live_blocks(mgr) == 1
    del x
    assert live_blocks(mgr) == 0


def test_replay_follows_recorded_path_and_counts(make_manager, device):
    mgr = make_manager()
    f = mgr.cudagraphify(lambda x: x.sin() + 1, name="f")
    x = torch.randn(8, device=device)
    modes = []
    for _ in range(4):
        torch.testing.assert_close(f(x), x.sin() + 1)
        modes.append(mgr.last_execution.mode.value)
    assert modes == ["warmup", "recorded", "replayed", "replayed"]
    counters = mgr.counters
    assert (counters["warmups"], counters["recordings"], counters["replays"]) == (1, 1, 2)
    node = mgr.status()["nodes"][0]
    assert node["replays"] == 2 and node["mode"] == "replayed" and node["parent"] is None


def test_replay_uses_new_input_values(make_manager, device):
    mgr = make_manager(skip_warmup=True)
    f = mgr.cudagraphify(lambda x, y: x @ y + 1, name="mm")
    for _ in range(3):
        a, b = torch.randn(4, 4, device=device), torch.randn(4, 4, device=device)
        torch.testing.assert_close(f(a, b), a @ b + 1)


def test_expanded_inputs(make_manager, device):
    mgr = make_manager()
    x = torch.rand(1, 512, device=device).expand(4, 512)
    foo = mgr.cudagraphify(lambda x: x + 4 + torch.ones([4, 512], device=x.device), name="foo")
    for _ in range(3):
        torch.testing.assert_close(foo(x), x + 4 + 1)
    assert mgr.counters["recordings"] == 1


@pytest.mark.parametrize("expand", [((1, 512), (4, 512)), ((4, 1), (4, 512)), ((1, 3, 1), (2, 3, 5))])
def test_exact_layout_keeps_an_expanded_inputs_strides_for_code_that_checks_them(make_manager, device, expand):
    """Inductor's code asserts the strides it was compiled for; PyTorch's trees keep an
    expanded input's zero strides in its buffer, and so does ``exact_input_layout``."""
    base_shape, shape = expand
    recorded_strides = []

    def strict(x):  # what inductor's assert_size_stride does, then the computation
        assert x.stride() == expected, f"stride {x.stride()} != {expected}"
        recorded_strides.append(x.stride())
        return x * 2 + 1

    mgr = make_manager()
    expected = torch.rand(base_shape, device=device).expand(shape).stride()
    graphed = mgr.cudagraphify(strict, name="strict", exact_input_layout=True)
    for _ in range(4):  # new values each call: a replay must copy them in
        x = torch.rand(base_shape, device=device).expand(shape)
        torch.testing.assert_close(graphed(x), x * 2 + 1)
    assert (mgr.counters["recordings"], mgr.counters["replays"], mgr.counters["skipped_calls"]) == (1, 2, 0)
    assert set(recorded_strides) == {expected}


def test_an_exact_layout_replay_refuses_an_input_no_longer_expanded():
    from cgtree.backends.base import buffer_for_input, copy_into_buffer, expanded_dims

    expanded = torch.rand(1, 8).expand(4, 8)
    buffer = buffer_for_input(expanded, exact_layout=True)
    assert buffer.stride() == (0, 1) and buffer.untyped_storage().nbytes() == 8 * 4
    assert buffer_for_input(expanded).is_contiguous()  # the default layout: dense
    copy_into_buffer(buffer, expanded, expanded_dims(buffer))
    torch.testing.assert_close(buffer, expanded)
    with pytest.raises(ValueError, match="not expanded along dims"):
        copy_into_buffer(buffer, torch.rand(4, 8), expanded_dims(buffer))


def test_output_aliasing_an_input_is_a_view_of_the_callers_tensor(make_manager, device):
    mgr = make_manager()
    f = mgr.cudagraphify(lambda x: (x[1:], x * 2), name="alias")
    for _ in range(3):
        x = torch.randn(6, device=device)
        view, doubled = f(x)
        assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        torch.testing.assert_close(view, x[1:])
        torch.testing.assert_close(doubled, x * 2)


def test_nested_outputs_keep_their_structure(make_manager, device):
    mgr = make_manager()
    f = mgr.cudagraphify(lambda x: {"a": x + 1, "b": [x * 2, 3]}, name="nested")
    x = torch.randn(3, device=device)
    for _ in range(3):
        out = f(x)
        assert set(out) == {"a", "b"} and out["b"][1] == 3
        torch.testing.assert_close(out["b"][0], x * 2)
