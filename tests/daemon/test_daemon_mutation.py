"""A graph that writes its input, through a real cgtreed (CPU backend): the write reaches the
client's tensor, as it would in the client's own process (``written_inputs``)."""

from __future__ import annotations

import torch

from cgtree.client import Client
from cgtree.daemon.commands.submit import mutation_plan


class Accumulate(torch.nn.Module):
    def forward(self, total: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        total.add_(x)
        return total * 2


def test_a_cpu_input_the_graph_writes_is_written_back_to_the_client(cgtreed):
    model = Accumulate()
    total = torch.zeros(3)
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        handle = client.register(model, [total.clone(), torch.ones(3)])
        assert handle.mutated_inputs == (0,)
        for step in range(1, 5):
            (out,) = client.submit(handle, [total, torch.ones(3)])
            torch.testing.assert_close(total, torch.full((3,), float(step)))
            torch.testing.assert_close(out, 2 * total)


def test_mutation_plan_writes_where_the_client_sees_it():
    kinds = ["cuda", "cpu", "output", "scalar", "cuda"]
    assert mutation_plan((0, 1, 2), kinds) == ((0, 2), (1,))
    assert mutation_plan((), kinds) == ((), ())
    assert mutation_plan((4, 9), kinds) == ((4,), ())  # an index past the inputs is ignored
