"""Real model definitions (transformers; timm and torchvision where installed) under cgtree's
trees, in-process (backend="cgtree") and through a real cgtreed: values equal eager's, and every
call after warmup replays, read from the counters (a fallback would match eager too).

On a machine without CUDA both paths run the CPU replay backend, whose skip decisions are the
tree's own: a model that skips here skips on CUDA. ``-m gpu`` runs the same checks on CUDA."""

from __future__ import annotations

import pytest
import torch

from model_helpers import case_or_skip, grew, in_process_counters, session_counters, zoo

pytest.importorskip("transformers")

INFERENCE = [c.name for c in zoo.cases(families=["hf-causal-lm", "hf-encoder", "hf-vision", "timm", "torchvision",
                                                   "hf-breadth"])]
# Through the daemon: every inference case (each costs a lowering and a registration, 1-3 s on
# CPU); the inductor trace of its graphs is checked there too.
THROUGH_DAEMON = INFERENCE
WARMUP_CALLS, CHECKED_CALLS = 2, 2
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _devices():
    yield pytest.param("cpu", id="cpu")
    yield pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])


DEVICES = list(_devices())


@pytest.fixture(autouse=True)
def strict_fp32():
    """float32 is float32 in these comparisons: cuDNN convolutions default to TF32, and an
    inductor-compiled graph may pick another convolution algorithm than eager (channels-last),
    which alone moved HF ViT's patch-embedding outputs by ~1e-3 on the H200."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run_steps(built, call, steps, reference):
    for step in steps:
        inputs, kwargs = built.inputs(step), built.kwargs(step)
        torch.testing.assert_close(built.output(call(*inputs, **kwargs)), built.output(reference(*inputs, **kwargs)),
                                   **TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", INFERENCE)
def test_in_process_every_call_after_warmup_replays(name, device):
    built = case_or_skip(name).build(torch.device(device))
    compiled = torch.compile(built.module, backend="cgtree")
    with torch.no_grad():
        _run_steps(built, compiled, range(WARMUP_CALLS), built.module)
        before = in_process_counters()
        _run_steps(built, compiled, range(WARMUP_CALLS, WARMUP_CALLS + CHECKED_CALLS), built.module)
    after = in_process_counters()
    assert after.get("skipped_calls", 0) == 0, after
    assert grew(after, before, "replays") >= CHECKED_CALLS
    assert grew(after, before, "recordings") == 0 and grew(after, before, "warmups") == 0


@pytest.fixture(scope="module")
def daemon_client(cgtreed):
    from cgtree.client import Client

    with Client(cgtreed.endpoint, timeout_s=60) as client:
        yield client


def _check_through_daemon(name: str, device: str, client, monkeypatch) -> None:
    """Values equal eager's; no graph stays in the client; every call after warmup replays; every
    graph registered survives inductor's tracing (the CPU daemon runs ATen code, so this is where
    CI sees what a CUDA daemon's compile worker will meet), and on CUDA runs inductor's kernels."""
    from cgtree.client import backend

    registered = []
    register = client.register
    monkeypatch.setattr(client, "register", lambda graph, *args, **kwargs: registered.append(graph) or register(
        graph, *args, **kwargs))
    built = case_or_skip(name).build(torch.device(device))
    compiled = torch.compile(built.module, backend=backend(client))
    with torch.no_grad():
        _run_steps(built, compiled, range(WARMUP_CALLS), built.module)
        before = session_counters(client)
        _run_steps(built, compiled, range(WARMUP_CALLS, WARMUP_CALLS + CHECKED_CALLS), built.module)
    after = session_counters(client)
    assert client.status()["compile_backend"]["graphs_in_client"] == 0
    assert grew(after, before, "skipped_calls") == 0, after
    assert grew(after, before, "replays") >= CHECKED_CALLS
    assert grew(after, before, "recordings") == 0
    assert registered
    for encoded in registered:
        traces_under_inductor_decompositions(encoded)
    if device == "cuda":
        ids = {encoded.graph_id for encoded in registered}
        kernels = {graph["graph"]: (graph["kernels"], graph["kernels_note"])
                   for row in client.status()["devices"] for graph in row["registered"] if graph["graph"] in ids}
        assert set(kernels) == ids and all(kind == "inductor" for kind, _ in kernels.values()), kernels


def traces_under_inductor_decompositions(encoded) -> None:
    """The first thing the daemon's inductor compile does to a decoded graph (its fake trace
    with inductor's decompositions), here without C++ or CUDA: HF bloom's graph failed it (a
    view of a layout inductor's ``cat`` lays out otherwise) and ran its ATen code every call."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    from cgtree.daemon.compiling import example_inputs, views_as_reshapes
    from cgtree.payload import decode_graph

    decoded = decode_graph(encoded.graph_bytes, device=torch.device("cpu"))
    make_fx(views_as_reshapes(decoded.module), decomposition_table=select_decomp_table(),
            tracing_mode="fake")(*example_inputs(decoded, torch.device("cpu")))


@pytest.mark.parametrize("name", THROUGH_DAEMON)
def test_through_cgtreed_every_call_after_warmup_replays(name, daemon_client, monkeypatch):
    _check_through_daemon(name, "cpu", daemon_client, monkeypatch)


def _generate(built, module, step):
    return module.generate(*built.inputs(step), **built.kwargs(step))


@pytest.mark.parametrize("device", DEVICES)
def test_static_cache_generate_replays_every_decode_step_in_process(device):
    """HF's recipe: ``model.forward = torch.compile(model.forward)`` with
    ``cache_implementation="static"``: the cache is created inside the first compiled forward,
    written in place by every decode step, and must outlive the prefill's generation."""
    built = case_or_skip("llama-generate").build(torch.device(device))
    reference = [_generate(built, built.module, step) for step in range(3)]
    built.module.forward = torch.compile(built.module.forward, backend="cgtree")
    with torch.no_grad():
        assert torch.equal(_generate(built, built.module, 0), reference[0])  # warmup and recordings
        before = in_process_counters()
        for step in (1, 2):
            assert torch.equal(_generate(built, built.module, step), reference[step])
    after = in_process_counters()
    new_tokens = built.kwargs(0)["max_new_tokens"]
    assert after["skipped_calls"] == 0 and after["overwritten_outputs"] == 0, after
    # every decode step but the first of a generate call replays (that one meets a new cache)
    assert grew(after, before, "replays") >= 2 * (new_tokens - 2)


def test_static_cache_generate_through_cgtreed(daemon_client):
    """The prefill has int inputs (its sizes): it reaches the daemon too, as one registration
    per concrete size; decode steps write the cache in place and replay."""
    from cgtree.client import backend

    built = case_or_skip("llama-generate").build(torch.device("cpu"))
    reference = [_generate(built, built.module, step) for step in range(2)]
    built.module.forward = torch.compile(built.module.forward, backend=backend(daemon_client))
    with torch.no_grad():
        assert torch.equal(_generate(built, built.module, 0), reference[0])
        before = session_counters(daemon_client)
        assert torch.equal(_generate(built, built.module, 1), reference[1])
    after = session_counters(daemon_client)
    compile_stats = daemon_client.status()["compile_backend"]
    assert compile_stats["graphs_in_client"] == 0, compile_stats
    assert grew(after, before, "skipped_calls") == 0
    assert grew(after, before, "replays") >= built.kwargs(0)["max_new_tokens"] - 2


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_graphs_forward_and_backward(device):
    """Loss + backward + SGD through backend="cgtree": both graphs replay, losses equal eager's
    (on CUDA the backward takes SDPA's 0-dim CPU seed and offset, which go to the device)."""
    case = case_or_skip("llama-train")
    built, twin = case.build(torch.device(device)), case.build(torch.device(device))
    compiled = torch.compile(built.module, backend="cgtree")
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-2) for m in (built.module, twin.module)]

    def step(module, call, optimizer, index):
        loss = built.output(call(*built.inputs(index), **built.kwargs(index)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    for index in range(4):
        if index == 2:
            before = in_process_counters()
        torch.testing.assert_close(step(built.module, compiled, optimizers[0], index),
                                   step(twin.module, twin.module, optimizers[1], index), **TOLERANCE)
    after = in_process_counters()
    assert after["skipped_calls"] == 0, after
    assert grew(after, before, "replays") >= 4  # a forward and a backward per step


@pytest.fixture(scope="module")
def gpu_daemon_client(cgtreed_gpu):
    from cgtree.client import Client

    with Client(cgtreed_gpu.endpoint, timeout_s=120) as client:
        yield client


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "bloom"])
def test_through_cgtreed_on_cuda_every_call_after_warmup_replays(name, gpu_daemon_client, monkeypatch):
    _check_through_daemon(name, "cuda", gpu_daemon_client, monkeypatch)


def _aot_inference_graph(module, *args, **kwargs):
    """The AOT inference graph dynamo + AOT make of ``module`` (what the compile backends lower)."""
    from torch._dynamo.backends.common import aot_autograd

    captured = []

    def keep(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(module, backend=aot_autograd(fw_compiler=keep, inference_compiler=keep))(*args, **kwargs)
    return captured[0]


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_lowering_an_aot_attention_graph_does_not_depend_on_kernel_strides(name):
    """The CPU flash-attention kernel lays its output out as [B, T, H, D]; its decomposition
    does not, and retracing an AOT graph through it failed at the next view."""
    from cgtree.client import lowering

    built = case_or_skip(name).build(torch.device("cpu"))
    gm, example_inputs = _aot_inference_graph(built.module, *built.inputs(0), **built.kwargs(0))
    lowered = lowering.lower(gm, example_inputs, tracing_mode="fake")
    # AOT hands its compiler fake examples: real ones of the same shapes (zero ids, ones masks)
    real = [torch.randn(x.shape, dtype=x.dtype) if x.is_floating_point() else torch.ones(x.shape, dtype=x.dtype)
            if x.dtype == torch.bool else torch.zeros(x.shape, dtype=x.dtype) for x in example_inputs]
    with torch.no_grad():
        torch.testing.assert_close(lowered(*real), tuple(gm(*real)), **TOLERANCE)


def test_client_submit_of_an_hf_module_replays(daemon_client):
    built = case_or_skip("gpt2").build(torch.device("cpu"))

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return self.model(ids, attention_mask=mask).logits

    module = Logits(built.module)
    modes = []
    with torch.no_grad():
        for step in range(4):
            ids, mask = built.inputs(step)[0], built.kwargs(step)["attention_mask"]
            torch.testing.assert_close(daemon_client.submit(module, [ids, mask])[0], module(ids, mask), **TOLERANCE)
            modes.append(daemon_client.last_execution["mode"])
    assert modes[2:] == ["replayed", "replayed"]


def _tiny_mixtral(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mixtral", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2, max_position_embeddings=128, vocab_size=512,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().to(dtype)


def test_a_bfloat16_mixture_of_experts_lm_goes_through_cgtreed_and_replays(daemon_client):
    """A mixture-of-experts LM (transformers' Mixtral: top-2 routing over 4 experts, grouped
    matmuls) in bfloat16, as such models are run: under torch.compile its experts are aten's
    grouped matmul, so the graph goes to the daemon and every call after warmup replays there.
    (In float32 transformers calls its own custom op, ``transformers::grouped_mm_fallback``, a
    host-synchronizing loop over experts that the daemon refuses by namespace: that graph stays
    in the client, as its log says.)"""
    from cgtree.client import backend

    module = _tiny_mixtral(torch.bfloat16)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    compiled = torch.compile(module, backend=backend(daemon_client))
    with torch.no_grad():
        for _ in range(2):
            compiled(ids, attention_mask=mask)
        before = session_counters(daemon_client)
        for _ in range(2):
            got = compiled(ids, attention_mask=mask).logits
        after = session_counters(daemon_client)
        expected = module(ids, attention_mask=mask).logits
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert daemon_client.status()["compile_backend"]["graphs_in_client"] == 0
    assert grew(after, before, "replays") >= 2 and grew(after, before, "skipped_calls") == 0, after
