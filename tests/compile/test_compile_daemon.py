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
