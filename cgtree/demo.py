"""In-process demo: one small model through cgtree's tree manager, and the tree it builds.

    python -m cgtree.demo [--device cuda:0|cpu] [--calls 5]

Runs a 2-layer MLP several times (warmup, record, replays), checks every result against
eager, then a second input shape (a second root), and prints what happened per call and the
manager's status. On a machine without CUDA it runs the CPU replay backend and says so.
"""

from __future__ import annotations

import argparse
import json

import torch

from cgtree.manager import TreeManager


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cgtree.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).to(args.device)
    params = [p.detach() for p in model.parameters()]

    def forward(w1, b1, w2, b2, x):
        hidden = torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1))
        return torch.nn.functional.linear(hidden, w2, b2)

    with TreeManager(args.device) as mgr:
        print(f"cgtree tree manager on {mgr.device}: backend {mgr.backend_name}")
        graphed = mgr.cudagraphify(forward, [*params, torch.randn(16, 64)], static_input_idxs=(0, 1, 2, 3))
        with torch.no_grad():
            for batch in (16, 8):
                for call in range(args.calls):
                    x = torch.randn(batch, 64, device=args.device)
                    out = graphed(*params, x)
                    torch.testing.assert_close(out, model(x))
                    run = mgr.last_execution
                    print(f"  batch {batch:2d} call {call}: {run.mode.value:8s} node {run.node_id}  (matches eager)")
        status = mgr.status()
        print("root children:", status["root_children"])
        print("counters:", json.dumps(status["counters"]))
        print("pool:", json.dumps(status["pool"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
