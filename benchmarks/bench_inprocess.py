#!/usr/bin/env python3
"""In-process per-call latency: cgtree against eager, PyTorch's graph trees and a bare CUDA graph.

One run measures, for each model (``benchmarks/models.py``) and each *path* below, the
synchronous per-call latency (p50, p99), the asynchronous mean, the cold start (first three
calls) and correctness against eager; it prints a markdown table, writes it to ``--md`` and
writes everything to ``--json``. Ratios cgtree / other come from the same run, so machine and
clock state cancel out.

Paths (names as in the tables):

- ``eager``: ``module(x)``.
- ``reduce-overhead``: ``torch.compile(module, mode="reduce-overhead", fullgraph=True)``:
  dynamo guards + inductor kernels + PyTorch's CUDA graph trees. What users run today.
- ``torch-tree``: PyTorch's tree manager called directly through
  ``torch._inductor.cudagraph_trees.cudagraphify_impl``, with no dynamo and no inductor: the
  same eager kernels as cgtree records, so the difference to ``cgtree`` is the tree
  machinery's own per-call cost. This is the reference cgtree must beat.
- ``cuda-graph``: a hand-written ``torch.cuda.CUDAGraph``: ``static_x.copy_(x); g.replay();
  return static_out``. The floor for "copy the input in and replay", no bookkeeping at all.
- ``cgtree``: ``cgtree.manager.TreeManager(device).cudagraphify(...)``.

How the two tree managers are driven (kept identical, so that only the managers differ):

- Both record ``BenchModel.forward_flat(*params, x)``: the module's parameters are leading
  arguments marked as static inputs (``static_input_idxs = range(len(params))``): used in
  place, their addresses checked, never copied. The activation ``x`` is an ordinary input,
  copied into the graph's own input buffer on every replay. This is how cgtree's daemon hands
  weights to ``cudagraphify`` and how ``torch.compile`` hands parameters to PyTorch's trees.
- Every call passes the parameter tensors and the activation anew: PyTorch's boxed
  convention as ``f([*params, x])`` (the list is consumed by the callee), cgtree's as
  ``f(*params, x)``. Both return a one-element sequence; the benchmark takes element 0.
- Outputs are dropped before the next call and no step markers are used: each tree manager
  must notice on its own that the previous outputs are dead and replay the same root.
- Both are called under ``torch.no_grad()`` (PyTorch's with ``is_inference=True``, cgtree's
  with ``kind="inference"`` and its default ``top_level=True``: each call is a top-level
  invocation, as a ``torch.compile``d function's is), as is every other path.

Measurement: every path of a model is set up first (cold start timed then), then ``--rounds``
rounds each time every path in turn (the order rotated each round, so no path always runs
right after the same neighbour), each round ``--warmup`` untimed calls, ``--iters`` synchronous
samples and ``--iters`` back-to-back calls. p50/p99 pool the samples of all rounds; the spread
of the per-round p50s is in the JSON, a difference between paths smaller than it is noise.

``--device cpu`` is a smoke mode for machines without a GPU: only ``eager`` and ``cgtree``
(its CPU replay backend) run; the CUDA-only paths are reported n/a.

Exit status: 0 when every path that could run ran and matched eager; 2 when a path failed or
disagreed with eager; 3 with ``--fail-on-target`` when a performance target was missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Run as a file: make ``benchmarks`` (and the working tree's ``cgtree``) importable.
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.models import BenchModel, build_model, model_names  # noqa: E402
from benchmarks.revision import source_revision  # noqa: E402
from benchmarks.report import fmt as _fmt, fmt_ratio as _fmt_ratio, exit_status, reset_torch_graph_state, write_reports  # noqa: E402
from benchmarks.timing import async_mean, summarize_ns, sync_samples_ns, timed_calls_ms  # noqa: E402

PATHS = ("eager", "reduce-overhead", "torch-tree", "cuda-graph", "cgtree")
CUDA_ONLY_PATHS = frozenset({"reduce-overhead", "torch-tree", "cuda-graph"})
COLD_START_CALLS = 3

# Relative error ||out - ref|| / ||ref|| allowed against eager. The graph paths run eager's own
# kernels (near bit-identical); inductor fuses and reorders float32 arithmetic (about 1e-6
# here). A stale input or output -- the failure this check exists for -- is of order 1.
MAX_REL_ERR = 1e-3

# Targets of the issue, checked on sync p50 for every model.
TARGET_VS_TORCH_TREE = 1.0
TARGET_VS_CUDA_GRAPH = 1.5


@dataclass
class PreparedPath:
    """A path ready to be timed: ``invoke(*activations)`` returns the model's output tensor."""

    name: str
    invoke: Callable[..., torch.Tensor]
    cold_start_ms: list[float]
    close: Callable[[], None] = lambda: None
    # Called after timing; returns what the path knows about itself (e.g. tree counters).
    describe: Callable[[], dict[str, Any]] = dict


@dataclass
class PathResult:
    name: str
    status: str = "ok"  # ok | n/a | error | incorrect
    note: str = ""
    sync: dict[str, Any] | None = None
    sync_round_p50_us: list[float] = field(default_factory=list)
    async_mean_us: float | None = None
    async_round_us: list[float] = field(default_factory=list)
    cold_start_ms: dict[str, Any] | None = None
    max_rel_err: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # Raw samples of all rounds, in nanoseconds; dropped before writing the JSON.
    samples_ns: list[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "note": self.note,
            "sync": self.sync,
            "sync_round_p50_us": self.sync_round_p50_us,
            "async_mean_us": self.async_mean_us,
            "async_round_us": self.async_round_us,
            "cold_start_ms": self.cold_start_ms,
            "max_rel_err": self.max_rel_err,
            "details": self.details,
        }


# ---------------------------------------------------------------------------------------------
# Path setup. Each returns a PreparedPath whose first COLD_START_CALLS calls are already made
# (and timed) on the model's example input.
# ---------------------------------------------------------------------------------------------


def _cold_start(invoke: Callable[..., torch.Tensor], model: BenchModel, sync) -> list[float]:
    return timed_calls_ms(lambda: invoke(*model.inputs), COLD_START_CALLS, sync)


def setup_eager(model: BenchModel, device: torch.device, sync) -> PreparedPath:
    invoke = model.module
    return PreparedPath("eager", invoke, _cold_start(invoke, model, sync))


def setup_reduce_overhead(model: BenchModel, device: torch.device, sync) -> PreparedPath:
    compiled = torch.compile(model.module, mode="reduce-overhead", fullgraph=True)
    # First call: dynamo trace + inductor compile + warmup; second: record; third: replay.
    return PreparedPath("reduce-overhead", compiled, _cold_start(compiled, model, sync))


def setup_torch_tree(model: BenchModel, device: torch.device, sync) -> PreparedPath:
    from torch._inductor import cudagraph_trees

    def boxed_forward(args: list[torch.Tensor]) -> list[torch.Tensor]:
        # Boxed convention: the callee takes ownership of the argument list and empties it,
        # so that inputs can be freed as early as possible. The tree manager checks this.
        tensors = tuple(args)
        args.clear()
        return [model.forward_flat(*tensors)]

    statics = model.static_tensors
    tree_fn = cudagraph_trees.cudagraphify_impl(
        boxed_forward,
        [*statics, *model.inputs],
        tuple(range(model.num_static)),
        device_index=device.index,
        is_backward=False,
        is_inference=True,
    )

    def invoke(*activations: torch.Tensor) -> torch.Tensor:
        return tree_fn([*statics, *activations])[0]

    def describe() -> dict[str, Any]:
        container = cudagraph_trees.get_container(device.index)
        manager = container.tree_manager
        if manager is None:
            return {}
        roots = list(manager.get_roots())
        # This manager is shared with the reduce-overhead path (one per device and thread),
        # so these counts cover both functions.
        return {
            "shared_manager_roots": len(roots),
            "shared_manager_nodes": sum(1 + r.num_descendants() for r in roots),
        }

    return PreparedPath("torch-tree", invoke, _cold_start(invoke, model, sync), describe=describe)


def setup_cuda_graph(model: BenchModel, device: torch.device, sync) -> PreparedPath:
    start_ns = _now_ns()
    static_inputs = tuple(t.clone() for t in model.inputs)
    # Warm up on a side stream before capture, as torch.cuda.graphs documents: lazy
    # initialisation (cuBLAS workspaces, autotuning) must not happen inside the capture.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            model.module(*static_inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model.module(*static_inputs)
    sync()
    capture_ms = (_now_ns() - start_ns) / 1e6

    def invoke(*activations: torch.Tensor) -> torch.Tensor:
        for dst, src in zip(static_inputs, activations, strict=True):
            dst.copy_(src)
        graph.replay()
        return static_out

    # Cold start here = warmup + capture, then the first replay (2 more calls to make 3).
    first = timed_calls_ms(lambda: invoke(*model.inputs), COLD_START_CALLS - 1, sync)
    return PreparedPath("cuda-graph", invoke, [capture_ms, *first], close=graph.reset)


def setup_cgtree(model: BenchModel, device: torch.device, sync) -> PreparedPath:
    from cgtree.manager import TreeManager

    manager = TreeManager(str(device))

    def flat_forward(*tensors: torch.Tensor) -> tuple[torch.Tensor]:
        return (model.forward_flat(*tensors),)

    statics = model.static_tensors
    cg_fn = manager.cudagraphify(
        flat_forward,
        [*statics, *model.inputs],
        static_input_idxs=tuple(range(model.num_static)),
        name=f"bench.{model.name}",
        kind="inference",
    )

    def invoke(*activations: torch.Tensor) -> torch.Tensor:
        return cg_fn(*statics, *activations)[0]

    def describe() -> dict[str, Any]:
        # Read defensively: a missing attribute must not cost the run its numbers.
        info: dict[str, Any] = {"backend": getattr(manager, "backend_name", None)}
        last = getattr(manager, "last_execution", None)
        if last is not None:
            mode = getattr(last, "mode", None)
            info["last_execution_mode"] = str(getattr(mode, "value", mode))
        counters = getattr(manager, "counters", None)
        if counters is not None:
            info["counters"] = {k: v for k, v in dict(counters).items() if _jsonable(v)}
        with contextlib.suppress(Exception):
            info["root_children"] = list(manager.root_children())
        return info

    return PreparedPath(
        "cgtree",
        invoke,
        _cold_start(invoke, model, sync),
        close=manager.close,
        describe=describe,
    )


SETUPS: dict[str, Callable[[BenchModel, torch.device, Any], PreparedPath]] = {
    "eager": setup_eager,
    "reduce-overhead": setup_reduce_overhead,
    "torch-tree": setup_torch_tree,
    "cuda-graph": setup_cuda_graph,
    "cgtree": setup_cgtree,
}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _now_ns() -> int:
    return time.perf_counter_ns()


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when shapes differ or out is not finite."""
    if out.shape != ref.shape:
        return float("inf")
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item() or 1.0
    return (out64 - ref64).norm().item() / denom


def check_against_eager(prepared: PreparedPath, model: BenchModel, seeds: list[int]) -> float:
    """Largest relative error over fresh inputs; outputs are cloned before the next call.

    Several different inputs in a row: a graph path that replayed a stale input or returned
    the previous call's output would match eager on one input but not on the next.
    """
    worst = 0.0
    for seed in seeds:
        inputs = model.fresh_inputs(seed)
        reference = model.module(*inputs).clone()
        out = prepared.invoke(*inputs).clone()
        worst = max(worst, relative_error(out, reference))
    return worst


def measure_round(prepared: PreparedPath, result: PathResult, model: BenchModel, args, sync) -> None:
    inputs = model.inputs
    invoke = prepared.invoke

    def call() -> None:
        invoke(*inputs)  # output dropped at once: see module docstring

    samples = sync_samples_ns(call, args.iters, args.warmup, sync)
    result.samples_ns.extend(samples)
    result.sync_round_p50_us.append(summarize_ns(samples).p50_us)
    result.async_round_us.append(async_mean(call, args.iters, args.warmup, sync))


def bench_model(name: str, args, device: torch.device, sync) -> dict[str, Any]:
    model = build_model(name, device, seed=args.seed)
    results = {p: PathResult(p) for p in args.paths}
    prepared: dict[str, PreparedPath] = {}
    check_seeds = [args.seed + 100 + i for i in range(3)]

    for path in args.paths:
        result = results[path]
        if path in CUDA_ONLY_PATHS and device.type != "cuda":
            result.status, result.note = "n/a", "needs CUDA"
            continue
        try:
            prepared[path] = SETUPS[path](model, device, sync)
            cold = prepared[path].cold_start_ms
            result.cold_start_ms = {"calls": cold, "total": sum(cold)}
            result.max_rel_err = check_against_eager(prepared[path], model, check_seeds)
        except Exception as exc:  # one broken path must not hide the others' numbers
            result.status, result.note = "error", f"setup: {type(exc).__name__}: {exc}"
            traceback.print_exc()
            prepared.pop(path, None)

    active = [p for p in args.paths if p in prepared]
    for round_index in range(args.rounds):
        shift = round_index % max(1, len(active))
        for path in active[shift:] + active[:shift]:
            try:
                measure_round(prepared[path], results[path], model, args, sync)
            except Exception as exc:
                results[path].status = "error"
                results[path].note = f"timing: {type(exc).__name__}: {exc}"
                traceback.print_exc()
                active.remove(path)

    for path in list(prepared):
        result = results[path]
        if result.status == "ok" and result.samples_ns:
            result.sync = summarize_ns(result.samples_ns).to_dict()
            result.async_mean_us = sum(result.async_round_us) / len(result.async_round_us)
            try:
                # Checked again after thousands of replays: bookkeeping that drifts shows here.
                after = check_against_eager(prepared[path], model, [s + 50 for s in check_seeds])
                result.max_rel_err = max(result.max_rel_err or 0.0, after)
            except Exception as exc:
                result.status, result.note = "error", f"check: {type(exc).__name__}: {exc}"
                traceback.print_exc()
        try:
            result.details = prepared[path].describe()
        except Exception as exc:  # diagnostics only: never fails the path
            result.details = {"describe_error": f"{type(exc).__name__}: {exc}"}
        if result.status == "ok" and not (result.max_rel_err is not None and result.max_rel_err <= MAX_REL_ERR):
            result.status = "incorrect"
            result.note = f"max relative error {result.max_rel_err:.3g} > {MAX_REL_ERR:g}"

    for path in reversed(list(prepared)):
        with contextlib.suppress(Exception):
            prepared[path].close()
    prepared.clear()
    if device.type == "cuda":
        reset_torch_graph_state()

    return {
        "description": model.spec.description,
        "batch": model.spec.batch,
        "num_static_inputs": model.num_static,
        "paths": {p: r.to_json() for p, r in results.items()},
        "ratios": compute_ratios(results),
    }


def compute_ratios(results: dict[str, PathResult]) -> dict[str, dict[str, float | None]]:
    """cgtree / other for sync p50, sync p99 and async mean; None where either is missing."""
    mine = results.get("cgtree")
    ratios: dict[str, dict[str, float | None]] = {}
    for other in ("torch-tree", "cuda-graph", "reduce-overhead", "eager"):
        theirs = results.get(other)
        ratios[f"cgtree/{other}"] = {
            metric: _ratio(_metric(mine, metric), _metric(theirs, metric))
            for metric in ("sync_p50", "sync_p99", "async_mean")
        }
    return ratios


def _metric(result: PathResult | None, metric: str) -> float | None:
    if result is None or result.status != "ok":
        return None
    if metric == "async_mean":
        return result.async_mean_us
    if result.sync is None:
        return None
    return result.sync["p50_us" if metric == "sync_p50" else "p99_us"]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def evaluate_targets(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    targets = []
    for model, data in models.items():
        for other, limit in (("torch-tree", TARGET_VS_TORCH_TREE), ("cuda-graph", TARGET_VS_CUDA_GRAPH)):
            ratio = data["ratios"][f"cgtree/{other}"]["sync_p50"]
            targets.append(
                {
                    "model": model,
                    "target": f"cgtree sync p50 <= {limit:g} x {other}",
                    "ratio": ratio,
                    "limit": limit,
                    "status": "n/a" if ratio is None else ("pass" if ratio <= limit else "fail"),
                }
            )
    return targets


# ---------------------------------------------------------------------------------------------
# Environment and reports
# ---------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "gpu": None,
        "cgtree_commit": source_revision(),
    }
    with contextlib.suppress(Exception):
        import cgtree

        env["cgtree_version"] = getattr(cgtree, "__version__", None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env




def render_markdown(report: dict[str, Any]) -> str:
    env, config = report["environment"], report["config"]
    lines = [
        "## In-process per-call latency",
        "",
        f"torch {env['torch']} (CUDA {env['torch_cuda']}), Python {env['python']}, "
        f"device {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else "")
        + f", cgtree {env.get('cgtree_commit') or '?'}; "
        f"{config['rounds']} rounds x {config['iters']} calls per path, {config['warmup']} warmup calls per round; "
        f"under torch.no_grad().",
        "",
    ]
    for name, data in report["models"].items():
        lines += [
            f"### {name}: {data['description']}",
            "",
            "| path | sync p50 (us) | sync p99 (us) | async mean (us) | cold start, 3 calls (ms) | max rel err | status |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for path, row in data["paths"].items():
            sync = row["sync"] or {}
            cold = (row["cold_start_ms"] or {}).get("total")
            err = row["max_rel_err"]
            status = row["status"] + (f" ({row['note']})" if row["note"] else "")
            lines.append(
                f"| {path} | {_fmt(sync.get('p50_us'))} | {_fmt(sync.get('p99_us'))} | "
                f"{_fmt(row['async_mean_us'])} | {_fmt(cold, 2)} | "
                f"{'-' if err is None else f'{err:.1e}'} | {status} |"
            )
        lines += ["", "| cgtree / other | sync p50 | sync p99 | async mean |", "|---|---:|---:|---:|"]
        for key, ratio in data["ratios"].items():
            lines.append(
                f"| {key} | {_fmt_ratio(ratio['sync_p50'])} | {_fmt_ratio(ratio['sync_p99'])} | "
                f"{_fmt_ratio(ratio['async_mean'])} |"
            )
        lines.append("")
    lines += ["### Targets", "", "| model | target | cgtree / other | result |", "|---|---|---:|---|"]
    for target in report["targets"]:
        lines.append(
            f"| {target['model']} | {target['target']} | {_fmt_ratio(target['ratio'])} | {target['status']} |"
        )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (smoke mode)")
    parser.add_argument(
        "--models",
        default=",".join(model_names()),
        help=f"comma-separated model names (default: all: {','.join(model_names())})",
    )
    parser.add_argument(
        "--paths", default=",".join(PATHS), help=f"comma-separated paths (default: all: {','.join(PATHS)})"
    )
    parser.add_argument("--iters", type=int, default=2000, help="timed calls per path per round (default 2000)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per path per round (default iters/10, at least 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all paths (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "bench_inprocess.json")
    parser.add_argument("--md", type=Path, default=None, help="markdown table (default: --json with .md)")
    parser.add_argument(
        "--fresh-inductor-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile into an empty temporary inductor/triton cache, so reduce-overhead's cold "
        "start is a true cold start on every run (default: on)",
    )
    parser.add_argument("--fail-on-target", action="store_true", help="exit 3 when a target is missed")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = [m for m in args.models if m not in model_names()] + [p for p in args.paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown model or path: {', '.join(unknown)}")
    if "eager" not in args.paths:
        args.paths.insert(0, "eager")  # the reference for correctness; it also initialises cuBLAS
    if args.iters < 1 or args.rounds < 1:
        parser.error("--iters and --rounds must be at least 1")
    if args.warmup is None:
        args.warmup = max(5, args.iters // 10)
    if args.md is None:
        args.md = args.json.with_suffix(".md")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available; use --device cpu for a smoke run", file=sys.stderr)
            return 2
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
        sync = torch.cuda.synchronize
    elif device.type == "cpu":
        sync = lambda: None  # noqa: E731
    else:
        print(f"unsupported device {device}", file=sys.stderr)
        return 2

    cache_dir = None
    if args.fresh_inductor_cache:
        # Read by inductor and triton when they first compile, which is after this point.
        cache_dir = tempfile.mkdtemp(prefix="cgtree-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")

    report: dict[str, Any] = {
        "benchmark": "inprocess",
        "schema": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "config": {
            "device": str(device),
            "models": args.models,
            "paths": args.paths,
            "iters": args.iters,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "seed": args.seed,
            "fresh_inductor_cache": args.fresh_inductor_cache,
            "grad_mode": "no_grad",
            "max_rel_err": MAX_REL_ERR,
            "cold_start_calls": COLD_START_CALLS,
        },
        "models": {},
    }
    try:
        with torch.no_grad():
            for name in args.models:
                print(f"[bench_inprocess] {name} on {device} ...", file=sys.stderr, flush=True)
                report["models"][name] = bench_model(name, args, device, sync)
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)

    report["targets"] = evaluate_targets(report["models"])
    failed_paths = [
        f"{model}/{path}"
        for model, data in report["models"].items()
        for path, row in data["paths"].items()
        if row["status"] in ("error", "incorrect")
    ]
    missed = [t for t in report["targets"] if t["status"] == "fail"]
    report["ok"] = not failed_paths
    report["failed_paths"] = failed_paths

    write_reports(report, render_markdown(report), args.json, args.md)
    return exit_status(failed_paths, missed, args.fail_on_target)


if __name__ == "__main__":
    sys.exit(main())
