"""Client processes with ``CGTREE_GRAPH_CACHE`` set: the first one lowers its nn.Module and
writes the cache entry, a later one registers the same graph from the entry (no lowering) and
gets the same results through a real cgtreed."""

from __future__ import annotations

import json
from pathlib import Path

from cgtree.client.graph_cache import ENV_VAR

MODEL = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("shift", torch.linspace(0, 1, 4))

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(x)) + self.shift
"""

CLIENT = """
import json, sys
import torch
from cgtree.client import Client, graph_cache
from cachemodel import Model

torch.manual_seed(int(sys.argv[2]))
model = Model().eval()
x = torch.ones(2, 8)
with Client(sys.argv[1], timeout_s=30) as client:
    (out,) = client.submit(model, [x])
    record = graph_cache.last_lowering()
    graph = client.register(model, [x]).graph_id
with torch.no_grad():
    expected = model(x)
print(json.dumps({"cache": record.cache, "route": record.route, "graph": graph,
                  "max_err": (out - expected).abs().max().item()}))
"""


def _run(client_scripts, endpoint: str, seed: int) -> dict:
    result = client_scripts.run(CLIENT, endpoint, str(seed), timeout_s=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_later_client_process_registers_from_the_graph_cache(cgtreed, client_scripts, tmp_path, monkeypatch):
    Path(client_scripts.workdir, "cachemodel.py").write_text(MODEL)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "graphs"))

    first = _run(client_scripts, cgtreed.endpoint, seed=0)
    assert (first["cache"], first["route"]) == ("miss", "make_fx")
    second = _run(client_scripts, cgtreed.endpoint, seed=0)
    assert second["cache"] == "hit" and second["graph"] == first["graph"]
    # Other weights, same structure: still a hit, bound to this process's weights.
    retrained = _run(client_scripts, cgtreed.endpoint, seed=1)
    assert retrained["cache"] == "hit" and retrained["graph"] != first["graph"]
    for report in (first, second, retrained):
        assert report["max_err"] < 1e-5, report


def test_client_graph_cache_argument_picks_the_directory(cgtreed, tmp_path):
    """``Client(graph_cache=dir)``: the second client (a new Client, same process) registers
    the module from the cache; ``graph_cache=False`` lowers again."""
    import torch

    from cgtree.client import Client
    from cgtree.client import graph_cache as cache_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU()).eval()
    x = torch.randn(3, 6)
    outcomes = []
    for setting in (tmp_path / "cache", tmp_path / "cache", False):
        with Client(cgtreed.endpoint, timeout_s=30, graph_cache=setting) as client:
            out = client.submit(model, [x])[0]
            outcomes.append(cache_module.last_lowering().cache)
            with torch.no_grad():
                torch.testing.assert_close(out, model(x))
    assert outcomes[1] == "hit" and outcomes[2] == "off", outcomes
