"""Warm the compiled-graph loader before READY, with a *canary*: a tiny graph compiled once.

Why: the first compiled graph a process loads costs seconds that the following ones do not,
whatever the graph (``benchmarks/artifact_load.py``: about 3 s on a 2-core CPU host, importing
inductor's ``compile_fx`` and probing the CPU's vector ISA; on the H200 3-4 s for a small MLP,
where Triton's runtime starts). A restarted cgtreed paid them at the first register after
READY, so every client recovering from a crash waited for them after READY. Loading and
calling a canary before READY moves that cost to where systemd and clients already wait, and
makes READY mean what it says: compiled graphs load at once.

The canary is an ordinary cgtree graph payload (a matmul, which starts cuBLAS, and a pointwise
and a reduction kernel, which start Triton's runtime), compiled by the same worker and kept as
an artifact like any graph, under its own id (``CANARY_ID``), per device and torch build.

- Present: ``warm`` loads and calls it (seconds in the log and in the startup phases).
- Absent (first start with this torch on this host): the daemon queues it as the compile
  worker's first job after READY and loads it when it lands (``warm_when_compiled``), so that
  the next start is warm. That first load costs its seconds on the loop, as the first real
  graph's would have.
- Any failure is logged and changes nothing else: graphs load as they did without a canary.

Invariant: the canary never becomes a registered graph; it is loaded into a local and dropped.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("cgtree.daemon.loader_warmup")


@functools.lru_cache(maxsize=1)
def canary_graph_bytes() -> bytes:
    """The canary's graph payload (deterministic: the same bytes in every process)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from cgtree.payload import encode_graph

    def canary(weight: torch.Tensor, x: torch.Tensor) -> tuple:
        hidden = torch.relu(x @ weight)
        return hidden + 1.0, hidden.sum(dim=-1)

    weight = torch.zeros(16, 16)
    module = make_fx(canary)(weight, torch.zeros(8, 16))
    return encode_graph(module, [weight]).graph_bytes


def canary_id() -> str:
    return "canary-" + hashlib.sha256(canary_graph_bytes()).hexdigest()[:16]


def canary_path(device: torch.device) -> Path:
    from cgtree.daemon.compiling import artifact_dir, artifact_name

    return artifact_dir() / artifact_name(canary_id(), device)


def warm(device: torch.device) -> Optional[float]:
    """Load and call the canary compiled for ``device``: seconds taken, or None when there is
    no canary for it yet. Raises what loading or calling raises."""
    path = canary_path(device)
    if not path.exists():
        return None
    from cgtree.daemon.compiling import example_inputs, load_artifact
    from cgtree.payload import decode_graph

    started = time.perf_counter()
    decoded = decode_graph(canary_graph_bytes(), device=device)
    compiled = load_artifact(path)
    compiled(*example_inputs(decoded, device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def warm_or_log(device: torch.device) -> Optional[float]:
    """``warm``, with every failure logged and swallowed (the daemon serves regardless); a
    canary file that fails to load is removed, so that the worker writes a fresh one."""
    try:
        seconds = warm(device)
    except Exception as exc:  # noqa: BLE001 - a stale or broken canary: graphs still load, later
        log.warning("device %s: the loader warm-up canary failed (%s: %s); it will be compiled again",
                    device, type(exc).__name__, str(exc)[:200])
        try:
            canary_path(device).unlink(missing_ok=True)
        except Exception:  # noqa: BLE001 - nothing more to do
            pass
        return None
    if seconds is not None:
        log.info("device %s: compiled-graph loader warmed in %.2f s (canary)", device, seconds)
    return seconds


def compile_canary(compiler, device: torch.device) -> None:
    """Queue the canary for ``device`` on the compile service; when it lands, warm with it."""
    try:
        path = canary_path(device)
        payload = canary_graph_bytes()
    except Exception as exc:  # noqa: BLE001 - no private cache directory: graphs say so themselves
        log.warning("device %s: no loader warm-up canary (%s: %s)", device, type(exc).__name__, exc)
        return

    def landed(result) -> None:
        if result.ok:
            warm_or_log(device)
        else:
            log.warning("device %s: the loader warm-up canary did not compile (%s)", device,
                        result.error or result.eager_reason)

    compiler.submit(graph_id=canary_id(), device=str(device), name="loader warm-up canary", path=path,
                    payload=payload, namespaces=(), on_done=landed)
