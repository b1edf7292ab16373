"""``daemon.compile = "inductor"``: a decoded graph compiled by inductor once, when it is
registered, into a callable the tree manager records like any other.

Why at registration and not lazily (``torch.compile``): the tree manager's first call of a
function runs under its inspection mode (a ``TorchDispatchMode``, ``cgtree.inspection``), and
dynamo does not compile under an active dispatch mode: a lazily compiled graph ran, and was
recorded, as plain ATen kernels. On the H200 host the GPT decoder step of bench_compile was
recorded with 122 ATen kernels (520 us of GPU time a step) instead of inductor's 78 (400 us)
(docs/PERFORMANCE.md section 8).

Policy (``eager_reason``, pure): a graph runs its ATen code instead when it has symbolic shapes
(a compile per shape is inductor's business under dynamo; the daemon does not guess the
ranges) or holds an op a graph cannot hold (inductor's kernels would hide it from inspection,
and the tree must see it to skip the graph with its reason).

Mechanism (``compile_graph``): ``compile_fx`` on a copy of the decoded module, with the
graph's weights and zero-filled example inputs of its input specs, inductor's own CUDA graphs
off (cgtree records). A compile that fails (no C++ compiler on a CPU host, an op inductor
lacks) is logged and the graph keeps its ATen code: registration never fails for it.
Inductor's on-disk caches live under ``daemon.cache_dir`` when set, so a restarted daemon does
not build its kernels again. It still lowers the graph and generates the kernels' code again:
``compile_fx`` called outside dynamo with real example tensors bypasses inductor's FX graph
cache ("No shape env"). On the CPU that is 2.4 s of a 10.5 s cold compile for mlp24, against
1.5 s when the graph itself comes from the cache; the fix (a tracing context with a shape
environment and static-shape fakes) is on branch ``compile-cache-restart``, waiting for a GPU
run (it changes how a CUDA daemon compiles).

Invariants:
- The decoded module is never changed: it stays the ATen function of the graph, which a submit
  whose graph writes a CPU input runs instead (those writes land in a copy the daemon sends
  back; the tree must see them op by op, and compiled kernels would hide them).
- Nothing here executes the graph; compiling traces it with fake tensors.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch

from cgtree import graph_facts
from cgtree.payload import DTYPES

log = logging.getLogger("cgtree.daemon.compiling")


def eager_reason(decoded: Any, module: Optional[torch.fx.GraphModule] = None) -> Optional[str]:
    """Why ``decoded`` runs as ATen code rather than compiled; None when it can be compiled.
    ``module``: a copy of its module whose nodes carry fake values (``compile_graph`` makes
    one), so that ops are judged by ``cgtree.capturability``'s value rule; without values a
    tagged op (an integer gather too) counts as incompatible."""
    if _has_symbolic_shapes(decoded):
        return "it has symbolic shapes"
    if graph_facts.incompatible_nodes(decoded.module if module is None else module):
        return "it holds an op a CUDA graph cannot hold"
    return None


def _has_symbolic_shapes(decoded: Any) -> bool:
    specs = getattr(decoded, "input_specs", None)
    return getattr(decoded, "dynamic", False) or specs is None or any(dim is None for spec in specs for dim in spec.shape)


def compile_graph(decoded: Any, weights: Sequence[torch.Tensor], device: torch.device, name: str) -> Callable:
    """``decoded``'s function compiled by inductor (``(*weights, *inputs) -> outputs``), or its
    ATen module when ``eager_reason`` says so (logged)."""
    examples, judged = [], None
    if not _has_symbolic_shapes(decoded):
        examples = [*weights, *(torch.zeros(spec.shape, dtype=DTYPES[spec.dtype], device=device) for spec in decoded.input_specs)]
        judged = copy.deepcopy(decoded.module)  # fake values only for the decision; inductor gets a clean copy
        graph_facts.propagate_fake_values(judged, examples)
    reason = eager_reason(decoded, judged)
    if reason is not None:
        log.info("graph %s runs its ATen code, not inductor's: %s", name, reason)
        return decoded.module
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    started = time.perf_counter()
    try:
        with inductor_config.patch({"triton.cudagraphs": False}):
            compiled = compile_fx(copy.deepcopy(decoded.module), examples)
    except Exception as exc:  # noqa: BLE001 - no compiler, an op inductor lacks...: the graph still serves
        log.warning("graph %s runs its ATen code: inductor could not compile it (%s: %s)", name, type(exc).__name__,
                    str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "")
        return decoded.module
    log.info("graph %s compiled by inductor in %.1f s", name, time.perf_counter() - started)
    # Called with positional arguments, as the module: compile_fx keeps a flat GraphModule's
    # calling convention (whatever ``_boxed_call`` attribute it copied from inner functions).
    return compiled
