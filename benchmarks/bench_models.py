#!/usr/bin/env python3
"""Real models through ``torch.compile``: does each path put them under graphs, does it still
compute what eager computes, and how long does a call take.

The models are ``benchmarks/real_models.py``'s zoo: small configurations of HF transformers
causal LMs (gpt2, llama, mistral, qwen2, phi, opt, called ``model(ids, attention_mask=mask)``),
encoders (bert, roberta), HF ViT, timm (resnet18, a ViT, convnext) and torchvision
(mobilenet_v3_small) models, all float32 with seeded random weights (nothing is downloaded),
plus two special cases: HF ``generate`` with a static cache (``hf-generate``) and a training
step (``hf-train``). For each model and each *path* one run measures:

- **match**: the outputs of a few steps with fresh inputs (``real_models.Built.inputs(step)``)
  against eager's on a separately built model with the same weights: relative error
  ``||out - ref|| / ||ref|| <= 1e-3`` (float32; inductor reorders arithmetic, ~1e-6; a stale
  replay of an old input is of order 1). Steps 0-3 before timing (warmup, record, replays)
  and one more after it. ``hf-generate``: the generated token ids must be identical;
  ``hf-train``: every step's loss (fresh identical model per path, same data, SGD).
- **graphed**: read from counters only, never inferred from matching values (below).
- **sync p50**: median over ``--iters`` calls of (call + device synchronize) with the same
  inputs, after ``--warmup`` untimed calls (``benchmarks/timing.py``); outputs dropped at once.
  A forward model's paths are timed side by side in ``--rounds`` rounds (below); each round's
  p50 is kept too (``round_p50_us``). ``hf-generate``: one sample is one ``generate`` call;
  ``hf-train``: one training step (forward, backward, optimizer step).

Paths, and how "graphed" is read:

- ``eager``: the module called directly (under ``torch.no_grad()`` except training); graphed
  is not applicable.
- ``reduce-overhead``: ``torch.compile(module, mode="reduce-overhead")``. Graphed when
  ``torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]`` did not grow over the whole
  life of the path (PyTorch bumps it once, when it decides a graph runs without CUDA graphs,
  often at compile time) and PyTorch's tree manager replayed during the timed calls: this
  script counts ``CUDAGraphTreeManager.execute_node`` (replay), ``record_function`` and
  ``run_eager`` calls by wrapping them (PyTorch keeps no replay counter). ``n/a`` on the CPU.
- ``cgtree``: ``torch.compile(module, backend="cgtree")`` (in-process trees,
  ``cgtree.compile``; its defaults: ``inductor`` on CUDA, so that the kernels are
  reduce-overhead's and only the trees differ, ``eager`` (AOT's ATen graph) on the CPU;
  ``--cgtree-compiler`` sets one). Counters: the sum of ``cgtree.compile.managers()[*].counters`` (``replays``,
  ``skipped_calls``, ``recordings``, ``warmups``) and each tree node's ``replays`` from
  ``status()``; graphed when replays grew during the timed calls (at least one per call) and
  ``skipped_calls`` did not.
- ``cgtreed``: a ``cgtreed`` this script starts (``bench_compile.start_daemon``; ``--devices``
  the benchmark device; ``daemon.compile`` its default: inductor on CUDA, eager on CPU), one
  ``cgtree.client.Client`` (session) per model and
  ``torch.compile(module, backend=cgtree.client.compile_backend.backend(client))``. Counters:
  the daemon's side from ``client.status(session_only=True)`` (the session's per-device
  ``counters`` and tree nodes), ``client.last_execution["mode"]`` after the timed calls, and
  the graphs that stayed in the client: the compile backend logs "cannot go to cgtreed" /
  "runs in this process" on logger ``cgtree.client.compile``, captured here and counted.
  Graphed when the daemon replayed at least once per timed call, skipped no call, and no graph
  ran in the client. ``hf-train`` is ``n/a (training runs in the client)``: cgtreed serves
  inference graphs (it is still run and checked; it is left out of the path's count).

``hf-generate`` follows HF's static-cache recipe, ``model.forward = torch.compile(model.forward,
...)``, with HF's own auto-compile off; graphed when every decode step after warmup was a
replay (replays grew by at least ``max_new_tokens - 3`` per timed ``generate`` call) and no
call was skipped (a graph kept in the client by cgtreed, e.g. the prefill, is named in the
note). Two cases: ``llama-generate`` (``cache_implementation="static"``: HF creates the cache
lazily inside the first, compiled, forward and cannot mark it static) and
``llama-generate-cache`` (a ``StaticCache`` made up front, passed as ``past_key_values`` and
reset before each call). ``hf-train`` is graphed when both forward and backward graphs
replayed on every timed step and no call was skipped.

Fairness: every path builds its own model (same seed, so the same weights) and compiles its own
graphs: dynamo keeps a cache entry per backend on the model class's code objects (its
BACKEND_MATCH guard), so no path reuses another's, and while a model's paths are alive side by
side the recompile limit is multiplied by the number of compiled paths, so each keeps the limit
it would have alone. After a model (generate, train: after each path) ``torch._dynamo.reset()``
closes cgtree's managers and PyTorch's trees, so every model starts from a fresh dynamo state;
inductor uses an empty temporary cache (``--fresh-inductor-cache``). Float32 is float32: TF32
is off in every process of the run, the daemon included (cuDNN convolutions default to TF32,
which alone moves a conv net's logits by ~1e-3 against eager). Warmup is 64 calls on CUDA: a
cgtreed steady loop records its plan's own graph after 50 runs, and the timed calls should see
every path's steady state.

Timing rounds (a forward model; generate and train paths run one after the other): every path
is first built, compiled, checked (``CHECK_STEPS``) and warmed up, one after the other, and
kept alive; then ``--rounds`` rounds (20 on CUDA, 1 on the CPU and in smoke mode) each time
every path for its share of ``--iters`` calls, in turn, the order rotated by one path a round
so that no path is always first; then each path's late check, counters and verdicts. So the
ratios between paths compare samples taken in alternation, not one path's block after the
other's with compiles in between (measured on the H200 that way, cgtree/reduce-overhead swung
by +-30% from run to run on near-identical graphs). Rounds are short (10 calls a path at the
default 200) because the lent H200 hosts slow down for seconds at a time: with 3 rounds of ~67
calls one disturbed block moved a model's cgtreed/reduce-overhead ratio from 1.0 to 1.9
(docs/PERFORMANCE.md section 18), where short blocks spread a disturbance over every path.
Each block starts with ``REWARM_CALLS`` untimed calls (the first call after another path ran
pays for the switch: caches, a cgtreed loop that stopped spinning). Counters for "graphed" are
summed over the path's own timed blocks (snapshots around each, the block's untimed first calls
included, and counted in the calls a verdict asks replays for: a snapshot between them and the
timed calls would be a ``status`` request to cgtreed, after which its loop may fall asleep
again, a cost only that path would pay), its life counters over its own phases only (PyTorch's tree counters
and cgtree's managers are process-wide, and the other paths run in between). A path that fails
while being prepared is an error row; the others go on. Rounds after the first are dropped once
the time budget is spent. Several CUDA graph pools are alive at once this way (PyTorch's,
cgtree's, the daemon's). Each path's first three calls are also timed (cold start: compile,
warmup, record) and kept in the JSON.

Isolation (``--isolate``, the default): the models run in child processes (``--child``,
``python -X faulthandler``; ``benchmarks/model_children.py``), one child for all of them as
long as none crashes or hangs, so python, torch, transformers, CUDA and inductor start once,
not once per model. The child rewrites its out file (every model's entry so far, and the path
running) when it starts a model, when a path starts being prepared or timed and when a model's
rows are written; the parent reads it as progress and saves the report after every finished
model. A crash (a segfault in a kernel launch, say) makes the path that was running an error,
with the signal, the crashing thread's innermost frame and the model library's frame from
faulthandler in the note, and a new child takes that model's remaining paths (those that were
alive beside it are measured again) and the models after it. ``--model-timeout`` is a silence
limit: a child that writes no progress for that long (one path, or one model's eager reference,
hanging) is killed, and the path it was in is a time-out error; so is a child still running 120
s past the time budget. The daemon is the parent's, shared by every child; a child that finds
it dead before a cgtreed path exits (no error row), and the parent starts a new daemon and a
new child. The report counts both (``daemon_starts``, ``child_starts``). Models in one process
do not share compiled state: every model ends with ``torch._dynamo.reset()`` and PyTorch's
tree reset (Fairness).

Run time on an H200 (torch 2.11), measured with a child per model: a model's four paths take
about 22 s (three inductor compiles into an empty cache), and starting a child (imports, CUDA
and inductor's first use) added about 20 s a model, now paid once per child; the whole zoo
should fit about six minutes (not yet measured so): split it across calls with ``--models`` /
``--families``, or give ``--time-budget``.

Summary: models graphed per path (k of n, n counting the rows where the path ran or failed);
geomean speed-up over eager per path, over the models graphed on that path and on
reduce-overhead where reduce-overhead ran; geomean ratios cgtree/reduce-overhead and
cgtreed/reduce-overhead over the models graphed on both.

``--device cpu --smoke`` is the CPU smoke mode: a few small models, tiny iteration counts,
the cgtree paths on the CPU replay backend, reduce-overhead ``n/a``; models whose library is
missing are reported "skipped: <reason>"; the numbers mean nothing. ``--time-budget S`` stops
starting new model/path runs after S seconds (and SIGTERM stops the run) and still writes the
report of what ran; the JSON is also rewritten after every model.

Exit status: 0 when everything that ran matched eager; 2 when a path errored or disagreed;
3 with ``--fail-unless-graphed`` when a model that reduce-overhead graphed was not graphed by
cgtree or cgtreed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Appended, not prepended: the repository's bare cgtree/ folder must not shadow an
    # installed cgtree (whose daemon/ and client/ map in), as in bench_compile.py.
    sys.path.append(str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks import model_children, real_models  # noqa: E402
from benchmarks.model_children import BUDGET_NOTE  # noqa: E402
from benchmarks.bench_compile import relative_error  # noqa: E402
from benchmarks.revision import source_revision  # noqa: E402
from benchmarks.report import fmt as _fmt, write_reports  # noqa: E402
from benchmarks.timing import summarize_ns, sync_samples_ns  # noqa: E402

PATHS = ("eager", "reduce-overhead", "cgtree", "cgtreed")
COMPILED_PATHS = ("reduce-overhead", "cgtree", "cgtreed")
MAX_REL_ERR = 1e-3
CHECK_STEPS = (0, 1, 2, 3)  # before timing: warmup, record, replays with new values
LATE_CHECK_STEP = 100  # after timing
TIMED_STEP = 50  # the inputs of the timed calls
COLD_START_CALLS = 3
REWARM_CALLS = 3  # untimed calls before each timed block of paths timed side by side
DEFAULT_CUDA_ROUNDS = 20  # short blocks: a host that stalls for seconds hits every path alike
GENERATE_REPLAY_SLACK = 3  # a generate call may have up to this many decode steps not replayed
SMOKE_MODELS = ("gpt2", "bert", "resnet18-timm", "mobilenet-v3-small-tv")
CLIENT_LOGGER = "cgtree.client.compile"
# Tests only: "<model>/<path>[@timing][:hang],...": that path kills its process (SIGSEGV) or
# hangs, when it is opened (prepared) or, with @timing, in its first timed block.
CRASH_HOOK = "BENCH_MODELS_CRASH_ON"


# ---------------------------------------------------------------------------------------------
# Counters


class TorchTreeCalls:
    """Counts what PyTorch's CUDA graph tree manager does, by wrapping three of its methods:
    ``execute_node`` (a replay), ``record_function`` (a recording) and ``run_eager`` (a warmup
    run), each by the manager's compilation mode at the time (inference, forward, backward).
    PyTorch keeps no such counters itself."""

    METHODS = {"execute_node": "replays", "record_function": "recordings", "run_eager": "warmups"}

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.installed: Optional[bool] = None
        self.problem: Optional[str] = None

    def install(self) -> bool:
        if self.installed is not None:
            return self.installed
        try:
            from torch._inductor import cudagraph_trees
        except Exception as exc:
            self.installed, self.problem = False, f"torch._inductor.cudagraph_trees: {exc}"
            return False
        cls = cudagraph_trees.CUDAGraphTreeManager
        missing = [m for m in self.METHODS if not callable(getattr(cls, m, None))]
        if missing:
            self.installed, self.problem = False, f"CUDAGraphTreeManager has no {', '.join(missing)}"
            return False
        counts = self.counts
        for method, what in self.METHODS.items():
            original = getattr(cls, method)

            def counted(manager: Any, *args: Any, __original=original, __what=what, **kwargs: Any) -> Any:
                mode = getattr(getattr(manager, "mode", None), "name", "unknown").lower()
                counts[__what] += 1
                counts[f"{__what}_{mode}"] += 1
                return __original(manager, *args, **kwargs)

            counted.__wrapped__ = original
            setattr(cls, method, counted)
        self.installed = True
        return True

    def snapshot(self) -> dict:
        from torch._dynamo.utils import counters

        snap = {"cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}
        if self.installed:
            snap.update(self.counts)
        return snap


TORCH_TREE_CALLS = TorchTreeCalls()


def _kind_of(function_name: str, kinds: dict[str, str]) -> str:
    if function_name in kinds:
        return kinds[function_name]
    tail = function_name.rsplit(".", 1)[-1]
    return tail if tail in ("inference", "forward", "backward") else "unknown"


def tree_snapshot(statuses: list[dict]) -> dict:
    """Counters of cgtree tree managers (``TreeManager.status()`` documents), summed, with
    node replays by graph kind (``replays_forward`` ...)."""
    snap: collections.Counter = collections.Counter()
    skips: collections.Counter = collections.Counter()
    for status in statuses:
        for key, value in (status.get("counters") or {}).items():
            if isinstance(value, (int, float)):
                snap[key] += value
        kinds = {f.get("name"): f.get("kind") for f in status.get("functions") or []}
        for node in status.get("nodes") or []:
            snap[f"replays_{_kind_of(str(node.get('function')), kinds)}"] += int(node.get("replays") or 0)
        skips.update((status.get("skips") or {}).get("by_reason") or {})
    out = dict(snap)
    out["skip_reasons"] = dict(skips)
    return out


def cgtree_snapshot() -> dict:
    import cgtree.compile as cgtree_compile

    return tree_snapshot([mgr.status() for mgr in cgtree_compile.managers().values()])


class ClientLog(logging.Handler):
    """What the cgtreed compile backend says about graphs it keeps in this process."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.kept: list[str] = []
        self.registered = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            return
        if "cannot go to cgtreed" in message or "runs in this process" in message:
            self.kept.append(message.splitlines()[0][:400])
        elif "registered with cgtreed" in message:
            self.registered += 1


def daemon_snapshot(client: Any, log: ClientLog) -> dict:
    status = client.status(session_only=True)
    trees = []
    for session in status.get("sessions") or []:
        for device in (session.get("devices") or {}).values():
            tree = dict(device.get("tree") or {})
            tree["counters"] = device.get("counters") or tree.get("counters") or {}
            trees.append(tree)
    snap = tree_snapshot(trees)
    # How the session's submits travelled (summed over its sessions, one per client): the
    # timed counters then say whether the timed calls ran as doorbell plan runs (the fast
    # path), lane datagrams or ZeroMQ requests, and how many gated runs were late.
    for session in status.get("sessions") or []:
        gated = session.get("gated") or {}
        for key, value in (("session_submits", session.get("submits")),
                           ("session_requests", session.get("requests")),
                           ("session_lane_requests", session.get("lane_requests")),
                           ("session_doorbell_requests", session.get("doorbell_requests")),
                           ("session_doorbell_kicks", session.get("doorbell_kicks")),
                           ("session_gated_requests", gated.get("requests")),
                           ("session_gate_vetoed", gated.get("vetoed")),
                           ("session_gate_late", gated.get("late"))):
            if isinstance(value, int):
                snap[key] = snap.get(key, 0) + value
    snap["graphs_in_client"] = len(log.kept)
    snap["graphs_registered"] = log.registered
    return snap


def daemon_kernels(client: Any) -> list[dict]:
    """What each graph of this client's session runs in cgtreed: ``inductor`` or ``aten`` (the
    decoded ATen code: chosen by ``daemon.compile``, or a graph inductor could not compile, which
    stays graphed and correct but runs unfused kernels: only this tells it apart)."""
    status = client.status(session_only=True)
    own = {session.get("id") for session in status.get("sessions") or []}
    return [{"graph": graph.get("short_name") or graph.get("graph"), "kernels": graph.get("kernels"),
             "note": graph.get("kernels_note") or ""}
            for device in status.get("devices") or [] for graph in device.get("registered") or []
            if own & set(graph.get("sessions") or [])]


def uncompiled_graphs(kernels: list[dict]) -> list[dict]:
    """The graphs that run ATen code although the daemon compiles (its ``daemon.compile`` not
    "eager")."""
    return [k for k in kernels if k["kernels"] == "aten" and not k["note"].startswith("daemon.compile")]


def delta(after: dict, before: dict) -> dict:
    """Numeric counters: how much each grew from ``before`` to ``after`` (zeros kept)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class PathRow:
    status: str = "ok"  # ok | n/a | skipped | error | incorrect
    note: str = ""
    p50_us: Optional[float] = None
    sync: Optional[dict] = None
    cold_start_ms: Optional[list] = None
    graphed: Optional[bool] = None  # None: not applicable (eager, n/a, not run)
    graphed_note: str = ""
    max_rel_err: Optional[float] = None
    counters_timed: dict = field(default_factory=dict)
    counters_life: dict = field(default_factory=dict)
    timed_calls: int = 0
    counted_calls: int = 0  # calls inside counters_timed: the timed ones and each block's rewarm calls
    round_p50_us: Optional[list] = None  # each timing round's p50 (forward models: --rounds)
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# Running one model on one path


DAEMON_BOOT = (
    # cgtreed with this benchmark's numerics: TF32 off (cuDNN convolutions default to TF32,
    # which alone moves a conv net's float32 logits by ~1e-3), then the daemon's own main.
    "import runpy, torch; torch.backends.cuda.matmul.allow_tf32 = False; "
    "torch.backends.cudnn.allow_tf32 = False; runpy.run_module('cgtree.daemon.main', run_name='__main__', alter_sys=True)"
)


def strict_fp32() -> None:
    """float32 means float32 here: no TF32 in matmuls or cuDNN convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def start_daemon(devices: str, workdir: str, compile_mode: str, timeout_s: float = 120.0) -> Any:
    """``cgtreed`` as a child that dies with this process: ``bench_compile.start_daemon``,
    started through ``DAEMON_BOOT``."""
    from benchmarks.bench_compile import start_daemon as start_compile_daemon

    return start_compile_daemon(devices, workdir, compile_mode, timeout_s, boot=("-c", DAEMON_BOOT))


class Context:
    """One process's run: the device, the time budget (``deadline``: an absolute
    ``time.monotonic()``, handed to child processes as is, so that their imports do not extend
    it), and the daemon (started by the parent process on first need and restarted if it died;
    a child process is handed its endpoint and pid)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, workdir: str,
                 endpoint: Optional[str] = None, budget_s: Optional[float] = None) -> None:
        self.args = args
        self.device = device
        self.workdir = workdir
        self.sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.daemon: Any = None
        self.daemon_error: Optional[str] = None
        self.daemon_starts = 0
        self.child_starts = 0  # --isolate: child processes started (benchmarks/model_children.py)
        self.endpoint = endpoint
        self.daemon_pid: Optional[int] = None  # a child: the parent's daemon, checked before cgtreed paths
        self.deadline = None if budget_s is None else time.monotonic() + budget_s

    def over_budget(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def daemon_endpoint(self) -> str:
        if self.endpoint is not None:
            return self.endpoint
        if self.daemon_error is not None:
            raise RuntimeError(self.daemon_error)
        if self.daemon is not None and self.daemon.proc.poll() is not None:
            print(f"[bench_models] cgtreed exited ({self.daemon.proc.returncode}); starting a new one",
                  file=sys.stderr, flush=True)
            self.daemon = None
        if self.daemon is None:
            devices = str(self.device) if self.device.type == "cuda" else "cpu"
            try:
                self.daemon = start_daemon(devices, os.path.join(self.workdir, f"d{self.daemon_starts}"),
                                           self.args.daemon_compile)
            except Exception as exc:
                self.daemon_error = f"cgtreed did not start: {type(exc).__name__}: {_first_line(exc)}"
                raise
            self.daemon_starts += 1
        return self.daemon.endpoint

    def close(self) -> None:
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                self.daemon.stop()
            self.daemon = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:400] if text else ""


def _error_note(where: str, exc: BaseException) -> str:
    return f"{where}: {type(exc).__name__}: {_first_line(exc)}"


def kind_of(case: real_models.ModelCase) -> str:
    return {"hf-generate": "generate", "hf-train": "train"}.get(case.family, "forward")


def token_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Generated tokens: 0.0 when identical, else the fraction of positions that differ."""
    if out.shape != ref.shape:
        return float("inf")
    return (out.cpu() != ref.cpu()).float().mean().item()


@dataclass
class Prepared:
    """One path's callable for one built model: ``call(step_args, step_kwargs)`` does one call
    (forward, generate, or training step) and returns the value to compare."""

    built: real_models.Built
    call: Callable[[tuple, dict], torch.Tensor]
    snapshot: Callable[[], dict]
    details: Callable[[], dict] = dict
    close: Callable[[], None] = lambda: None


def _compile(path: str, target: Callable, ctx: Context, client: Any = None) -> Callable:
    if path == "reduce-overhead":
        return torch.compile(target, mode="reduce-overhead")
    if path == "cgtree":
        import cgtree.compile  # noqa: F401  (registers the backend)

        options = None if ctx.args.cgtree_compiler == "auto" else {"compiler": ctx.args.cgtree_compiler}
        return torch.compile(target, backend="cgtree", options=options)
    if path == "cgtreed":
        from cgtree.client.compile_backend import backend

        return torch.compile(target, backend=backend(client))
    return target


def _make_call(kind: str, built: real_models.Built, fn: Callable, device: torch.device) -> Callable[[tuple, dict], torch.Tensor]:
    module, output = built.module, built.output
    if kind == "generate":
        def call(args: tuple, kwargs: dict) -> torch.Tensor:
            cache = kwargs.get("past_key_values")
            if cache is not None:
                cache.reset()  # a cache made up front (real_models: llama-generate-cache) is reused
            with torch.no_grad():
                return output(module.generate(*args, **kwargs))
        return call
    if kind == "train":
        optimizer = torch.optim.SGD(module.parameters(), lr=real_models.TRAIN_LR)

        def call(args: tuple, kwargs: dict) -> torch.Tensor:
            loss = output(fn(*args, **kwargs))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        return call

    def call(args: tuple, kwargs: dict) -> torch.Tensor:
        with torch.no_grad():
            return output(fn(*args, **kwargs))
    return call


def prepare(path: str, case: real_models.ModelCase, ctx: Context, client_log: Optional[ClientLog]) -> Prepared:
    kind = kind_of(case)
    built = case.build(ctx.device)
    client = None
    close: Callable[[], None] = lambda: None
    if path == "cgtreed":
        from cgtree.client import Client

        client = Client(ctx.daemon_endpoint(), timeout_s=600)
        close = client.close
    if kind == "generate":
        # HF's static-cache recipe: compile forward; generate() stays Python.
        if path != "eager":
            built.module.forward = _compile(path, built.module.forward, ctx, client)
        fn = built.module
    else:
        fn = _compile(path, built.module, ctx, client)

    if path == "reduce-overhead":
        snapshot = TORCH_TREE_CALLS.snapshot
        details = lambda: {"replay_counter": "CUDAGraphTreeManager.execute_node calls" if TORCH_TREE_CALLS.installed
                           else f"unavailable: {TORCH_TREE_CALLS.problem}"}
    elif path == "cgtree":
        snapshot = cgtree_snapshot

        def details() -> dict:
            import cgtree.compile as cgtree_compile

            mgrs = cgtree_compile.managers()
            return {"compiler": ctx.args.cgtree_compiler, "backends": sorted({m.backend_name for m in mgrs.values()}),
                    "last_execution_mode": next((m.last_execution.mode.value for m in mgrs.values()
                                                 if m.last_execution is not None), None)}
    elif path == "cgtreed":
        snapshot = lambda: daemon_snapshot(client, client_log)

        def details() -> dict:
            last = client.last_execution
            return {"daemon_compile": ctx.args.daemon_compile,
                    "last_execution_mode": None if last is None else last.get("mode"),
                    "last_execution": last, "client_log": list(client_log.kept), "kernels": daemon_kernels(client),
                    # runs handed back stream-ordered (CGTREE_STREAM_ORDERED_OUTPUTS=1): 0 with the default
                    "stream_order": client.stream_order.describe()}
    else:
        snapshot, details = dict, dict
    return Prepared(built, _make_call(kind, built, fn, ctx.device), snapshot, details, close)


def _clone(value: torch.Tensor) -> torch.Tensor:
    return value.detach().clone()


def _compare(kind: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    return token_error(got, ref) if kind == "generate" else relative_error(got, ref)


def reference_outputs(case: real_models.ModelCase, ctx: Context) -> dict:
    """Eager's outputs on every step the paths are checked at (train: every step's loss), on a
    model of its own."""
    kind = kind_of(case)
    built = case.build(ctx.device)
    call = _make_call(kind, built, built.module, ctx.device)
    steps = train_steps(ctx) if kind == "train" else (*CHECK_STEPS, LATE_CHECK_STEP)
    return {step: _clone(call(built.inputs(step), built.kwargs(step))) for step in steps}


def train_steps(ctx: Context) -> list[int]:
    return list(range(ctx.args.warmup + ctx.args.train_iters))


def graphed_verdict(path: str, case: real_models.ModelCase, timed: dict, life: dict, calls: int,
                    ctx: Context, client_messages: tuple = ()) -> tuple[Optional[bool], str]:
    """Graphed or not, from the counters of the timed calls (``timed``) and of the path's whole
    life (``life``), and why."""
    kind = kind_of(case)
    if kind == "train" and path == "cgtreed":
        return None, "n/a (training runs in the client)"
    problems = []
    if path == "reduce-overhead":
        if life.get("cudagraph_skips", 0):
            problems.append(f"cudagraph_skips +{life['cudagraph_skips']}")
        if not TORCH_TREE_CALLS.installed:
            return (False if problems else None), "; ".join(problems or [f"replays not countable ({TORCH_TREE_CALLS.problem})"])
    else:
        if timed.get("skipped_calls", 0):
            problems.append(f"skipped_calls +{timed['skipped_calls']}")
        reasons = life.get("skip_reasons") or {}
        if timed.get("skipped_calls", 0) and reasons:
            problems.append("skip reasons: " + ", ".join(f"{k} x{v}" for k, v in reasons.items()))
    in_client = ""
    if path == "cgtreed" and life.get("graphs_in_client", 0):
        in_client = f"{life['graphs_in_client']} graph(s) ran in the client, not graphed"
        if client_messages:
            in_client += f" ({client_messages[0][:300]})"
        if kind != "generate":  # generate: the decode steps decide (below); the note stays
            problems.append(in_client)
    replays = timed.get("replays", 0)
    if kind == "generate":
        per_call = ctx.args.max_new_tokens - GENERATE_REPLAY_SLACK
        if replays < per_call * calls:
            problems.append(f"replays +{replays} over {calls} generate call(s) (< {per_call} per call)")
        elif in_client and not problems:
            return True, (f"decode steps graphed: replays +{replays} over {calls} generate call(s), no skips; "
                          f"but {in_client}")
    elif kind == "train":
        for part in ("forward", "backward"):
            got = timed.get(f"replays_{part}", 0)
            if got < calls:
                problems.append(f"{part} replays +{got} over {calls} steps")
    elif replays < calls:
        problems.append(f"replays +{replays} over {calls} calls")
    if problems and (timed.get("warmups", 0) or timed.get("recordings", 0)):
        problems.append(f"timed calls also had warmups +{timed.get('warmups', 0)}, recordings +{timed.get('recordings', 0)}")
    if problems:
        return False, "; ".join(problems)
    if kind == "train":
        return True, (f"forward replays +{timed.get('replays_forward', 0)}, backward replays "
                      f"+{timed.get('replays_backward', 0)} over {calls} steps, no skips")
    return True, f"replays +{replays} over {calls} {'generate ' if kind == 'generate' else ''}calls, no skips"


@dataclass
class PathRun:
    """One path of one model under way: ``open_path`` prepares it (and, but for training, runs
    the checked first calls and the warmup), ``time_block`` times it (once a round),
    ``train_path`` runs a training path's steps, ``close_path`` checks it late, reads its
    counters and closes it. Counters are summed over this path's own phases only (``life``) and
    over its timed blocks only (``timed``), so that paths alive side by side do not count each
    other's calls (PyTorch's tree counters and cgtree's managers are process-wide)."""

    path: str
    row: PathRow = field(default_factory=PathRow)
    prepared: Optional[Prepared] = None
    client_log: Optional[ClientLog] = None
    logger_level: int = logging.NOTSET
    stage: str = "setup"
    worst: float = 0.0
    samples: list = field(default_factory=list)
    life: dict = field(default_factory=dict)
    timed: dict = field(default_factory=dict)
    last: dict = field(default_factory=dict)  # the last snapshot (absolute values: skip reasons, graphs in client)
    wall_s: float = 0.0
    timed_args: tuple = ((), {})

    @property
    def alive(self) -> bool:
        return self.prepared is not None and self.row.status == "ok"

    def measure(self, work: Callable[[], Any], timed: bool = False) -> Any:
        """``work()`` with this path's counters read around it (added to ``life``, and to
        ``timed`` for a timed block) and its wall time counted."""
        began = time.perf_counter()
        before = self.prepared.snapshot()
        result = work()
        self.last = self.prepared.snapshot()
        grown = delta(self.last, before)
        for key, value in grown.items():
            self.life[key] = self.life.get(key, 0) + value
            if timed:
                self.timed[key] = self.timed.get(key, 0) + value
        self.wall_s += time.perf_counter() - began
        return result

    def fail(self, exc: BaseException) -> None:
        self.row.status, self.row.note = "error", _error_note(self.stage, exc)
        traceback.print_exc()
        if self.client_log is not None and self.client_log.kept:
            self.row.details = {"client_log": list(self.client_log.kept)}
        self.close()

    def close(self) -> None:
        """Idempotent: the client goes (cgtreed), the log handler comes off; compiled state stays
        until the model's ``reset_graph_state``."""
        if self.client_log is not None:
            logger = logging.getLogger(CLIENT_LOGGER)
            logger.removeHandler(self.client_log)
            logger.setLevel(self.logger_level)
        if self.prepared is not None:
            with contextlib.suppress(Exception):
                self.prepared.close()
        self.prepared = None


def open_path(path: str, case: real_models.ModelCase, ctx: Context, refs: dict) -> PathRun:
    """The path built and compiled; unless training, its checked first calls (``CHECK_STEPS``,
    the first three also timed as cold start) and its warmup calls. A failure is the row's error."""
    run = PathRun(path)
    kind = kind_of(case)
    if path == "reduce-overhead":
        if ctx.device.type != "cuda":
            run.row = PathRow(status="n/a", note="needs CUDA (no CUDA graphs on CPU)")
            return run
        TORCH_TREE_CALLS.install()
    if path == "cgtreed":
        run.client_log = ClientLog()
        logger = logging.getLogger(CLIENT_LOGGER)
        run.logger_level = logger.level
        logger.addHandler(run.client_log)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    began = time.perf_counter()
    try:
        run.prepared = prepare(path, case, ctx, run.client_log)
        built = run.prepared.built
        run.timed_args = (built.inputs(TIMED_STEP), built.kwargs(TIMED_STEP))
        if kind != "train":
            run.stage = "first calls"
            run.measure(lambda: _first_calls(run, kind, ctx, refs))
    except Exception as exc:  # a model that fails on a path must not stop the run
        run.fail(exc)
    run.wall_s = time.perf_counter() - began  # building, compiling, first calls, warmup
    return run


def _first_calls(run: PathRun, kind: str, ctx: Context, refs: dict) -> None:
    built, call = run.prepared.built, run.prepared.call
    run.row.cold_start_ms = []
    for index, step in enumerate(CHECK_STEPS):
        step_args, step_kwargs = built.inputs(step), built.kwargs(step)
        ctx.sync()
        began = time.perf_counter_ns()
        out = call(step_args, step_kwargs)
        ctx.sync()
        if index < COLD_START_CALLS:
            run.row.cold_start_ms.append((time.perf_counter_ns() - began) / 1e6)
        got, out = _clone(out), None
        run.worst = max(run.worst, _compare(kind, got, refs[step]))
    _untimed_calls(run, 1 if kind == "generate" else ctx.args.warmup, ctx)


def _untimed_calls(run: PathRun, calls: int, ctx: Context) -> None:
    call, (step_args, step_kwargs) = run.prepared.call, run.timed_args
    for _ in range(calls):
        call(step_args, step_kwargs)  # output dropped at once
    ctx.sync()


def time_block(run: PathRun, calls: int, rewarm: int, ctx: Context) -> None:
    """``calls`` timed calls (sync p50 samples) after ``rewarm`` untimed ones (the path's state
    after other paths ran; inside the block's counters); this block's p50 is kept."""
    run.stage = "timing"
    call, (step_args, step_kwargs) = run.prepared.call, run.timed_args

    def once() -> None:
        call(step_args, step_kwargs)  # output dropped at once

    def block() -> list[int]:
        _untimed_calls(run, rewarm, ctx)
        return sync_samples_ns(once, calls, 0, ctx.sync)

    try:
        samples = run.measure(block, timed=True)  # one snapshot pair: nothing between rewarm and timing
        run.row.counted_calls += rewarm + calls
        run.samples += samples
        run.row.round_p50_us = (run.row.round_p50_us or []) + [summarize_ns(samples).to_dict()["p50_us"]]
    except Exception as exc:
        run.fail(exc)


def train_path(run: PathRun, case: real_models.ModelCase, ctx: Context, refs: dict) -> None:
    """Every training step checked against eager's loss; the steps after ``--warmup`` timed."""
    run.stage = "first calls"
    built, args = run.prepared.built, ctx.args
    start = run.prepared.snapshot()
    began_path = time.perf_counter()
    timed_before = None
    for index, step in enumerate(train_steps(ctx)):
        if index == args.warmup:
            timed_before = run.prepared.snapshot()
            run.stage = "timing"
        step_args, step_kwargs = built.inputs(step), built.kwargs(step)
        ctx.sync()
        began = time.perf_counter_ns()
        loss = run.prepared.call(step_args, step_kwargs)
        ctx.sync()
        elapsed = time.perf_counter_ns() - began
        if index < COLD_START_CALLS:
            run.row.cold_start_ms = (run.row.cold_start_ms or []) + [elapsed / 1e6]
        if index >= args.warmup:
            run.samples.append(elapsed)
        run.worst = max(run.worst, _compare("train", loss, refs[step]))
    run.last = run.prepared.snapshot()
    run.timed = delta(run.last, timed_before if timed_before is not None else run.last)
    run.life = delta(run.last, start)
    run.wall_s += time.perf_counter() - began_path


def close_path(run: PathRun, case: real_models.ModelCase, ctx: Context, refs: dict) -> PathRow:
    """The late check (not training), the counters and the verdicts; the path closed."""
    row, kind = run.row, kind_of(case)
    if run.alive:
        try:
            if kind != "train":
                run.stage = "late check"
                built = run.prepared.built
                got = run.measure(lambda: _clone(run.prepared.call(built.inputs(LATE_CHECK_STEP),
                                                                   built.kwargs(LATE_CHECK_STEP))))
                run.worst = max(run.worst, _compare(kind, got, refs[LATE_CHECK_STEP]))
            run.stage = "counters"
            row.sync = summarize_ns(run.samples).to_dict()
            row.p50_us = row.sync["p50_us"]
            row.timed_calls = len(run.samples)
            row.counted_calls = row.counted_calls or row.timed_calls  # training: no blocks, the steps themselves
            row.max_rel_err = run.worst
            row.counters_timed, row.counters_life = dict(run.timed), dict(run.life)
            for absolute in ("skip_reasons", "graphs_in_client"):
                if absolute in run.last:
                    row.counters_life[absolute] = run.last[absolute]
            if run.path != "eager":
                messages = tuple(run.client_log.kept) if run.client_log is not None else ()
                row.graphed, row.graphed_note = graphed_verdict(run.path, case, row.counters_timed, row.counters_life,
                                                                row.counted_calls, ctx, messages)
            with contextlib.suppress(Exception):
                row.details = run.prepared.details()
            limit = 0.0 if kind == "generate" else MAX_REL_ERR
            if not run.worst <= limit:
                row.status = "incorrect"
                row.note = (f"{run.worst:.1%} of generated tokens differ" if kind == "generate"
                            else f"max relative error {run.worst:.3g} > {MAX_REL_ERR:g}")
        except Exception as exc:
            run.fail(exc)
    run.close()
    row.details["path_wall_s"] = round(run.wall_s, 2)
    return row


def reset_graph_state(ctx: Context) -> None:
    """Compiled code, cgtree's managers (closed by the reset) and PyTorch's trees go."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    if ctx.device.type == "cuda":
        with contextlib.suppress(Exception):
            from torch._inductor import cudagraph_trees

            cudagraph_trees.reset_cudagraph_trees()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def new_model_entry(case: real_models.ModelCase) -> dict:
    return {"name": case.name, "family": case.family, "library": case.library, "status": "ok", "note": "",
            "paths": {}}


def _crash_hook(where: str, phase: str) -> None:
    """Tests: a child dying (SIGSEGV) or hanging on a path, when it is opened or timed, as
    ``CRASH_HOOK`` asks."""
    for spec in (os.environ.get(CRASH_HOOK) or "").split(","):
        target, _, how = spec.partition(":")
        target, _, at = target.partition("@")
        if target == where and (at or "open") == phase:
            if how == "hang":
                while True:
                    time.sleep(60)
            os.kill(os.getpid(), signal.SIGSEGV)


def run_model(case: real_models.ModelCase, ctx: Context, paths: list[str],
              progress: Callable[[dict, Optional[str]], None] = lambda model, running: None) -> dict:
    """``paths`` of one model in this process: side by side in timing rounds (a forward model),
    or one after the other (generate, train). ``progress(entry, running)`` is called when a path
    starts being prepared or timed (``running``: that path) and when the rows are written (None):
    a child's heartbeat and the parent's way to know which path a crash happened in
    (``model_children``)."""
    model = new_model_entry(case)
    missing = real_models.missing_library(case)
    if missing is not None:
        model["status"], model["note"] = "skipped", f"skipped: {missing}"
        return model
    print(f"[bench_models] {case.name} ({case.family}): {', '.join(paths)} ...", file=sys.stderr, flush=True)
    try:
        grad = contextlib.nullcontext() if kind_of(case) == "train" else torch.no_grad()
        with grad:
            refs = reference_outputs(case, ctx)
    except Exception as exc:
        model["status"], model["note"] = "error", _error_note("eager reference", exc)
        traceback.print_exc()
        return model
    if kind_of(case) == "forward":
        run_paths(paths, case, ctx, refs, model, progress, ctx.args.rounds)
    else:
        for path in paths:
            run_paths([path], case, ctx, refs, model, progress, 1)
    model["paths"] = {p: model["paths"][p] for p in paths if p in model["paths"]}
    return model


def run_paths(group: list[str], case: real_models.ModelCase, ctx: Context, refs: dict, model: dict,
              progress: Callable[[dict, Optional[str]], None], rounds: int) -> None:
    """``group``'s paths side by side: each opened in turn (built, compiled, checked, warmed up)
    and kept alive, then timed in ``rounds`` rounds, then closed; their rows go into ``model``.
    Compiled state is reset once, at the end (``reset_graph_state``). Dynamo keeps one cache
    entry per backend on the model's shared code objects (its BACKEND_MATCH guard), so each
    path compiles its own graphs; the recompile limit is multiplied by the number of compiled
    paths alive, so that each keeps the limit it would have alone."""
    kind = kind_of(case)
    runs: dict[str, PathRun] = {}
    compiled = max(1, sum(1 for path in group if path != "eager"))
    try:
        with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit * compiled):
            for path in group:
                if ctx.over_budget():
                    model["paths"][path] = PathRow(status="skipped", note=BUDGET_NOTE).to_json()
                    continue
                if path == "cgtreed" and ctx.daemon_pid is not None and not process_alive(ctx.daemon_pid):
                    raise DaemonGone(f"cgtreed (pid {ctx.daemon_pid}) exited")
                print(f"[bench_models]   {path} ...", file=sys.stderr, flush=True)
                progress(model, path)
                _crash_hook(f"{case.name}/{path}", "open")
                run = runs[path] = open_path(path, case, ctx, refs)
                if kind == "train" and run.alive:
                    try:
                        train_path(run, case, ctx, refs)
                    except Exception as exc:
                        run.fail(exc)
            if kind != "train":
                _timing_rounds([run for run in runs.values() if run.alive], case, ctx, model, progress, rounds)
            for path, run in runs.items():
                row = close_path(run, case, ctx, refs)
                model["paths"][path] = row.to_json()
                print(f"[bench_models]   {path}: {row.status} {row.note} graphed={row.graphed} {row.graphed_note} "
                      f"({row.details['path_wall_s']} s)", file=sys.stderr, flush=True)
            progress(model, None)
    finally:
        for run in runs.values():
            run.close()
        reset_graph_state(ctx)


def _timing_rounds(runs: list[PathRun], case: real_models.ModelCase, ctx: Context, model: dict,
                   progress: Callable[[dict, Optional[str]], None], rounds: int) -> None:
    """``rounds`` rounds, each timing every path for its share of the calls, the order rotated
    a path a round (no path always first); rounds after the first are dropped past the budget.
    With more than one path, each block starts with ``REWARM_CALLS`` untimed calls."""
    iters = ctx.args.generate_iters if kind_of(case) == "generate" else ctx.args.iters
    rounds = max(1, min(rounds, iters))
    rewarm = min(REWARM_CALLS, ctx.args.warmup) if len(runs) > 1 else 0
    for index in range(rounds):
        if index and ctx.over_budget():
            break  # the rounds done stand; the next would start after the budget
        calls = iters // rounds + (1 if index < iters % rounds else 0)
        shift = index % max(1, len(runs))
        for run in runs[shift:] + runs[:shift]:
            if run.alive:
                progress(model, run.path)
                _crash_hook(f"{case.name}/{run.path}", "timing")
                time_block(run, calls, rewarm, ctx)


# ---------------------------------------------------------------------------------------------
# Child processes (--isolate): the parent side is benchmarks/model_children.py


CHILD_ARGS = ("device", "iters", "rounds", "warmup", "generate_iters", "train_iters", "cgtree_compiler", "daemon_compile",
              "max_new_tokens", "smoke")


class DaemonGone(Exception):
    """In a child: the parent's cgtreed died before a cgtreed path (the parent restarts it)."""


def process_alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def in_process_entries(cases: list[real_models.ModelCase], ctx: Context) -> Iterator[dict]:
    """Every model's entry, in order, all in this process (``--no-isolate``)."""
    for case in cases:
        if ctx.over_budget():
            entry = new_model_entry(case)
            entry["status"], entry["note"] = "skipped", BUDGET_NOTE
            yield entry
        else:
            yield run_model(case, ctx, ctx.args.paths)


def isolated_entries(cases: list[real_models.ModelCase], ctx: Context) -> Iterator[dict]:
    """Every model's entry, in order, from as few child processes as crashes allow."""
    items = []
    for case in cases:
        item = model_children.WorkItem(case, new_model_entry(case), list(ctx.args.paths), order=list(ctx.args.paths))
        missing = real_models.missing_library(case)
        if missing is not None:
            item.entry["status"], item.entry["note"] = "skipped", f"skipped: {missing}"
        items.append(item)
    yield from model_children.run_isolated(
        items, ctx, script=Path(__file__).resolve(), child_args={k: getattr(ctx.args, k) for k in CHILD_ARGS},
        path_row=lambda **fields: PathRow(**fields).to_json())


def child_main(config_path: str) -> int:
    """``--child CONFIG``: the config's models (``work``), each with its paths, in this process,
    until done or the deadline; the out file is rewritten at every model start, path start and
    path end (``model_children``: what the parent reads as progress)."""
    import json

    config = json.loads(Path(config_path).read_text())
    args = argparse.Namespace(**config["args"])
    device = _setup_device(args.device)
    strict_fp32()
    ctx = Context(args, device, os.path.dirname(config_path), endpoint=config["endpoint"])
    ctx.deadline = config["deadline"]
    ctx.daemon_pid = config["daemon_pid"]
    doc: dict = {"models": [], "finished": 0, "running": None, "writes": 0}

    def write() -> None:
        doc["writes"] += 1
        tmp = config["out"] + ".tmp"
        Path(tmp).write_text(json.dumps(doc, default=str))
        os.replace(tmp, config["out"])

    for index, work in enumerate(config["work"]):
        if ctx.over_budget():
            break  # the parent marks the rest skipped
        case = real_models.CASES[work["model"]]
        doc["models"].append(new_model_entry(case))
        write()

        def progress(model: dict, running: Optional[str], __index: int = index) -> None:
            doc["models"][__index] = model
            doc["running"] = None if running is None else {"model": model["name"], "path": running}
            write()

        try:
            doc["models"][index] = run_model(case, ctx, work["paths"], progress)
        except DaemonGone:
            write()
            return model_children.EXIT_DAEMON_GONE
        doc["finished"], doc["running"] = index + 1, None
        write()
    return 0


def _setup_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------------------------------
# Summary and reports


def _geomean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(models: list[dict], paths: list[str]) -> dict:
    graphed, speedups, ratios = {}, {}, {}
    for path in paths:
        if path == "eager":
            continue
        rows = [m["paths"].get(path) for m in models]
        counted = [r for r in rows if r is not None and (r["graphed"] is not None or r["status"] == "error")
                   and r["status"] not in ("n/a", "skipped")]
        graphed[path] = {"graphed": sum(1 for r in counted if r["graphed"]), "of": len(counted)}
        values = []
        for m in models:
            row, eager, ro = m["paths"].get(path), m["paths"].get("eager"), m["paths"].get("reduce-overhead")
            if not (row and eager and row["graphed"] and row["p50_us"] and eager["p50_us"]):
                continue
            if path != "reduce-overhead" and ro is not None and ro["status"] not in ("n/a", "skipped") and not ro["graphed"]:
                continue
            values.append(eager["p50_us"] / row["p50_us"])
        speedups[path] = {"geomean": _geomean(values), "models": len(values)}
    for path in ("cgtree", "cgtreed"):
        if path not in paths or "reduce-overhead" not in paths:
            continue
        values = []
        for m in models:
            row, ro = m["paths"].get(path), m["paths"].get("reduce-overhead")
            if row and ro and row["graphed"] and ro["graphed"] and row["p50_us"] and ro["p50_us"]:
                values.append(row["p50_us"] / ro["p50_us"])
        ratios[f"{path}/reduce-overhead"] = {"geomean": _geomean(values), "models": len(values)}
    return {"graphed": graphed, "speedup_over_eager": speedups, "ratio_to_reduce_overhead": ratios}


def not_graphed_where_reduce_overhead_is(models: list[dict]) -> list[str]:
    missed = []
    for m in models:
        ro = m["paths"].get("reduce-overhead")
        if not (ro and ro["graphed"]):
            continue
        for path in ("cgtree", "cgtreed"):
            row = m["paths"].get(path)
            if row is not None and row["graphed"] is False:
                missed.append(f"{m['name']}/{path}")
    return missed


def aten_code_in_daemon(models: list[dict]) -> list[str]:
    """``model/graph: why`` for each cgtreed graph that runs ATen code although the daemon compiles."""
    return [f"{m['name']}/{graph['graph']}: {graph['note']}" for m in models
            for graph in uncompiled_graphs(((m["paths"].get("cgtreed") or {}).get("details") or {}).get("kernels") or [])]


def failed_rows(models: list[dict]) -> list[str]:
    failed = []
    for m in models:
        if m["status"] == "error":
            failed.append(m["name"])
        for path, row in m["paths"].items():
            if row["status"] in ("error", "incorrect"):
                failed.append(f"{m['name']}/{path}")
    return failed


def _graphed_cell(row: dict) -> str:
    if row["status"] in ("n/a", "skipped"):
        return "n/a"
    if row["graphed"] is None:
        return "n/a" if row["status"] != "error" else "-"
    return "yes" if row["graphed"] else "NO"


def _match_cell(row: dict) -> str:
    if row["status"] == "error":
        return "ERROR"
    if row["max_rel_err"] is None:
        return "-"
    tag = "ok" if row["status"] == "ok" else "FAIL"
    return f"{tag} ({row['max_rel_err']:.0e})"


def render_markdown(report: dict) -> str:
    env, config, models = report["environment"], report["config"], report["models"]
    paths = config["paths"]
    lines = [
        "## Real models through torch.compile paths",
        "",
        f"torch {env['torch']} (CUDA {env['torch_cuda']}), transformers {env.get('transformers') or '-'}, "
        f"timm {env.get('timm') or '-'}, torchvision {env.get('torchvision') or '-'}, Python {env['python']}, "
        f"device {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else "")
        + f", cgtree {env.get('cgtree_commit') or '?'}. Sync p50 over {config['iters']} calls "
        f"({config['generate_iters']} generate calls; {config['train_iters']} training steps) after "
        f"{config['warmup']} warmup calls; match: relative error <= {config['max_rel_err']:g} against eager "
        f"(generate: identical tokens); graphed: from counters."
        + (" CPU smoke run: the numbers mean nothing." if config.get("smoke") else ""),
        "",
    ]
    header = ["model", "family"]
    for path in paths:
        header += [f"{path} p50 (us)"] + ([] if path == "eager" else [f"{path} graphed"]) + [f"{path} match"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" if "p50" in h else "---" for h in header) + "|")
    notes: list[str] = []
    shared_notes: list[str] = []
    for m in models:
        cells = [m["name"], m["family"]]
        if m["status"] != "ok":
            cells.append(m["note"] or m["status"])
            cells += [""] * (len(header) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        for path in paths:
            row = m["paths"].get(path)
            if row is None:
                cells += ["-"] * (2 if path == "eager" else 3)
                continue
            if row["status"] in ("n/a", "skipped"):
                cells += [row["status"]] + ([] if path == "eager" else ["n/a"]) + ["-"]
                shared = f"- {path}: {row['note'] or row['status']}"
                if row["status"] == "n/a" and shared not in shared_notes:
                    shared_notes.append(shared)
                elif row["status"] == "skipped":
                    notes.append(f"- {m['name']} / {path}: {row['note']}")
                continue
            cells += [_fmt(row["p50_us"])] + ([] if path == "eager" else [_graphed_cell(row)]) + [_match_cell(row)]
            if row["status"] in ("error", "incorrect") or row["graphed"] is False or (
                    path != "eager" and row["graphed_note"] and (row["graphed"] is None or "but" in row["graphed_note"])):
                notes.append(f"- {m['name']} / {path}: " + "; ".join(
                    x for x in (row["note"], row["graphed_note"]) if x))
            for graph in uncompiled_graphs((row.get("details") or {}).get("kernels") or []):
                notes.append(f"- {m['name']} / {path}: graph {graph['graph']} runs ATen code, not inductor's ({graph['note']})")
        lines.append("| " + " | ".join(cells) + " |")
    summary = report["summary"]
    lines += ["", "| path | graphed | geomean speed-up over eager (models) |", "|---|---:|---:|"]
    for path, counts in summary["graphed"].items():
        speed = summary["speedup_over_eager"].get(path) or {}
        value = "-" if speed.get("geomean") is None else f"{speed['geomean']:.2f}x ({speed['models']})"
        lines.append(f"| {path} | {counts['graphed']} of {counts['of']} | {value} |")
    if summary["ratio_to_reduce_overhead"]:
        lines += ["", "| ratio (sync p50, models graphed on both) | geomean (models) |", "|---|---:|"]
        for key, ratio in summary["ratio_to_reduce_overhead"].items():
            value = "-" if ratio["geomean"] is None else f"{ratio['geomean']:.2f}x ({ratio['models']})"
            lines.append(f"| {key} | {value} |")
    if notes or shared_notes:
        lines += ["", "Not graphed, not compiled, failed, skipped or n/a, and why:", "", *shared_notes, *notes]
    if report.get("interrupted"):
        lines += ["", f"Stopped early: {report['interrupted']}."]
    lines.append("")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    for name in ("transformers", "timm", "torchvision"):
        env[name] = None
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            env[name] = version(name)
    env["cgtree_commit"] = source_revision()
    return env


# ---------------------------------------------------------------------------------------------
# Command line


def _split(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v for v in value.split(",") if v]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"cuda, cuda:N or cpu (default {default_device})")
    parser.add_argument("--models", default=None, help=f"comma-separated names (default all; --smoke: {','.join(SMOKE_MODELS)})")
    parser.add_argument("--families", default=None, help=f"comma-separated ({', '.join(real_models.FAMILIES)})")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated (default {','.join(PATHS)}; eager always runs)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per model and path (default 200; cpu 5; smoke 3)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timing rounds of a forward model's paths, side by side (default 20; cpu and smoke 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before them (default 64; cpu 5; smoke 2)")
    parser.add_argument("--generate-iters", type=int, default=None, help="timed generate calls (default 5; smoke 1)")
    parser.add_argument("--train-iters", type=int, default=None, help="timed training steps (default 20; smoke 2)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke mode: a few small models, tiny iteration counts")
    parser.add_argument("--cgtree-compiler", choices=("auto", "eager", "inductor"), default="auto",
                        help="backend='cgtree' options['compiler'] (default auto, cgtree's default: inductor on cuda, eager on cpu)")
    parser.add_argument("--daemon-compile", choices=("auto", "eager", "inductor"), default="auto",
                        help="cgtreed's daemon.compile (default auto, the daemon's default: inductor on cuda, eager on cpu)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="start no model/path run after S seconds; report what ran")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "bench_models.json")
    parser.add_argument("--md", type=Path, default=None, help="markdown table (default: --json with .md)")
    parser.add_argument("--fresh-inductor-cache", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                        help="each model in a child process (default): a crash costs one path, not the run")
    parser.add_argument("--model-timeout", type=float, default=None, metavar="S",
                        help="kill a model's child process after S seconds (default 480; cpu 240)")
    parser.add_argument("--fail-unless-graphed", action="store_true",
                        help="exit 3 when a model reduce-overhead graphs is not graphed by cgtree or cgtreed")
    args = parser.parse_args(argv)
    args.paths = _split(args.paths) or []
    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s): {', '.join(unknown)}")
    args.paths = ["eager"] + [p for p in PATHS[1:] if p in args.paths]
    names, families = _split(args.models), _split(args.families)
    if names is None and families is None and args.smoke:
        names = list(SMOKE_MODELS)
    try:
        args.cases = real_models.cases(families=families, names=names)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    cuda = torch.device(args.device).type == "cuda"
    small = args.smoke or not cuda
    args.iters = args.iters or (3 if args.smoke else (5 if not cuda else 200))
    # 64 on CUDA: a cgtreed steady loop gets its plan's own recording after 50 runs
    # (daemon/plans.py DIRECT_AFTER_RUNS); the timed calls should see the steady state of every path.
    args.warmup = args.warmup if args.warmup is not None else (2 if args.smoke else (5 if not cuda else 64))
    args.rounds = args.rounds or (1 if small else DEFAULT_CUDA_ROUNDS)
    args.model_timeout = args.model_timeout or (240.0 if not cuda else 480.0)
    args.generate_iters = args.generate_iters or (1 if small else 5)
    args.train_iters = args.train_iters or (2 if small else 20)
    args.max_new_tokens = real_models.GENERATE_NEW_TOKENS
    if args.md is None:
        args.md = args.json.with_suffix(".md")
    return args


class _Stop(Exception):
    pass


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"] and len(argv) == 2:
        return child_main(argv[1])
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu (--smoke) for a smoke run", file=sys.stderr)
        return 2
    device = _setup_device(args.device)
    strict_fp32()
    # Legacy CUDA IPC cannot share expandable segments: the inputs the cgtreed path passes by IPC
    # come from this process's allocator (as in bench_compile.py).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    workdir = tempfile.mkdtemp(prefix="cgm-", dir="/tmp")  # short: ipc:// socket paths
    if args.fresh_inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(workdir, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(workdir, "triton")
    ctx = Context(args, device, workdir, budget_s=args.time_budget)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise _Stop("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    report = {
        "benchmark": "models",
        "schema": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "config": {"device": str(device), "paths": args.paths, "models": [c.name for c in args.cases],
                   "iters": args.iters, "rounds": args.rounds, "warmup": args.warmup, "generate_iters": args.generate_iters,
                   "train_iters": args.train_iters, "max_new_tokens": args.max_new_tokens,
                   "cgtree_compiler": args.cgtree_compiler, "daemon_compile": args.daemon_compile,
                   "max_rel_err": MAX_REL_ERR, "smoke": args.smoke, "time_budget_s": args.time_budget,
                   "fresh_inductor_cache": args.fresh_inductor_cache, "tf32": False,
                   "isolate": args.isolate, "model_timeout_s": args.model_timeout},
        "models": [],
        "interrupted": None,
    }

    def finish() -> None:
        report["summary"] = summarize(report["models"], args.paths)
        report["failed"] = failed_rows(report["models"])
        report["not_graphed_where_reduce_overhead_is"] = not_graphed_where_reduce_overhead_is(report["models"])
        report["aten_code_in_daemon"] = aten_code_in_daemon(report["models"])
        report["ok"] = not report["failed"]

    started = time.monotonic()
    try:
        for entry in (isolated_entries if args.isolate else in_process_entries)(args.cases, ctx):
            if entry["note"] == BUDGET_NOTE and report["interrupted"] is None:
                report["interrupted"] = f"time budget of {args.time_budget:g} s spent after {time.monotonic() - started:.0f} s"
            report["models"].append(entry)
            finish()
            # Rewritten after every model: a run killed from outside still leaves its rows.
            with contextlib.suppress(Exception):
                args.json.parent.mkdir(parents=True, exist_ok=True)
                import json

                args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    except (KeyboardInterrupt, _Stop) as exc:
        report["interrupted"] = f"{type(exc).__name__} {exc}".strip()
    finally:
        signal.signal(signal.SIGTERM, previous)
        ctx.close()
        with contextlib.suppress(Exception):
            from benchmarks.bench_daemon import stop_all_processes

            stop_all_processes()
        report["daemon_starts"] = ctx.daemon_starts
        report["child_starts"] = ctx.child_starts
        shutil.rmtree(workdir, ignore_errors=True)
    report["wall_s"] = round(time.monotonic() - started, 1)
    finish()
    write_reports(report, render_markdown(report), args.json, args.md)
    if report["failed"]:
        print(f"FAILED: {', '.join(report['failed'])}", file=sys.stderr)
        return 2
    if args.fail_unless_graphed and report["not_graphed_where_reduce_overhead_is"]:
        print(f"not graphed where reduce-overhead is: {', '.join(report['not_graphed_where_reduce_overhead_is'])}",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
