#!/usr/bin/env python3
"""What the per-replay address check of in-place inputs costs (``cgtree.in_place_inputs``).

Every replay checks that each input a recording reads in place (weights, KV caches) is still
at its recorded address. ``InPlaceInputs.first_moved`` does it with PyTorch's C++ check
(``torch._C._tensors_data_ptrs_at_indices_equal``, CUDA builds, from ``BATCHED_FROM`` inputs)
or a Python loop. Which is faster was never measured: the C++ function converts every list
item through pybind11 (a type check, a tensor handle, an int), and a ``Parameter`` is a Python
subclass, whose type check is the slower one.

Rows: N inputs x kind (plain tensors, ``nn.Parameter``) x method (``loop``, ``batched``, and
``first_moved`` as the code chooses), microseconds per check (median of ``--repeats`` timings
of ``--iters`` checks each).

    python3 benchmarks/in_place_check.py [--device cuda] [--json results/in_place_check.json]

Prints a table and writes JSON (smoke test: tests/test_in_place_check_smoke.py). Without the
C++ function (CPU wheels) the ``batched`` rows say n/a.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.append(str(REPO_ROOT))

SIZES = (16, 64, 256, 512)
KINDS = ("tensor", "parameter")


def _inputs(n: int, kind: str, device: str) -> list:
    import torch

    tensors = [torch.zeros(4, device=device) for _ in range(n)]
    if kind == "parameter":
        tensors = [torch.nn.Parameter(t, requires_grad=False) for t in tensors]
    return tensors + [torch.zeros(4, device=device)]  # one copied input after the weights


def _per_check_us(check: Callable[[], Any], iters: int, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(iters):
            check()
        timings.append((time.perf_counter() - began) / iters * 1e6)
    return statistics.median(timings)


def _checks(checked: Any, inputs: tuple, batched: Optional[Callable]) -> dict[str, Optional[Callable]]:
    """The three ways to check ``inputs`` against ``checked`` (an InPlaceInputs), as callables."""
    pairs = checked.pairs

    def loop() -> Optional[int]:
        for position, pointer in pairs:
            if inputs[position].data_ptr() != pointer:
                return position
        return None

    def batched_check() -> bool:
        return batched(list(inputs), checked._pointer_at, checked._positions)

    return {"loop": loop, "batched": batched_check if batched else None,
            "first_moved": lambda: checked.first_moved(inputs)}


def measure(device: str, sizes: tuple = SIZES, iters: int = 2000, repeats: int = 5) -> list[dict]:
    from cgtree import in_place_inputs
    from cgtree.in_place_inputs import InPlaceInputs

    batched: Optional[Callable] = in_place_inputs._ALL_AT_ADDRESSES
    rows = []
    for n in sizes:
        for kind in KINDS:
            inputs = tuple(_inputs(n, kind, device))
            checked = InPlaceInputs([(i, inputs[i].data_ptr()) for i in range(n)])
            for method, check in _checks(checked, inputs, batched).items():
                us = None if check is None else round(_per_check_us(check, iters, repeats), 3)
                rows.append({"inputs": n, "kind": kind, "method": method, "us": us,
                             "ns_per_input": None if us is None else round(us * 1000 / n, 1)})
    return rows


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "in_place_check.json")
    args = parser.parse_args(argv)
    import torch

    from cgtree import in_place_inputs

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("in_place_check: no CUDA here; measuring on the CPU", file=sys.stderr)
        device = "cpu"
    rows = measure(device, tuple(int(s) for s in args.sizes.split(",")), args.iters, args.repeats)
    print(f"in-place address check, {device}, torch {torch.__version__}, "
          f"C++ check {'present' if in_place_inputs._ALL_AT_ADDRESSES else 'absent'}, "
          f"batched from {in_place_inputs.BATCHED_FROM} inputs")
    print(f"{'inputs':>7} {'kind':>10} {'method':>12} {'us/check':>10} {'ns/input':>9}")
    for row in rows:
        us = "n/a" if row["us"] is None else f"{row['us']:.2f}"
        per = "n/a" if row["ns_per_input"] is None else f"{row['ns_per_input']:.0f}"
        print(f"{row['inputs']:>7} {row['kind']:>10} {row['method']:>12} {us:>10} {per:>9}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                     "batched_available": in_place_inputs._ALL_AT_ADDRESSES is not None,
                                     "batched_from": in_place_inputs.BATCHED_FROM, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
