"""The first-run inspection (cgtree.inspection) never imports torch._dynamo: a fresh cgtreed's
first warmup used to pay that import (over a second on CPU, blocking every client behind it
after a restart). Once dynamo is imported by someone else, the inspection runs under
``torch._dynamo.disable`` as PyTorch would have it, with the same findings."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from cgtree import inspection
from cgtree.manager import TreeManager

SCRIPT = textwrap.dedent("""
    import sys, torch
    from cgtree.manager import TreeManager
    mgr = TreeManager("cpu")
    def adds(x):
        x.add_(1)
        return (x * 2,)
    def plain(x):
        return (torch.nn.functional.gelu(x) * 2,)
    f, g = mgr.cudagraphify(adds, [torch.randn(3)]), mgr.cudagraphify(plain, [torch.randn(3)])
    for _ in range(3):
        f(torch.randn(3)); mutated = mgr.last_execution
        g(torch.randn(3)); graphed = mgr.last_execution
    print(mutated.skip_reason, "|", graphed.mode.value, "|", "torch._dynamo" in sys.modules)
""")


def test_a_fresh_process_inspects_without_importing_dynamo():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    skip_reason, mode, dynamo_loaded = result.stdout.strip().split(" | ")
    assert skip_reason.startswith("mutated inputs") and mode == "replayed"
    assert dynamo_loaded == "False"


def test_with_dynamo_imported_the_inspection_runs_outside_it_with_the_same_findings():
    import torch._dynamo  # noqa: F401 - what torch.compile in the same process does

    mgr = TreeManager("cpu")

    def adds(x):
        x.add_(1)
        return (x * 2,)

    f = mgr.cudagraphify(adds, [torch.randn(3)])
    f(torch.randn(3))
    assert mgr.last_execution.skip_reason.startswith("mutated inputs")
    assert inspection._INSPECT_WITHOUT_DYNAMO is not None
