"""A model lowered once and saved (``cgtree.payload.save_encoded``) is registered by a later
client process straight from the file: no lowering there, same graph id, correct results."""

from __future__ import annotations

import json

import torch

from cgtree.client import Client
from cgtree.client.lowering import encode, lower
from cgtree.payload import save_encoded

LATER_PROCESS = """
import json, sys, time
import torch
from cgtree.client import Client
from cgtree.payload import load_encoded
start = time.perf_counter()
encoded = load_encoded(sys.argv[2])
with Client(sys.argv[1], timeout_s=30) as client:
    handle = client.register(encoded)
    (out,) = client.submit(handle, [torch.ones(2, 8)])
print(json.dumps({"graph": handle.graph_id, "out": out.tolist(), "ms": (time.perf_counter() - start) * 1000}))
"""


def test_a_later_process_registers_from_the_saved_file_without_lowering(cgtreed, client_scripts, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU()).eval()
    encoded = encode(lower(model, [torch.randn(2, 8)]))
    path = tmp_path / "model.cgtree"
    save_encoded(encoded, path)
    with Client(cgtreed.endpoint, timeout_s=30) as client:
        client.submit(client.register(encoded), [torch.ones(2, 8)])

    result = client_scripts.run(LATER_PROCESS, cgtreed.endpoint, str(path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["graph"] == encoded.graph_id
    with torch.no_grad():
        expected = model(torch.ones(2, 8))
    torch.testing.assert_close(torch.tensor(report["out"]), expected)
