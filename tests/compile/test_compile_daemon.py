"""``backend=cgtree.client.compile_backend.backend(client)``: graphs run in a real cgtreed (CPU)."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("zmq")

from cgtree.client import Client  # noqa: E402
from cgtree.client.compile_backend import backend  # noqa: E402


class CachedStep(torch.nn.Module):
    """A decoder-like step: a weight, and a cache buffer written in place at a position."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("cache", torch.zeros(6, 8))

    def forward(self, x, pos):
        self.cache.index_copy_(0, pos, self.proj(x)[:1])
        return self.proj(x) + self.cache.sum(0)


@pytest.fixture
def client(cgtreed):
    with Client(cgtreed.endpoint, timeout_s=30) as c:
        yield c


def twins():
    torch.manual_seed(0)
    model, reference = CachedStep().eval(), CachedStep().eval()
    reference.load_state_dict(model.state_dict())
    return model, reference


def test_inference_through_the_daemon_matches_eager(client):
    model, reference = twins()
    compiled = torch.compile(model, backend=backend(client))
    modes = []
    with torch.no_grad():
        for step in range(4):
            x, pos = torch.randn(2, 8), torch.tensor([step])
            torch.testing.assert_close(compiled(x, pos), reference(x, pos))
            # the cache is written back into the caller's buffer after each call
            torch.testing.assert_close(model.cache, reference.cache)
            modes.append(client.last_execution["mode"])
    assert modes == ["warmup", "recorded", "replayed", "replayed"]
    session = client.status(session_only=True)
    assert "cpu" in str(session)


def test_weights_changed_in_place_are_registered_again(client, caplog):
    caplog.set_level(logging.INFO, logger="cgtree.client.compile")
    model, reference = twins()
    compiled = torch.compile(model, backend=backend(client))
    x, pos = torch.randn(2, 8), torch.tensor([0])
    with torch.no_grad():
        for _ in range(3):
            compiled(x, pos), reference(x, pos)
        for net in (model, reference):
            net.proj.weight.mul_(2)
        torch.testing.assert_close(compiled(x, pos), reference(x, pos))
    registrations = [r for r in caplog.records if "registered with cgtreed" in r.getMessage()]
    assert len(registrations) == 2


def test_training_graphs_run_in_process(client, caplog):
    caplog.set_level(logging.WARNING, logger="cgtree.client.compile")
    lin = torch.nn.Linear(4, 4)
    compiled = torch.compile(lin, backend=backend(client))
    x = torch.randn(3, 4)
    compiled(x).sum().backward()
    expected = x.sum(0, keepdim=True).expand(4, 4)
    torch.testing.assert_close(lin.weight.grad, expected)
    assert any("training (forward) graph" in r.getMessage() for r in caplog.records)


def test_graph_breaks_give_one_daemon_graph_each(client):
    def fn(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos() + 1

    compiled = torch.compile(fn, backend=backend(client))
    x = torch.randn(5)
    for _ in range(3):
        torch.testing.assert_close(compiled(x), fn(x))
    assert client.last_execution["mode"] == "replayed"


def test_mutations_into_graph_writes_the_inputs_and_drops_their_outputs():
    """The CUDA daemon path moves AOT's copy-back of mutated inputs into the graph: the rewritten
    graph writes the inputs itself and returns only the user's outputs (checked on CPU here)."""
    from torch._dynamo.backends.common import aot_autograd

    from cgtree.client.compile_backend import _aot_metadata, mutations_into_graph

    seen = {}

    def inference(gm, example_inputs):
        static, mutated, leading = _aot_metadata()
        seen.update(gm=gm, mutated=mutated, leading=leading)

        def run(*args):
            seen["args"] = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            return gm(*args)

        return run

    model, reference = twins()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=inference, inference_compiler=inference,
                                                         keep_inference_input_mutations=False))
    x, pos = torch.randn(2, 8), torch.tensor([1])
    with torch.no_grad():
        compiled(x, pos)
    assert seen["leading"] == sorted(seen["mutated"]) and len(seen["leading"]) == 1
    (cache_position,) = seen["leading"]
    rewritten = mutations_into_graph(seen["gm"], seen["leading"])
    args = seen["args"]  # what AOT passed: weights, the cache (as it was before the call), x, pos
    functional = seen["gm"](*[a.clone() for a in args])
    with torch.no_grad():
        written = rewritten(*args)
    assert len(written) == len(functional) - 1  # the cache's new value is no longer an output
    torch.testing.assert_close(args[cache_position], functional[0])  # ... it was written in place
    torch.testing.assert_close(written[0], functional[1])
    copies = [n for n in rewritten.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert len(copies) == 1 and copies[0].args[0].op == "placeholder"


@torch.library.custom_op("cgtreetest::scaled", mutates_args=())
def _scaled(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@_scaled.register_fake
def _scaled_fake(x):
    return torch.empty_like(x)


def test_a_graph_the_daemon_refuses_runs_here_counted_with_its_reason(client):
    """An operator of a namespace cgtreed does not allow (a library's custom op, as
    transformers' MoE ``grouped_mm_fallback``): the graph runs in this process, and
    client.status() says which and why."""

    def f(x):
        return torch.ops.cgtreetest.scaled(x) + 1

    compiled = torch.compile(f, backend=backend(client))
    x = torch.randn(4)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), x * 3 + 1)
    stats = client.status()["compile_backend"]
    assert stats["graphs_in_client"] == 1
    assert "refused by cgtreed" in stats["in_client"][0]["reason"] and "cgtreetest" in stats["in_client"][0]["reason"]


class Plain(torch.nn.Module):
    """Writes none of its inputs: its weight check may run while the daemon works."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.proj(x))


def _count_calls(monkeypatch, client, name: str) -> list:
    calls = []
    original = getattr(client, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(client, name, counted)
    return calls


def test_a_graph_that_writes_no_input_checks_its_weights_during_the_submit_and_reruns_on_a_change(client, monkeypatch,
                                                                                                   caplog):
    caplog.set_level(logging.INFO, logger="cgtree.client.compile")
    torch.manual_seed(0)
    model, reference = Plain().eval(), Plain().eval()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend=backend(client))
    observed = _count_calls(monkeypatch, client, "submit_observing")
    x = torch.randn(2, 8)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), reference(x))
        assert observed, "a registered non-writing graph submits with the weight check as its observation"
        before = len(observed)
        for net in (model, reference):
            net.proj.weight.mul_(-1)  # relu of the old weights' outputs would differ
        torch.testing.assert_close(compiled(x), reference(x))
        assert len(observed) == before + 1
        torch.testing.assert_close(compiled(x), reference(x))
    registrations = [r for r in caplog.records if "registered with cgtreed" in r.getMessage()]
    assert len(registrations) == 2
    assert client.last_execution["mode"] in ("warmup", "recorded", "replayed")


def test_a_graph_that_writes_its_inputs_checks_its_weights_before_the_submit(client, monkeypatch):
    model, reference = twins()
    compiled = torch.compile(model, backend=backend(client))
    observed = _count_calls(monkeypatch, client, "submit_observing")
    x, pos = torch.randn(2, 8), torch.tensor([0])
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x, pos), reference(x, pos))
    assert observed == [], "a cache written with stale weights would outlive the rerun"
