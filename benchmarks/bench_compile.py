#!/usr/bin/env python3
"""``torch.compile`` paths on a GPT-style decoder step: cgtree's backends beside eager and
reduce-overhead, in one run.

The model is ``benchmarks/gpt.py``'s decoder step (6 layers, d_model 512, batch 4, KV caches
of 256 positions updated in place at a position input). For each *path* below, one run
measures the per-step synchronous latency (p50, p99), the asynchronous mean, the cold start
(first three steps) and correctness against eager over a sequence of steps (logits and
caches); it prints a markdown table, writes it to ``--md`` and everything to ``--json``.

Paths:

- ``eager``: ``model(tokens, pos)``.
- ``reduce-overhead``: ``torch.compile(model, mode="reduce-overhead", fullgraph=True)``:
  inductor kernels under PyTorch's CUDA graph trees.
- ``cgtree``: ``torch.compile(model, backend="cgtree")`` with its defaults (on CUDA: the same
  inductor kernels), under cgtree's trees in this process. Compared with reduce-overhead,
  only the tree machinery differs.
- ``cgtree-aten``: ``backend="cgtree"`` with ``options={"compiler": "eager"}``: AOT's ATen
  graph recorded as it is (no kernel fusion); shows what the kernels are worth.
- ``daemon``: ``backend=cgtree.client.compile_backend.backend(client)`` with a ``cgtreed``
  this script starts (``--devices cuda:0``, ``daemon.compile`` its default, ``"auto"``:
  inductor on CUDA, compiled by the daemon's compile worker): each step is a
  submit; the caches travel by CUDA IPC with it, the parameters were uploaded once. A steady
  loop's steps ring the lane's doorbell page (``cgtree.daemon.doorbell``).
- ``daemon-lane``: the same daemon, a client with ``doorbell=False``: plan runs as lane
  datagrams with the daemon's host synchronize (the previous session's path), side by side.
- ``daemon-stream``: the same daemon, a client with ``stream_ordered_outputs=True`` (opt-in,
  ``cgtree.client.stream_order``): each step returns at the daemon's answer and the caller's
  stream waits for the done word, so the step's epilogue overlaps the device as in process.

Fairness: every path has its own model instance (same seed, so same weights) whose
``forward`` has its own code object, so each path has its own dynamo cache entry and guard
chain instead of walking the others'. All paths run under ``torch.no_grad()``, with the same
inputs; outputs are dropped before the next step (``benchmarks/timing.py``). Rounds rotate the
path order. Inductor compiles into an empty temporary cache (``--fresh-inductor-cache``).

``--device cpu`` is a smoke mode with tiny iteration counts: ``eager``, ``cgtree-aten`` and
``daemon`` (CPU replay backends, daemon compile "eager") run; the inductor paths are ``n/a``
(a cold inductor compile on the CPU takes ~18 s a graph). ``--paths`` picks paths.

Targets (sync p50): cgtree <= 1.0 x reduce-overhead; daemon <= 1.1 x reduce-overhead.
Exit status: 0 when every path that could run ran and matched eager; 2 when one failed or
disagreed; 3 with ``--fail-on-target`` when a target was missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Appended, not prepended: the repository's bare cgtree/ folder must not shadow an
    # installed cgtree (whose daemon/ and client/ map in), as in bench_daemon.py.
    sys.path.append(str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.gpt import GPTConfig, GPTStep, build_gpt, step_inputs  # noqa: E402
from benchmarks.revision import source_revision  # noqa: E402
from benchmarks.report import fmt as _fmt, fmt_ratio as _fmt_ratio, exit_status, write_reports  # noqa: E402
from benchmarks.timing import async_mean, summarize_ns, sync_samples_ns, timed_calls_ms  # noqa: E402

PATHS = ("eager", "reduce-overhead", "cgtree", "cgtree-aten", "daemon", "daemon-lane", "daemon-stream")
CUDA_ONLY_PATHS = frozenset({"reduce-overhead"})
INDUCTOR_PATHS = frozenset({"reduce-overhead", "cgtree"})
COLD_START_CALLS = 3
CHECK_STEPS = 6
# ||out - ref|| / ||ref|| against eager: inductor reorders float32 arithmetic (~1e-6); a stale
# cache or a replayed old input is of order 1.
MAX_REL_ERR = 1e-3
TARGETS = {"cgtree": 1.0, "daemon": 1.1}  # sync p50 / reduce-overhead sync p50

DAEMON_CONFIG = """\
[daemon]
compile = "{compile}"
max_message_bytes = 268435456
reap_interval_s = 0.5
session_timeout_s = 600.0
shutdown_timeout_s = 15.0
log_level = "INFO"
"""


@dataclass
class PreparedPath:
    name: str
    model: GPTStep
    invoke: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    cold_start_ms: list[float]
    describe: Callable[[], dict] = dict
    close: Callable[[], None] = lambda: None


@dataclass
class PathResult:
    name: str
    status: str = "ok"  # ok | n/a | error | incorrect
    note: str = ""
    sync: Optional[dict] = None
    sync_round_p50_us: list[float] = field(default_factory=list)
    async_mean_us: Optional[float] = None
    async_round_us: list[float] = field(default_factory=list)
    cold_start_ms: Optional[dict] = None
    max_rel_err: Optional[float] = None
    details: dict = field(default_factory=dict)
    samples_ns: list[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("name", "samples_ns")}


# ---------------------------------------------------------------------------------------------
# Paths


def own_forward(model: GPTStep, tag: str) -> GPTStep:
    """Give ``model`` a ``forward`` with its own code object (see Fairness in the docstring)."""
    forward = type(model).forward
    fields = {"co_name": f"forward_{tag.replace('-', '_')}"}
    code = forward.__code__.replace(**fields)
    function = types.FunctionType(code, forward.__globals__, fields["co_name"], forward.__defaults__, forward.__closure__)
    model.__class__ = type(f"GPTStep_{fields['co_name']}", (type(model),), {"forward": function})
    return model


class Context:
    """What the paths share: device, config, seed, the daemon (started on first use)."""

    def __init__(self, args, device: torch.device, sync: Callable[[], None], workdir: str) -> None:
        self.args = args
        self.device = device
        self.sync = sync
        self.cfg = GPTConfig(layers=args.layers, d_model=args.d_model, batch=args.batch, max_seq=args.max_seq)
        self.workdir = workdir
        self.daemon: Any = None
        self.client: Any = None
        self.lane_client: Any = None
        self.stream_client: Any = None

    def inputs(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return step_inputs(self.cfg, self.device, step, seed=self.args.seed)

    def model(self, tag: str) -> GPTStep:
        return own_forward(build_gpt(self.cfg, self.device, seed=self.args.seed), tag)

    def start_daemon(self) -> Any:
        if self.client is None:
            from cgtree.client import Client

            devices = str(self.device) if self.device.type == "cuda" else "cpu"
            self.daemon_compile = self.args.daemon_compile
            self.daemon = start_daemon(devices, os.path.join(self.workdir, "d"), self.daemon_compile)
            self.client = Client(self.daemon.endpoint, timeout_s=600)
        return self.client

    def close(self) -> None:
        for client in (self.lane_client, self.stream_client, self.client):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        if self.daemon is not None:
            self.daemon.stop()


@dataclass
class DaemonProcess:
    endpoint: str
    proc: Any
    log_path: str

    def stop(self) -> None:
        from benchmarks.bench_daemon import stop_process

        stop_process(self.proc, grace_s=20.0)


def _ping(endpoint: str, timeout_s: float) -> bool:
    """One raw ping on the process-wide ZeroMQ context (never terminated here), so that a
    daemon still starting up cannot leave a client context blocked in ``term()``."""
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb({"v": 1, "id": 1, "op": "ping", "body": {}}))
        return bool(sock.poll(int(timeout_s * 1000)))
    finally:
        sock.close(0)


def start_daemon(devices: str, workdir: str, compile_mode: str, timeout_s: float = 120.0,
                 boot: tuple[str, ...] = ("-m", "cgtree.daemon.main")) -> DaemonProcess:
    """``cgtreed`` as a child that dies with this process (bench_daemon's ``spawn``); ``boot``:
    how Python starts it (bench_models sets up the process first with ``-c``)."""
    from benchmarks.bench_daemon import child_env, python_argv, spawn

    os.makedirs(workdir, exist_ok=True)
    config_path, log_path = os.path.join(workdir, "config.toml"), os.path.join(workdir, "cgtreed.log")
    socket_path = os.path.join(workdir, "s")
    Path(config_path).write_text(DAEMON_CONFIG.format(compile=compile_mode))
    with open(log_path, "ab") as log:
        # cwd is the work directory: the repository root on sys.path would let its bare
        # cgtree/ folder shadow the installed package.
        proc = spawn([*python_argv(), *boot, "--config", config_path,
                      "--endpoint", "ipc://" + socket_path, "--devices", devices],
                     env=child_env(), cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    daemon = DaemonProcess("ipc://" + socket_path, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cgtreed exited with {proc.returncode} at start: {Path(log_path).read_text()[-2000:]}")
        if os.path.exists(socket_path) and _ping(daemon.endpoint, 1.0):
            return daemon
        time.sleep(0.1)
    daemon.stop()
    raise RuntimeError(f"cgtreed did not answer ping within {timeout_s:.0f} s: {Path(log_path).read_text()[-2000:]}")


def _cold_start(invoke: Callable, ctx: Context) -> list[float]:
    tokens, pos = ctx.inputs(0)
    return timed_calls_ms(lambda: invoke(tokens, pos), COLD_START_CALLS, ctx.sync)


def _manager_facts(device: torch.device) -> dict:
    import cgtree.compile as cgtree_compile

    mgr = cgtree_compile.get_manager(device)
    if mgr is None:
        return {}
    last = mgr.last_execution
    # One manager per device: the counters cover every backend="cgtree" path of the run.
    return {"backend": mgr.backend_name, "shared_manager_counters": dict(mgr.counters),
            "root_children": mgr.root_children(), "last_execution_mode": None if last is None else last.mode.value}


def setup_eager(ctx: Context) -> PreparedPath:
    model = ctx.model("eager")
    return PreparedPath("eager", model, model, _cold_start(model, ctx))


def setup_reduce_overhead(ctx: Context) -> PreparedPath:
    model = ctx.model("reduce_overhead")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    return PreparedPath("reduce-overhead", model, compiled, _cold_start(compiled, ctx))


def _setup_cgtree(name: str, compiler: str):
    def setup(ctx: Context) -> PreparedPath:
        import cgtree.compile  # noqa: F401  (registers the backend)

        model = ctx.model(name)
        options = None if compiler == "auto" else {"compiler": compiler}  # "auto": cgtree's defaults
        compiled = torch.compile(model, backend="cgtree", options=options, fullgraph=True)
        return PreparedPath(name, model, compiled, _cold_start(compiled, ctx),
                            describe=lambda: {"compiler": compiler, **_manager_facts(ctx.device)})

    return setup


def _setup_daemon(name: str, doorbell: bool, stream_ordered: bool = False) -> Callable[[Context], PreparedPath]:
    """Through the daemon; ``doorbell`` False keeps plan runs on the lane's datagrams and
    ``stream_ordered`` hands outputs back stream-ordered (each a client of its own on the same
    daemon), for the side-by-side figures."""

    def setup(ctx: Context) -> PreparedPath:
        from cgtree.client import Client
        from cgtree.client.compile_backend import backend

        started = time.perf_counter()
        client = ctx.start_daemon()
        if not doorbell:
            client = ctx.lane_client = Client(ctx.daemon.endpoint, timeout_s=600, doorbell=False)
        elif stream_ordered:
            client = ctx.stream_client = Client(ctx.daemon.endpoint, timeout_s=600, stream_ordered_outputs=True)
        daemon_start_s = time.perf_counter() - started
        model = ctx.model(name)
        compiled = torch.compile(model, backend=backend(client), fullgraph=True)

        def describe() -> dict:
            return {"daemon_compile": ctx.daemon_compile, "daemon_start_s": round(daemon_start_s, 2),
                    "doorbell": doorbell, "stream_order": client.stream_order.describe(),
                    "last_execution": client.last_execution}

        return PreparedPath(name, model, compiled, _cold_start(compiled, ctx), describe=describe)

    return setup


SETUPS: dict[str, Callable[[Context], PreparedPath]] = {
    "eager": setup_eager,
    "reduce-overhead": setup_reduce_overhead,
    "cgtree": _setup_cgtree("cgtree", "auto"),
    "cgtree-aten": _setup_cgtree("cgtree-aten", "eager"),
    "daemon": _setup_daemon("daemon", doorbell=True),
    "daemon-lane": _setup_daemon("daemon-lane", doorbell=False),
    "daemon-stream": _setup_daemon("daemon-stream", doorbell=True, stream_ordered=True),
}


# ---------------------------------------------------------------------------------------------
# Correctness and measurement


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return float("inf")
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return (out64 - ref64).norm().item() / (ref64.norm().item() or 1.0)


def check_against_eager(prepared: PreparedPath, ctx: Context, first_step: int) -> float:
    """Decode ``CHECK_STEPS`` steps from empty caches on the path and on a fresh eager model:
    the logits of every step and the caches at the end must agree."""
    reference = build_gpt(ctx.cfg, ctx.device, seed=ctx.args.seed)
    prepared.model.clear_caches()
    worst = 0.0
    for step in range(first_step, first_step + CHECK_STEPS):
        tokens, pos = ctx.inputs(step)
        out = prepared.invoke(tokens, pos).clone()
        worst = max(worst, relative_error(out, reference(tokens, pos)))
    for got, expected in zip(prepared.model.caches(), reference.caches()):
        worst = max(worst, relative_error(got, expected))
    return worst


def measure_round(prepared: PreparedPath, result: PathResult, ctx: Context) -> None:
    args = ctx.args
    tokens, pos = ctx.inputs(args.max_seq // 2)
    invoke = prepared.invoke

    def call() -> None:
        invoke(tokens, pos)  # output dropped at once

    samples = sync_samples_ns(call, args.iters, args.warmup, ctx.sync)
    result.samples_ns.extend(samples)
    result.sync_round_p50_us.append(summarize_ns(samples).p50_us)
    result.async_round_us.append(async_mean(call, args.iters, args.warmup, ctx.sync))


def run(ctx: Context) -> dict:
    args = ctx.args
    results = {p: PathResult(p) for p in args.paths}
    prepared: dict[str, PreparedPath] = {}
    for path in args.paths:
        result = results[path]
        if path in CUDA_ONLY_PATHS and ctx.device.type != "cuda":
            result.status, result.note = "n/a", "needs CUDA"
            continue
        if path in INDUCTOR_PATHS and ctx.device.type != "cuda" and not args.cpu_inductor:
            result.status, result.note = "n/a", "inductor on CPU skipped in smoke mode (--cpu-inductor)"
            continue
        try:
            print(f"[bench_compile] setting up {path} ...", file=sys.stderr, flush=True)
            prepared[path] = SETUPS[path](ctx)
            cold = prepared[path].cold_start_ms
            result.cold_start_ms = {"calls": cold, "total": sum(cold)}
            result.max_rel_err = check_against_eager(prepared[path], ctx, first_step=0)
        except Exception as exc:  # one broken path must not hide the others' numbers
            result.status, result.note = "error", f"setup: {type(exc).__name__}: {exc}"
            traceback.print_exc()
            prepared.pop(path, None)

    active = [p for p in args.paths if p in prepared]
    for round_index in range(args.rounds):
        shift = round_index % max(1, len(active))
        for path in active[shift:] + active[:shift]:
            try:
                measure_round(prepared[path], results[path], ctx)
            except Exception as exc:
                results[path].status, results[path].note = "error", f"timing: {type(exc).__name__}: {exc}"
                traceback.print_exc()
                active.remove(path)

    for path, prep in prepared.items():
        result = results[path]
        if result.status == "ok" and result.samples_ns:
            result.sync = summarize_ns(result.samples_ns).to_dict()
            result.async_mean_us = sum(result.async_round_us) / len(result.async_round_us)
            try:  # again after thousands of steps: bookkeeping that drifts shows here
                result.max_rel_err = max(result.max_rel_err or 0.0, check_against_eager(prep, ctx, first_step=100))
            except Exception as exc:
                result.status, result.note = "error", f"check: {type(exc).__name__}: {exc}"
                traceback.print_exc()
        try:
            result.details = prep.describe()
        except Exception as exc:  # diagnostics never fail a path
            result.details = {"describe_error": f"{type(exc).__name__}: {exc}"}
        if result.status == "ok" and not (result.max_rel_err is not None and result.max_rel_err <= MAX_REL_ERR):
            result.status, result.note = "incorrect", f"max relative error {result.max_rel_err:.3g} > {MAX_REL_ERR:g}"
    for prep in prepared.values():
        with contextlib.suppress(Exception):
            prep.close()
    return {"description": ctx.cfg.describe(), "paths": {p: r.to_json() for p, r in results.items()},
            "ratios": ratios(results), "targets": targets(results)}


def _p50(result: Optional[PathResult]) -> Optional[float]:
    if result is None or result.status != "ok" or result.sync is None:
        return None
    return result.sync["p50_us"]


def _metric(result: Optional[PathResult], metric: str) -> Optional[float]:
    if result is None or result.status != "ok":
        return None
    if metric == "async_mean":
        return result.async_mean_us
    return None if result.sync is None else result.sync["p50_us" if metric == "sync_p50" else "p99_us"]


def ratios(results: dict[str, PathResult]) -> dict:
    table = {}
    for mine in ("cgtree", "cgtree-aten", "daemon", "daemon-lane", "daemon-stream"):
        for other in ("reduce-overhead", "eager"):
            a_res, b_res = results.get(mine), results.get(other)
            table[f"{mine}/{other}"] = {
                metric: (None if _metric(a_res, metric) is None or not _metric(b_res, metric)
                         else _metric(a_res, metric) / _metric(b_res, metric))
                for metric in ("sync_p50", "sync_p99", "async_mean")
            }
    return table


def targets(results: dict[str, PathResult]) -> list[dict]:
    out = []
    reference = _p50(results.get("reduce-overhead"))
    for path, limit in TARGETS.items():
        mine = _p50(results.get(path))
        ratio = None if mine is None or not reference else mine / reference
        out.append({"target": f"{path} sync p50 <= {limit:g} x reduce-overhead", "ratio": ratio, "limit": limit,
                    "status": "n/a" if ratio is None else ("pass" if ratio <= limit else "fail")})
    return out


# ---------------------------------------------------------------------------------------------
# Reports


def environment(device: torch.device) -> dict:
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "device": str(device), "gpu": None}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    env["cgtree_commit"] = source_revision()
    return env




def render_markdown(report: dict) -> str:
    env, config, data = report["environment"], report["config"], report["results"]
    lines = [
        "## torch.compile backends: GPT decoder step",
        "",
        f"{data['description']}. torch {env['torch']} (CUDA {env['torch_cuda']}), Python {env['python']}, "
        f"device {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else "")
        + f", cgtree {env.get('cgtree_commit') or '?'}; {config['rounds']} rounds x {config['iters']} steps per path, "
        f"{config['warmup']} warmup steps per round; under torch.no_grad().",
        "",
        "| path | sync p50 (us) | sync p99 (us) | async mean (us) | cold start, 3 steps (ms) | max rel err | status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for path, row in data["paths"].items():
        sync = row["sync"] or {}
        cold = (row["cold_start_ms"] or {}).get("total")
        err = row["max_rel_err"]
        status = row["status"] + (f" ({row['note']})" if row["note"] else "")
        lines.append(f"| {path} | {_fmt(sync.get('p50_us'))} | {_fmt(sync.get('p99_us'))} | {_fmt(row['async_mean_us'])} | "
                     f"{_fmt(cold, 1)} | {'-' if err is None else f'{err:.1e}'} | {status} |")
    lines += ["", "| ratio | sync p50 | sync p99 | async mean |", "|---|---:|---:|---:|"]
    for key, ratio in data["ratios"].items():
        lines.append(f"| {key} | {_fmt_ratio(ratio['sync_p50'])} | {_fmt_ratio(ratio['sync_p99'])} | "
                     f"{_fmt_ratio(ratio['async_mean'])} |")
    lines += ["", "| target | ratio | result |", "|---|---:|---|"]
    for target in data["targets"]:
        lines.append(f"| {target['target']} | {_fmt_ratio(target['ratio'])} | {target['status']} |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (smoke mode)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated (default: {','.join(PATHS)})")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per path per round (default 1000; cpu 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per round (default iters/10, at least 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all paths (default 3; cpu 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=GPTConfig.layers)
    parser.add_argument("--d-model", type=int, default=GPTConfig.d_model)
    parser.add_argument("--batch", type=int, default=GPTConfig.batch)
    parser.add_argument("--max-seq", type=int, default=GPTConfig.max_seq)
    parser.add_argument("--daemon-compile", choices=("auto", "eager", "inductor"), default="auto",
                        help="the daemon's compile mode (default auto, the daemon's default: inductor on cuda, eager on cpu)")
    parser.add_argument("--cpu-inductor", action="store_true", help="run the inductor paths in --device cpu too (slow)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "bench_compile.json")
    parser.add_argument("--md", type=Path, default=None, help="markdown table (default: --json with .md)")
    parser.add_argument("--fresh-inductor-cache", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fail-on-target", action="store_true", help="exit 3 when a target is missed")
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s): {', '.join(unknown)}")
    if "eager" not in args.paths:
        args.paths.insert(0, "eager")
    cpu = torch.device(args.device).type == "cpu"
    args.iters = args.iters or (5 if cpu else 1000)
    args.rounds = args.rounds or (1 if cpu else 3)
    args.warmup = args.warmup if args.warmup is not None else max(2, args.iters // 10)
    if args.md is None:
        args.md = args.json.with_suffix(".md")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available; use --device cpu for a smoke run", file=sys.stderr)
            return 2
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
        sync = torch.cuda.synchronize
    else:
        sync = lambda: None  # noqa: E731
    # Legacy CUDA IPC cannot share expandable segments (NOTES.md section 3): the caches the
    # daemon path passes by IPC come from this process's allocator.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    workdir = tempfile.mkdtemp(prefix="cgb-", dir="/tmp")  # short: ipc:// socket paths
    if args.fresh_inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(workdir, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(workdir, "triton")
    ctx = Context(args, device, sync, workdir)
    report = {
        "benchmark": "compile",
        "schema": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "config": {"device": str(device), "paths": args.paths, "iters": args.iters, "warmup": args.warmup,
                   "rounds": args.rounds, "seed": args.seed, "model": ctx.cfg.__dict__,
                   "fresh_inductor_cache": args.fresh_inductor_cache, "max_rel_err": MAX_REL_ERR,
                   "grad_mode": "no_grad"},
    }
    try:
        with torch.no_grad():
            report["results"] = run(ctx)
    finally:
        ctx.close()
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [p for p, row in report["results"]["paths"].items() if row["status"] in ("error", "incorrect")]
    missed = [t for t in report["results"]["targets"] if t["status"] == "fail"]
    report["ok"], report["failed_paths"] = not failed, failed
    write_reports(report, render_markdown(report), args.json, args.md)
    return exit_status(failed, missed, args.fail_on_target)


if __name__ == "__main__":
    sys.exit(main())
