"""The daemon's inductor policy (``cgtree.daemon.compiling``): which graphs run their ATen code."""

from __future__ import annotations

import operator
import types

import pytest
import torch

from cgtree.client import lowering
from cgtree.daemon.compiling import eager_reason
from cgtree.payload import InputSpec, decode_graph


def _decoded(module, *inputs):
    encoded = lowering.encode(lowering.lower(module, list(inputs)))
    return decode_graph(encoded.graph_bytes, allowed_namespaces=(), device=torch.device("cpu"))


class Scale(torch.nn.Module):
    def forward(self, x):
        return x * 2


class ReadsAValue(torch.nn.Module):
    def forward(self, x):
        return x + x.sum().item()


def test_a_static_graph_can_be_compiled():
    assert eager_reason(_decoded(Scale(), torch.randn(4, 4))) is None


def test_symbolic_shapes_and_graph_breaking_ops_keep_the_aten_code():
    decoded = _decoded(Scale(), torch.randn(4, 4))
    dynamic = types.SimpleNamespace(module=decoded.module, dynamic=False,
                                    input_specs=(InputSpec((None, 4), "float32", "cpu"),))
    assert eager_reason(dynamic) == "it has symbolic shapes"
    assert eager_reason(types.SimpleNamespace(module=decoded.module, dynamic=True, input_specs=decoded.input_specs)) \
        == "it has symbolic shapes"
    assert eager_reason(_decoded(ReadsAValue(), torch.randn(4))) == "it holds an op a CUDA graph cannot hold"



def test_a_graph_inductor_cannot_compile_keeps_its_aten_code(monkeypatch, caplog, tmp_path):
    import torch._inductor.compile_fx as inductor_compile_fx

    from cgtree.daemon.compiling import compile_in_process

    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(inductor_compile_fx, "compile_fx", refuse)
    decoded = _decoded(Scale(), torch.randn(4, 4))
    with caplog.at_level("WARNING", logger="cgtree.daemon.compiling"):
        fn = compile_in_process(decoded, [], torch.device("cpu"), "Scale")
    assert fn is decoded.module
    assert "inductor could not compile it (RuntimeError: no C++ compiler found)" in caplog.text


def test_auto_compiles_with_inductor_on_cuda_devices_only():
    from cgtree.daemon.compiling import resolve_compile_mode

    assert resolve_compile_mode("auto", torch.device("cuda:1")) == "inductor"
    assert resolve_compile_mode("auto", torch.device("cpu")) == "eager"
    assert resolve_compile_mode("eager", torch.device("cuda:0")) == "eager"
    assert resolve_compile_mode("inductor", torch.device("cpu")) == "inductor"


def test_artifact_names_tell_graph_device_and_torch_apart():
    from cgtree.daemon.compiling import artifact_name

    name = artifact_name("abc123" * 4, torch.device("cpu"))
    assert name.startswith("abc123abc123abc123abc123.cpu.") and name.endswith(".bin")
    assert artifact_name("f" * 24, torch.device("cpu")) != name


def test_the_artifact_directory_must_be_private(monkeypatch, tmp_path):
    """Artifacts are loaded as code: a directory others may write to is refused."""
    import os

    from cgtree.daemon.compiling import artifact_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    path = artifact_dir()
    assert path == tmp_path / "cgtree-graphs" and (path.stat().st_mode & 0o777) == 0o700
    os.chmod(path, 0o777)
    with pytest.raises(PermissionError, match="not private"):
        artifact_dir()


def test_a_compiled_artifact_loads_in_another_process_and_matches_aten(tmp_path, monkeypatch):
    """The worker's product: saved by compile_artifact, loaded by load_artifact in a fresh
    interpreter (as a restarted daemon does), computing what the ATen module computes."""
    import subprocess
    import sys
    import textwrap

    from cgtree.daemon.compiling import compile_artifact

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    decoded = _decoded(Scale(), torch.randn(4, 4))
    path = tmp_path / "scale.bin"
    assert compile_artifact(decoded, torch.device("cpu"), path) > 0
    assert path.exists() and not list(tmp_path.glob("*.partial"))
    script = textwrap.dedent(f"""
        import torch
        from cgtree.daemon.compiling import load_artifact
        fn = load_artifact({str(path)!r})
        x = torch.arange(16.0).reshape(4, 4)
        out = fn(x)
        assert isinstance(out, tuple) and len(out) == 1, out
        torch.testing.assert_close(out[0], x * 2)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_compiled_code_gets_contiguous_inputs_and_a_written_non_contiguous_input_runs_aten():
    """An artifact asserts the contiguous strides it was compiled for; a CUDA input arrives with
    its client's strides (``compiling.in_compiled_layout``)."""
    from cgtree.daemon.compiling import in_compiled_layout

    seen = []

    def compiled(weight, x, cache):  # what inductor's assert_size_stride checks, then the work
        assert x.is_contiguous() and cache.is_contiguous()
        seen.append("compiled")
        cache.add_(1)
        return (x @ weight,)

    def aten(weight, x, cache):
        seen.append("aten")
        cache.add_(1)
        return (x @ weight,)

    weight = torch.randn(8, 8)
    call = in_compiled_layout(compiled, aten, num_weights=1, in_place=[1])  # cache: user input 1, written
    x, cache = torch.randn(8, 8).t(), torch.zeros(4, 8)
    (out,) = call(weight, x, cache)
    torch.testing.assert_close(out, x @ weight)
    assert seen == ["compiled"] and torch.equal(cache, torch.ones(4, 8))  # written in the caller's tensor

    strided_cache = torch.zeros(8, 4).t()  # a written input that cannot be copied: its ATen code runs
    (out,) = call(weight, x, strided_cache)
    torch.testing.assert_close(out, x @ weight)
    assert seen == ["compiled", "aten"] and torch.equal(strided_cache, torch.ones(4, 8))


class CatOntoEmptyCache(torch.nn.Module):
    """HF bloom's first step in miniature: transposed keys appended to an empty cache, then
    folded into the batch. Eager's ``cat`` returns a contiguous tensor, so the lowering records a
    ``view``; inductor's ``cat`` of one non-empty tensor is a clone that keeps the transposition."""

    def forward(self, x):
        keys = x.transpose(1, 2)
        cache = torch.cat([x.new_zeros(2, 4, 0, 8), keys], dim=-2)
        return cache.reshape(8, 16, 8) * 2


def test_a_view_inductor_lays_out_differently_still_compiles_and_matches_aten(tmp_path, monkeypatch):
    """Without ``views_as_reshapes`` inductor refuses this graph ("Cannot view a tensor ...") and
    the daemon ran bloom as ATen code on every call (0.5x of its compiled speed on the H200)."""
    from cgtree.daemon.compiling import compile_artifact, load_artifact

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    x = torch.randn(2, 16, 4, 8)
    decoded = _decoded(CatOntoEmptyCache(), x)
    assert torch.ops.aten.view.default in {n.target for n in decoded.module.graph.nodes}  # what the lowering chose
    path = tmp_path / "cat.bin"
    compile_artifact(decoded, torch.device("cpu"), path)
    (out,) = load_artifact(path)(x)
    torch.testing.assert_close(out, decoded.module(x)[0])
    assert torch.ops.aten.view.default in {n.target for n in decoded.module.graph.nodes}  # the ATen code is untouched


def test_only_views_no_in_place_write_reaches_become_reshapes():
    """A view of memory that ``copy_`` writes (directly, through another view of the same
    tensor, or through an item of ``split``) keeps its aliasing; every other strict view may copy."""
    from cgtree.daemon.compiling import views_as_reshapes

    aten = torch.ops.aten
    graph = torch.fx.Graph()
    cache, new, halved, other = (graph.placeholder(name) for name in ("cache", "new", "halved", "other"))
    window = graph.call_function(aten.view.default, (cache, [4, 4]))
    reader = graph.call_function(aten.view.default, (cache, [16]))  # no write through it, but its memory is written
    graph.call_function(aten.copy_.default, (window, new))
    halves = graph.call_function(aten.split.Tensor, (halved, 8))
    first_half = graph.call_function(operator.getitem, (halves, 0))
    graph.call_function(aten.copy_.default, (first_half, graph.call_function(aten.slice.Tensor, (reader, 0, 0, 8))))
    halved_reader = graph.call_function(aten._unsafe_view.default, (halved, [4, 4]))
    free = graph.call_function(aten._unsafe_view.default, (other, [16]))
    graph.output((reader, halved_reader, free))
    module = torch.fx.GraphModule(torch.nn.Module(), graph)

    rewritten = views_as_reshapes(module)
    targets = {node.name: node.target for node in rewritten.graph.nodes}
    assert targets[window.name] is aten.view.default and targets[reader.name] is aten.view.default
    assert targets[halved_reader.name] is aten._unsafe_view.default
    assert targets[free.name] is aten.reshape.default
    assert free.target is aten._unsafe_view.default  # the module given is not changed
    cache_value, halved_value = torch.zeros(16), torch.zeros(16)
    read, halved_read, _ = rewritten(cache_value, torch.ones(4, 4), halved_value, torch.arange(16.0).reshape(4, 4))
    assert read.data_ptr() == cache_value.data_ptr() and bool((read == 1).all())
    assert halved_read.data_ptr() == halved_value.data_ptr() and halved_value[:8].eq(1).all() and halved_value[8:].eq(0).all()
