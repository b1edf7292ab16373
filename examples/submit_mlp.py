"""Send a small model to a running cgtreed and replay it: the client side of cgtree.

    cgtreed --config config.toml &          # in one terminal (or under systemd)
    python examples/submit_mlp.py            # in another; CGTREE_ENDPOINT picks the daemon

Each submit reply says what the daemon did (warmup, recorded, replayed); outputs are checked
against eager, and the daemon's tree state is printed at the end.
"""

from __future__ import annotations

import argparse

import torch

from cgtree.client import Client


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default=None, help="daemon endpoint (default: CGTREE_ENDPOINT or the config default)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).to(args.device).eval()
    with Client(args.endpoint) as client, torch.no_grad():
        handle = client.register(model, [torch.randn(16, 64, device=args.device)])
        for call in range(args.calls):
            x = torch.randn(16, 64, device=args.device)
            (out,) = client.submit(handle, [x])
            torch.testing.assert_close(out, model(x))
            print(f"call {call}: {client.last_execution}  (matches eager)")
        status = client.status(session_only=True)
        print(status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
