#!/usr/bin/env python3
"""cgtreed from another process, side by side with in-process eager and reduce-overhead.

One run starts its own ``cgtreed`` (``python -m cgtree.daemon.main --endpoint ipc://<tmp>/s
--devices cuda:0``, or ``cpu`` in smoke mode), measures three things against the in-process
baselines, prints markdown tables, writes them to ``--md`` and everything to ``--json``, and
kills every process it started when it ends (also on an error or SIGTERM).

Sections (``--sections latency,memory,coldstart``):

1. **latency**: per-call round trip of a submit through the daemon, for each model of
   ``benchmarks/models.py``, beside ``eager`` and ``torch.compile(mode="reduce-overhead")``
   run in this process in the same run (interleaved rounds, as ``bench_inprocess.py`` does).
   Daemon rows: ``daemon-ipc`` (CUDA inputs shared by CUDA IPC, outputs mapped from the
   daemon's output buffer, requests on the session's submit lane, a steady loop's plan runs
   rung on its doorbell page where the daemon offers one), ``daemon-ipc-zmq`` (the
   same with ``Client(lanes=False)``: every request over ZeroMQ, the transport side by side)
   and ``daemon-cpu`` (CPU inputs sent inline in the message, the daemon copies them to the
   GPU). Each daemon row also reports the daemon's own time per submit (``daemon_us`` from
   the replies: the rest of the round trip is the transport and the client). A sync sample is ``client.submit(...)`` plus a
   ``torch.cuda.synchronize()`` in this process, for the same accounting as the in-process
   rows (submit is already synchronous: the daemon host-synchronizes before replying, or the
   client waits for a doorbell run's done word, so the extra synchronize finds an idle GPU). Targets: daemon-ipc sync p50 <= 1.0 x reduce-overhead
   on mlp24 and <= 1.3 x on tiny.
2. **memory**: total GPU memory of N client processes (default 8) that each run the model,
   three ways, each measured while all of its processes are alive: N processes each running
   ``torch.compile(mode="reduce-overhead")`` themselves; one fresh daemon plus N clients with
   CPU inputs that never initialize CUDA (``CUDA_VISIBLE_DEVICES=""``; see "Clients without
   CUDA" below); one fresh daemon plus N clients passing CUDA tensors (IPC inputs and
   outputs), which creates a CUDA context in every client. Memory is the rise of
   ``nvidia-smi --query-gpu=memory.used`` over the value before the group started, plus the
   per-process figures of ``nvidia-smi --query-compute-apps`` where the pids are visible, and
   the device-wide ``torch.cuda.mem_get_info`` rise seen from this process. Target: daemon
   (clients without CUDA) <= 0.3 x the reduce-overhead processes.
3. **coldstart**: a client process that arrives when the graph is already in the daemon.
   First a registering client process (named session) submits the model 3 times (warmup,
   record, replay) and exits without ``bye``, so the daemon parks its session. Then, each in a
   fresh process: a client with a new unnamed session (the graph and weights are already on
   the device, but sessions have their own trees, so its first submit is a warmup), and a
   client that says hello with the parked session's name (adopted: its first submit replays).
   Client processes do what a user does, ``client.register(model, [x])`` then
   ``client.submit``, with ``CGTREE_GRAPH_CACHE`` pointing at a graph cache that starts empty:
   the registering client lowers the model and writes the entry, the later ones register from
   it without lowering (``cgtree.client.graph_cache``). One more new-session client runs
   without the cache (``daemon-new-session-uncached``: it lowers, make_fx route). Each row says
   the lowering route and the cache outcome.
   Against reduce-overhead's cold start in a fresh process (first three calls: compile,
   warmup, record; empty inductor cache). Reported per process: "first submit latency"
   (``Client()`` creation to the first output ready, lowering or cache lookup and register
   included; for reduce-overhead, the first call) and "process start to first result" (from
   just before the process is spawned: Python, ``import torch``, CUDA init included). Target:
   daemon first submit latency <= 0.1 x reduce-overhead's cold start (first three calls).

Clients without CUDA: a client whose inputs are CPU tensors and that never created a CUDA
context gets CPU copies of the outputs (the daemon uploads the inputs and copies the outputs
back; docs/PROTOCOL.md, ``submit``), so these clients use plain ``Client.submit`` and cost no
GPU memory. The ``daemon-cuda-clients`` group passes CUDA tensors instead, as a CUDA program
would, and so pays one CUDA context per client.

``--device cpu`` is a smoke mode for machines without a GPU: the daemon runs its CPU replay
backend, only CPU inputs, reduce-overhead and the memory section are ``n/a (needs CUDA)``;
numbers mean nothing. ``--quick`` runs fewer calls. ``--time-budget S`` skips sections that
would start after S seconds and shortens timeouts to fit, so a caller's hard timeout still
gets a report.

Exit status: 0 when every row that could run ran and matched eager; 2 when one failed or
disagreed; 3 with ``--fail-on-target`` when a target was missed.

Child roles: this file is also the client processes (``--child ROLE JSON``): one file to
carry, and each child imports only torch, the benchmark models and ``cgtree.client``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Run as a file: make ``benchmarks`` importable. Appended, not prepended: the repository's
    # bare cgtree/ folder (no daemon/ or client/ inside) must not shadow an installed cgtree
    # (gpu_check.sh's fallback runs Python with -P from a copy on PYTHONPATH).
    sys.path.append(str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.models import build_model, model_names  # noqa: E402
from benchmarks.report import fmt as _fmt, fmt_ratio as _fmt_ratio, reset_torch_graph_state  # noqa: E402

SECTIONS = ("latency", "memory", "coldstart")
LATENCY_PATHS = ("eager", "reduce-overhead", "daemon-ipc", "daemon-ipc-zmq", "daemon-cpu")
CUDA_ONLY_PATHS = frozenset({"reduce-overhead", "daemon-ipc", "daemon-ipc-zmq"})
DAEMON_PATHS = ("daemon-ipc", "daemon-ipc-zmq", "daemon-cpu")
PATH_INPUTS = {"eager": "device", "reduce-overhead": "device", "daemon-ipc": "CUDA IPC, lane (+ doorbell)",
               "daemon-ipc-zmq": "CUDA IPC, ZeroMQ only", "daemon-cpu": "CPU inline, lane"}
COLD_START_CALLS = 3
# Relative error ||out - ref|| / ||ref|| allowed against eager (as bench_inprocess.py).
MAX_REL_ERR = 1e-3

# Targets of the issue.
LATENCY_TARGETS = {"mlp24": 1.0, "tiny": 1.3}  # daemon-ipc sync p50 / reduce-overhead sync p50
MEMORY_TARGET = 0.3  # daemon setup / N reduce-overhead processes
COLDSTART_TARGET = 0.1  # daemon first submit / reduce-overhead first three calls

# The daemon's configuration. CPU inputs of a CUDA graph are copied to the device
# (move_cpu_inputs_to_device) instead of making the call skip graphs; reap often, so a dead
# registering client's named session is parked within a fraction of a second.
PHASE_SAMPLES = 500  # submits of the per-phase pass (describe()), apart from the timed loop
DAEMON_CONFIG = """\
[policy]
move_cpu_inputs_to_device = true

[daemon]
max_message_bytes = 268435456
reap_interval_s = 0.2
session_timeout_s = 600.0
shutdown_timeout_s = 15.0
log_level = "INFO"
"""
# Legacy CUDA IPC handles cannot share expandable segments (NOTES.md section 3): daemon and
# clients both use the classic allocator.
ALLOC_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
DAEMON_START_TIMEOUT_S = 90.0
COLD_SESSION_NAME = "bench-coldstart"


# ---------------------------------------------------------------------------------------------
# Processes: every daemon and child started here is killed when the benchmark ends
# ---------------------------------------------------------------------------------------------

_LIVE: list[subprocess.Popen] = []


def _load_prctl() -> Optional[Callable[..., int]]:
    # Resolved here, not in the forked child: loading a library after fork() in a process with
    # threads (ZeroMQ's, the readers') can deadlock on the loader's lock.
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when this process dies, even by SIGKILL, so no daemon
    or client outlives a benchmark killed by a caller's timeout."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def spawn(argv: list[str], *, env: dict, cwd: str, stdin=None, stdout=None, stderr=None) -> subprocess.Popen:
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr,
                            preexec_fn=_die_with_parent if _PRCTL is not None else None)
    _LIVE.append(proc)
    return proc


def stop_process(proc: subprocess.Popen, *, grace_s: float = 0.0) -> None:
    """SIGTERM and up to ``grace_s`` to exit (0: SIGKILL at once), then SIGKILL."""
    if proc.poll() is None:
        if grace_s > 0:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
    with contextlib.suppress(ValueError):
        _LIVE.remove(proc)


def stop_all_processes() -> None:
    for proc in list(reversed(_LIVE)):
        stop_process(proc, grace_s=5.0)


def python_argv() -> list[str]:
    """How to start Python like this process: same interpreter, same -P (safe path) flag."""
    return [sys.executable, *(["-P"] if getattr(sys.flags, "safe_path", False) else [])]


def child_env(extra: Optional[dict] = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ALLOC_ENV, **(extra or {})}
    return env


class Daemon:
    """A ``cgtreed`` subprocess on a short ipc:// path, with its config and log in ``workdir``."""

    def __init__(self, devices: str, workdir: str) -> None:
        self.devices = devices
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.socket_path = os.path.join(workdir, "s")  # sockaddr_un paths must stay short
        self.endpoint = "ipc://" + self.socket_path
        self.config_path = os.path.join(workdir, "config.toml")
        self.log_path = os.path.join(workdir, "cgtreed.log")
        Path(self.config_path).write_text(DAEMON_CONFIG)
        self.proc: Optional[subprocess.Popen] = None
        self.start_s: Optional[float] = None

    def start(self, timeout_s: float = DAEMON_START_TIMEOUT_S) -> "Daemon":
        from cgtree.client import Client, ClientError

        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            # cwd is the work directory: `-m` puts the cwd on sys.path, and the repository root
            # there would let its bare cgtree/ shadow the installed package.
            self.proc = spawn(
                [*python_argv(), "-m", "cgtree.daemon.main", "--config", self.config_path,
                 "--endpoint", self.endpoint, "--devices", self.devices],
                env=child_env(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cgtreed exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            if os.path.exists(self.socket_path):
                try:
                    with Client(self.endpoint, timeout_s=2.0) as client:
                        client.ping()
                    self.start_s = time.perf_counter() - started
                    return self
                except ClientError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"cgtreed did not answer ping within {timeout_s:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def status(self) -> dict:
        from cgtree.client import Client

        with Client(self.endpoint, timeout_s=30) as client:
            return client.status()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=20.0)

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Budget:
    """The run's time budget (``--time-budget``): sections and timeouts fit inside it."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds if seconds > 0 else None

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def timeout(self, wanted_s: float) -> float:
        """``wanted_s``, or less so that it ends 10 s before the deadline (at least 5 s)."""
        return max(5.0, min(wanted_s, self.remaining() - 10.0))


# ---------------------------------------------------------------------------------------------
# GPU memory: nvidia-smi and mem_get_info
# ---------------------------------------------------------------------------------------------


def _smi(*query: str) -> Optional[list[list[str]]]:
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def _norm_uuid(uuid: Optional[str]) -> str:
    text = (uuid or "").strip().lower()
    return text[4:] if text.startswith("gpu-") else text


def gpu_uuid(device: torch.device) -> Optional[str]:
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return str(uuid) if uuid is not None else None


def memory_snapshot(device: torch.device) -> dict[str, Any]:
    """Device-wide used memory (nvidia-smi and mem_get_info, MiB) and per-process usage."""
    uuid = _norm_uuid(gpu_uuid(device))
    snap: dict[str, Any] = {"smi_used_mib": None, "smi_total_mib": None, "apps": None, "torch_used_mib": None}
    rows = _smi("--query-gpu=uuid,memory.used,memory.total")
    if rows:
        mine = [r for r in rows if _norm_uuid(r[0]) == uuid] or (rows if len(rows) == 1 else [])
        if mine:
            with contextlib.suppress(ValueError, IndexError):
                snap["smi_used_mib"], snap["smi_total_mib"] = float(mine[0][1]), float(mine[0][2])
    apps = _smi("--query-compute-apps=gpu_uuid,pid,used_memory")
    if apps is not None:
        snap["apps"] = {}
        for row in apps:
            with contextlib.suppress(ValueError, IndexError):
                if _norm_uuid(row[0]) == uuid or not uuid:
                    snap["apps"][int(row[1])] = float(row[2])
    with contextlib.suppress(Exception):
        free, total = torch.cuda.mem_get_info(device)
        snap["torch_used_mib"] = (total - free) / 2**20
    return snap


def _delta(after: Optional[float], before: Optional[float]) -> Optional[float]:
    return None if after is None or before is None else after - before


# ---------------------------------------------------------------------------------------------
# Child processes (``--child ROLE JSON``)
# ---------------------------------------------------------------------------------------------


def _emit(tag: str, payload: dict) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return float("inf")
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return (out64 - ref64).norm().item() / (ref64.norm().item() or 1.0)


def _submit_without_outputs(client: Any, handle: Any, inputs: list) -> str:
    """``Client.submit`` from a client without CUDA: CPU inputs in, CPU copies of the outputs
    back (no CUDA context is created). Returns the daemon's execution mode."""
    outputs = client.submit(handle, inputs)
    if not outputs or outputs[0].device.type != "cpu":
        raise RuntimeError(f"expected CPU outputs for a client without CUDA, got {outputs!r}")
    return client.last_execution["mode"]


def child_coldstart_daemon(opts: dict) -> None:
    """A client process as a user writes one: build the model, then ``Client()`` ->
    ``client.register(model, [x])`` (lowering, or the graph cache when ``CGTREE_GRAPH_CACHE``
    is set in the environment; hello; register) -> ``client.submit(handle, [x])``."""
    from cgtree.client import Client

    t_imported = time.time()
    device = torch.device(opts["device"])
    model = build_model(opts["model"], device, seed=opts["seed"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()  # CUDA context up, model and input on the device: outside "first submit latency"
    t_model = time.time()
    x = model.inputs[0]

    clock = time.perf_counter
    start = clock()
    client = Client(opts["endpoint"], session=opts["session"] or None, timeout_s=120)
    t_client = clock()
    handle = client.register(model.module, [x])  # lower (or graph cache) + encode, hello, register
    t_registered = clock()
    out = client.submit(handle, [x])[0]
    sync()
    t_first = clock()
    first_result_wall = time.time()
    from cgtree.client import graph_cache  # imported by register already; read what it did

    lowering = graph_cache.last_lowering()
    lower_s = lowering.seconds if lowering is not None else 0.0
    modes = [client.last_execution["mode"]]
    with torch.no_grad():
        err = _rel_err(out, model.module(x))
    del out
    later_ms = []
    for _ in range(opts["calls"] - 1):
        begin = clock()
        client.submit(handle, [x])
        sync()
        later_ms.append((clock() - begin) * 1e3)
        modes.append(client.last_execution["mode"])
    # What the daemon holds now (read before this client's bye can drop the last reference).
    held = client.status()["devices"][0]
    result = {
        "pid": os.getpid(),
        "daemon_graphs": held["graphs"],
        "daemon_weights": held["weights"],
        "session_id": client.session_id,
        "graph_id": handle.graph_id,
        "modes": modes,
        "max_rel_err": err,
        "import_s": t_imported - opts["t0"],
        "model_ready_s": t_model - opts["t0"],
        "first_submit_ms": (t_first - start) * 1e3,
        # How register got the graph: the lowering route, and the graph cache's outcome.
        "lowering": {
            "route": lowering.route if lowering else None,
            "graph_cache": lowering.cache if lowering else None,
            "detail": lowering.detail if lowering else None,
            "graph_cache_dir": os.environ.get(graph_cache.ENV_VAR),
        },
        # Without the client's own lowering / cache lookup (what registering a kept EncodedGraph costs).
        "first_submit_excl_lowering_ms": (t_first - start - lower_s) * 1e3,
        "breakdown_ms": {
            "client": (t_client - start) * 1e3,
            "lower_encode": lower_s * 1e3,  # lowering + encoding, or the graph cache's hit
            "hello_register": (t_registered - t_client - lower_s) * 1e3,
            "submit": (t_first - t_registered) * 1e3,
        },
        "later_calls_ms": later_ms,
        "first_three_ms": (t_first - start) * 1e3 + sum(later_ms[:2]),
        "process_start_to_first_result_s": first_result_wall - opts["t0"],
    }
    _emit("RESULT", result)
    if opts.get("exit_without_bye"):
        # Die like a crashed client (no bye): the daemon parks a named session's trees.
        os._exit(0)
    client.close()


def child_coldstart_ro(opts: dict) -> None:
    """A reduce-overhead process: build the model, compile, time the first three calls."""
    t_imported = time.time()
    device = torch.device(opts["device"])
    model = build_model(opts["model"], device, seed=opts["seed"])
    torch.cuda.synchronize()
    t_model = time.time()
    x = model.inputs[0]
    compiled = torch.compile(model.module, mode="reduce-overhead", fullgraph=True)
    calls_ms, first_result_wall = [], None
    with torch.no_grad():
        for _ in range(COLD_START_CALLS):
            begin = time.perf_counter()
            out = compiled(x)
            torch.cuda.synchronize()
            calls_ms.append((time.perf_counter() - begin) * 1e3)
            first_result_wall = first_result_wall or time.time()
        err = _rel_err(out, model.module(x))
    _emit("RESULT", {
        "pid": os.getpid(),
        "import_s": t_imported - opts["t0"],
        "model_ready_s": t_model - opts["t0"],
        "first_submit_ms": calls_ms[0],
        "calls_ms": calls_ms,
        "first_three_ms": sum(calls_ms),
        "max_rel_err": err,
        "process_start_to_first_result_s": first_result_wall - opts["t0"],
    })


def child_memory_daemon(opts: dict) -> None:
    """A memory-section client: CPU model and inputs; with or without CUDA (see docstring)."""
    from cgtree.client import Client

    model = build_model(opts["model"], "cpu", seed=opts["seed"])
    x = model.inputs[0]
    client = Client(opts["endpoint"], timeout_s=120)
    handle = client.register(model.module, [x], device=opts["daemon_device"])
    modes = []
    for _ in range(opts["calls"]):
        if opts["no_cuda"]:
            modes.append(_submit_without_outputs(client, handle, [x]))
        else:  # a CUDA program: its tensors live on the device and travel by IPC
            client.submit(handle, [x.to(opts["daemon_device"])])
            modes.append(client.last_execution["mode"])
    _emit("READY", {"pid": os.getpid(), "modes": modes, "cuda_initialized": torch.cuda.is_initialized(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
    sys.stdin.read()  # stay alive (and keep the session) until the parent has measured
    client.close()


def child_memory_ro(opts: dict) -> None:
    """A memory-section reduce-overhead process: compile, run, stay alive."""
    device = torch.device(opts["device"])
    model = build_model(opts["model"], device, seed=opts["seed"])
    compiled = torch.compile(model.module, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(opts["calls"]):
            compiled(model.inputs[0])
    torch.cuda.synchronize()
    _emit("READY", {"pid": os.getpid(), "cuda_initialized": True,
                    "allocator_reserved_mib": torch.cuda.memory_reserved(device) / 2**20,
                    "allocator_allocated_mib": torch.cuda.memory_allocated(device) / 2**20})
    sys.stdin.read()


CHILD_ROLES: dict[str, Callable[[dict], None]] = {
    "coldstart-daemon": child_coldstart_daemon,
    "coldstart-ro": child_coldstart_ro,
    "memory-daemon": child_memory_daemon,
    "memory-ro": child_memory_ro,
}


def child_argv(role: str, opts: dict) -> list[str]:
    return [*python_argv(), str(Path(__file__).resolve()), "--child", role, json.dumps(opts)]


def run_child(role: str, opts: dict, *, env: dict, cwd: str, timeout_s: float) -> dict:
    """Run one child to its RESULT line (the child may keep running briefly after it)."""
    opts = {**opts, "t0": time.time()}  # the process clock starts just before the spawn
    err_path = os.path.join(cwd, f"{role}-{len(os.listdir(cwd))}.err")
    with open(err_path, "wb") as err:
        proc = spawn(child_argv(role, opts), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=err)
    try:
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{role} did not finish within {timeout_s:.0f} s:\n{_tail(err_path)}") from None
        for line in stdout.decode(errors="replace").splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise RuntimeError(f"{role} exited with {proc.returncode} without a result:\n{_tail(err_path)}")
    finally:
        stop_process(proc)


def _tail(path: str, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# ---------------------------------------------------------------------------------------------
# Section 1: latency
# ---------------------------------------------------------------------------------------------


@dataclass
class LatencyPath:
    """A path ready to time: ``invoke(*inputs)`` returns the output; ``place`` puts fresh
    device inputs where this path takes them (CPU for daemon-cpu)."""

    name: str
    invoke: Callable[..., torch.Tensor]
    inputs: tuple
    place: Callable[[tuple], tuple] = lambda inputs: inputs
    cold_start_ms: list[float] = field(default_factory=list)
    setup_ms: Optional[float] = None
    close: Callable[[], None] = lambda: None
    describe: Callable[[], dict] = dict


@dataclass
class LatencyRow:
    status: str = "ok"  # ok | n/a | error | incorrect | skipped
    note: str = ""
    inputs: str = ""
    sync: Optional[dict] = None
    sync_round_p50_us: list = field(default_factory=list)
    async_mean_us: Optional[float] = None
    async_round_us: list = field(default_factory=list)
    setup_ms: Optional[float] = None
    cold_start_ms: Optional[dict] = None
    max_rel_err: Optional[float] = None
    details: dict = field(default_factory=dict)
    samples_ns: list = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "samples_ns"}


def _first_calls(invoke: Callable, inputs: tuple, sync: Callable) -> list[float]:
    from benchmarks.timing import timed_calls_ms

    return timed_calls_ms(lambda: invoke(*inputs), COLD_START_CALLS, sync)


def setup_daemon_path(name: str, model: Any, device: torch.device, daemon: Daemon, seed: int, sync) -> LatencyPath:
    from cgtree.client import Client

    client = Client(daemon.endpoint, timeout_s=120, lanes=name != "daemon-ipc-zmq")
    started = time.perf_counter()
    if name in ("daemon-ipc", "daemon-ipc-zmq"):
        module, inputs, place = model.module, model.inputs, (lambda ins: ins)
    else:
        # Built on the CPU from the same seed: the same weights (so the daemon stores them once),
        # the same input values, sent as bytes in the message.
        cpu_model = model if device.type == "cpu" else build_model(model.name, "cpu", seed=seed)
        module, inputs = cpu_model.module, cpu_model.inputs
        place = lambda ins: tuple(t.cpu() for t in ins)  # noqa: E731
    try:
        # Lowered in the default grad mode, as a user's first submit would.
        with torch.enable_grad():
            handle = client.register(module, list(inputs), device=str(device))
    except BaseException:
        client.close()
        raise
    setup_ms = (time.perf_counter() - started) * 1e3

    def invoke(*activations: torch.Tensor) -> torch.Tensor:
        return client.submit(handle, activations)[0]

    def describe() -> dict:
        # Where a submit's time goes: the daemon's own time (from the replies) and the client's
        # phases, from a pass of their own (reading them costs time the timed loop must not pay).
        phases: dict[str, list[float]] = {"daemon_us": [], "prepare_us": [], "request_us": [], "outputs_us": []}
        placed = place(tuple(inputs))
        for _ in range(PHASE_SAMPLES):
            client.submit(handle, placed)
            phases["daemon_us"].append(client.last_execution.get("daemon_us") or 0.0)
            for key, value in (client.last_timing or {}).items():
                phases[key].append(value)
        info: dict[str, Any] = {"last_execution": client.last_execution, "graph": handle.short_name,
                                "lane": client.lane_attached}
        for key, values in phases.items():
            if values:
                ordered = sorted(values)
                info[f"{key[:-3]}_us_p50"] = round(ordered[len(ordered) // 2], 1)
        with contextlib.suppress(Exception):
            session = client.status(session_only=True)["sessions"][0]
            state = next(iter(session["devices"].values()))
            info["counters"] = state.get("counters")
            info["root_children"] = state.get("root_children")
        return info

    path = LatencyPath(name, invoke, tuple(inputs), place, setup_ms=setup_ms, close=client.close, describe=describe)
    path.cold_start_ms = _first_calls(invoke, path.inputs, sync)
    return path


def setup_latency_path(name: str, model: Any, device: torch.device, daemon: Daemon, seed: int, sync) -> LatencyPath:
    if name == "eager":
        path = LatencyPath("eager", model.module, model.inputs)
    elif name == "reduce-overhead":
        started = time.perf_counter()
        compiled = torch.compile(model.module, mode="reduce-overhead", fullgraph=True)
        path = LatencyPath("reduce-overhead", compiled, model.inputs, setup_ms=(time.perf_counter() - started) * 1e3)
    else:
        return setup_daemon_path(name, model, device, daemon, seed, sync)
    path.cold_start_ms = _first_calls(path.invoke, path.inputs, sync)
    return path


def check_against_eager(path: LatencyPath, model: Any, seeds: list[int]) -> float:
    """Largest relative error over fresh inputs in a row (a stale input or output shows)."""
    worst = 0.0
    for seed in seeds:
        inputs = model.fresh_inputs(seed)
        reference = model.module(*inputs).clone()
        out = path.invoke(*path.place(inputs)).clone()
        worst = max(worst, _rel_err(out, reference))
    return worst


def bench_latency_model(name: str, args, device: torch.device, daemon: Daemon, sync) -> dict:
    from benchmarks.timing import async_mean, summarize_ns, sync_samples_ns

    model = build_model(name, device, seed=args.seed)
    rows = {p: LatencyRow(inputs=PATH_INPUTS[p]) for p in LATENCY_PATHS}
    paths: dict[str, LatencyPath] = {}
    seeds = [args.seed + 100 + i for i in range(3)]
    for name_ in LATENCY_PATHS:
        row = rows[name_]
        if name_ in CUDA_ONLY_PATHS and device.type != "cuda":
            row.status, row.note = "n/a", "needs CUDA"
            continue
        try:
            with torch.no_grad():
                paths[name_] = setup_latency_path(name_, model, device, daemon, args.seed, sync)
                row.setup_ms = paths[name_].setup_ms
                cold = paths[name_].cold_start_ms
                row.cold_start_ms = {"calls": cold, "total": sum(cold)}
                row.max_rel_err = check_against_eager(paths[name_], model, seeds)
        except Exception as exc:  # one broken path must not hide the others' numbers
            row.status, row.note = "error", f"setup: {type(exc).__name__}: {exc}"
            traceback.print_exc()
            paths.pop(name_, None)

    active = list(paths)
    with torch.no_grad():
        for round_index in range(args.rounds):
            shift = round_index % max(1, len(active))
            for name_ in active[shift:] + active[:shift]:
                path, row = paths[name_], rows[name_]

                def call(path=path) -> None:
                    path.invoke(*path.inputs)  # output dropped at once, as bench_inprocess does

                try:
                    samples = sync_samples_ns(call, args.iters, args.warmup, sync)
                    row.samples_ns.extend(samples)
                    row.sync_round_p50_us.append(summarize_ns(samples).p50_us)
                    row.async_round_us.append(async_mean(call, args.iters, args.warmup, sync))
                except Exception as exc:
                    row.status, row.note = "error", f"timing: {type(exc).__name__}: {exc}"
                    traceback.print_exc()
                    active.remove(name_)

        for name_, path in paths.items():
            row = rows[name_]
            if row.status == "ok" and row.samples_ns:
                row.sync = summarize_ns(row.samples_ns).to_dict()
                row.async_mean_us = sum(row.async_round_us) / len(row.async_round_us)
                try:
                    after = check_against_eager(path, model, [s + 50 for s in seeds])
                    row.max_rel_err = max(row.max_rel_err or 0.0, after)
                except Exception as exc:
                    row.status, row.note = "error", f"check: {type(exc).__name__}: {exc}"
            try:
                row.details = path.describe()
            except Exception as exc:  # diagnostics only
                row.details = {"describe_error": f"{type(exc).__name__}: {exc}"}
            if row.status == "ok" and not (row.max_rel_err is not None and row.max_rel_err <= MAX_REL_ERR):
                row.status, row.note = "incorrect", f"max relative error {row.max_rel_err:.3g} > {MAX_REL_ERR:g}"
            mode = (row.details.get("last_execution") or {}).get("mode") if name_ in DAEMON_PATHS else None
            if row.status == "ok" and name_ in DAEMON_PATHS and mode != "replayed":
                # Timing a daemon that runs the graph eagerly would not measure graph replay.
                row.status, row.note = "error", f"the daemon's last call was {mode!r}, not a replay: {row.details}"

    for path in reversed(list(paths.values())):
        with contextlib.suppress(Exception):
            path.close()
    if device.type == "cuda":
        reset_torch_graph_state()

    ratios = {}
    for mine in DAEMON_PATHS:
        for other in ("reduce-overhead", "eager"):
            ratios[f"{mine}/{other}"] = {m: _ratio(_metric(rows[mine], m), _metric(rows[other], m))
                                         for m in ("sync_p50", "sync_p99", "async_mean")}
    return {
        "description": model.spec.description,
        "batch": model.spec.batch,
        "paths": {p: r.to_json() for p, r in rows.items()},
        "ratios": ratios,
    }


def _client_phases(details: dict) -> str:
    values = [details.get(f"{key}_us_p50") for key in ("prepare", "request", "outputs")]
    return "-" if all(v is None for v in values) else " / ".join(_fmt(v) for v in values)


def _metric(row: LatencyRow, metric: str) -> Optional[float]:
    if row.status != "ok":
        return None
    if metric == "async_mean":
        return row.async_mean_us
    return None if row.sync is None else row.sync["p50_us" if metric == "sync_p50" else "p99_us"]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def run_latency(section: dict, args, device: torch.device, sync, workdir: str, budget: Budget) -> None:
    """Fills ``section`` as it goes: an interrupted run still reports the models it finished."""
    section.update({"status": "ok", "models": {}})
    with Daemon(args.daemon_devices, os.path.join(workdir, "latency")).start(budget.timeout(DAEMON_START_TIMEOUT_S)) as daemon:
        section["daemon_start_s"] = daemon.start_s
        for name in args.models:
            if budget.remaining() < 20:
                section["models"][name] = {"status": "skipped", "note": "time budget"}
                continue
            print(f"[bench_daemon] latency: {name} on {device} ...", file=sys.stderr, flush=True)
            section["models"][name] = bench_latency_model(name, args, device, daemon, sync)
        section["daemon_log_tail"] = daemon.log_tail(15)


# ---------------------------------------------------------------------------------------------
# Section 2: memory
# ---------------------------------------------------------------------------------------------


def _reader(proc: subprocess.Popen, index: int, lines: "queue.Queue") -> None:
    with contextlib.suppress(ValueError, OSError):  # the stream is closed at teardown
        for raw in proc.stdout:
            lines.put((index, raw.decode(errors="replace").rstrip("\n")))
    lines.put((index, None))


def run_memory_group(kind: str, args, device: torch.device, workdir: str, budget: Budget) -> dict:
    """Start the group (a daemon first where it has one), wait until every client is READY,
    measure while all are alive, then stop them all."""
    os.makedirs(workdir, exist_ok=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = memory_snapshot(device)
    group: dict[str, Any] = {"kind": kind, "status": "ok", "note": "", "clients": args.clients}
    daemon: Optional[Daemon] = None
    procs: list[subprocess.Popen] = []
    started = time.perf_counter()
    try:
        opts = {"model": args.memory_model, "seed": args.seed, "calls": args.memory_calls}
        env = child_env({"TORCHINDUCTOR_COMPILE_THREADS": "1"})  # 8 compilers, no worker pools
        if kind == "reduce-overhead":
            role, opts = "memory-ro", {**opts, "device": str(device)}
        else:
            daemon = Daemon(args.daemon_devices, os.path.join(workdir, "daemon")).start(budget.timeout(DAEMON_START_TIMEOUT_S))
            group["daemon_pid"] = daemon.pid
            no_cuda = kind == "daemon"
            role, opts = "memory-daemon", {**opts, "endpoint": daemon.endpoint, "daemon_device": str(device), "no_cuda": no_cuda}
            if no_cuda:
                env["CUDA_VISIBLE_DEVICES"] = ""  # these clients cannot create a CUDA context
        lines: "queue.Queue" = queue.Queue()
        for index in range(args.clients):
            with open(os.path.join(workdir, f"client{index}.err"), "wb") as err:
                procs.append(spawn(child_argv(role, opts), env=env, cwd=workdir, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=err))
            threading.Thread(target=_reader, args=(procs[-1], index, lines), daemon=True).start()
        ready: dict[int, dict] = {}
        deadline = time.monotonic() + budget.timeout(args.memory_timeout)
        while len(ready) < len(procs):
            try:
                index, line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{len(procs) - len(ready)} client(s) not ready after {args.memory_timeout:.0f} s") from None
            if line is None and index not in ready:
                raise RuntimeError(f"client {index} exited with {procs[index].wait()} before it was ready:\n"
                                   f"{_tail(os.path.join(workdir, f'client{index}.err'))}")
            if line and line.startswith("READY "):
                ready[index] = json.loads(line[len("READY "):])
        group["ready_after_s"] = time.perf_counter() - started
        time.sleep(1.0)  # let the driver's accounting settle
        during = memory_snapshot(device)
        pids = [p.pid for p in procs]
        group.update(_memory_figures(before, during, pids, daemon.pid if daemon else None))
        group["client_reports"] = [ready[i] for i in sorted(ready)]
        if daemon is not None:
            with contextlib.suppress(Exception):
                dev = daemon.status()["devices"][0]
                group["daemon_status"] = {k: dev.get(k) for k in ("backend", "graphs", "weights", "sessions", "pool_bytes",
                                                                   "output_buffer_bytes", "allocated_bytes", "reserved_bytes")}
        modes = {m for r in ready.values() for m in r.get("modes", [])}
        if kind != "reduce-overhead" and "replayed" not in modes:
            group["status"], group["note"] = "error", f"no client saw a replay (modes {sorted(modes)})"
    except Exception as exc:
        group["status"], group["note"] = "error", f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        if daemon is not None:
            group["daemon_log_tail"] = daemon.log_tail(20)
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stdin.close()  # the clients' cue to exit (a named-less session says bye)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            stop_process(proc)
        if daemon is not None:
            daemon.stop()
    time.sleep(1.0)
    after = memory_snapshot(device)
    group["left_after_teardown_mib"] = _delta(after["smi_used_mib"], before["smi_used_mib"])
    group["wall_s"] = time.perf_counter() - started
    return group


def _memory_figures(before: dict, during: dict, client_pids: list[int], daemon_pid: Optional[int]) -> dict:
    figures: dict[str, Any] = {
        "smi_used_before_mib": before["smi_used_mib"],
        "smi_used_during_mib": during["smi_used_mib"],
        "total_mib": _delta(during["smi_used_mib"], before["smi_used_mib"]),
        "torch_mem_get_info_delta_mib": _delta(during["torch_used_mib"], before["torch_used_mib"]),
        "source": "nvidia-smi memory.used delta",
    }
    if figures["total_mib"] is None:
        figures["total_mib"] = figures["torch_mem_get_info_delta_mib"]
        figures["source"] = "torch.cuda.mem_get_info delta (nvidia-smi unavailable)"
    apps = during.get("apps")
    if apps is not None:
        ours = set(client_pids) | ({daemon_pid} if daemon_pid else set())
        visible = ours & set(apps)
        figures["per_process_mib"] = {
            "pids_visible": bool(visible),
            "daemon": apps.get(daemon_pid) if daemon_pid else None,
            # A client absent from compute-apps has no CUDA context: 0 MiB.
            "clients": [apps.get(pid, 0.0) for pid in client_pids] if visible else None,
            "clients_with_cuda_context": sum(1 for pid in client_pids if pid in apps) if visible else None,
            "sum_mib": sum(apps[pid] for pid in visible) if visible else None,
        }
    return figures


def run_memory(section: dict, args, device: torch.device, workdir: str, budget: Budget) -> None:
    section.update({"status": "ok", "model": args.memory_model, "clients": args.clients,
                    "calls_per_client": args.memory_calls, "groups": {}})
    for kind in args.memory_groups:
        if budget.remaining() < 45:
            section["groups"][kind] = {"kind": kind, "status": "skipped", "note": "time budget"}
            continue
        print(f"[bench_daemon] memory: {kind}, {args.clients} processes ...", file=sys.stderr, flush=True)
        section["groups"][kind] = run_memory_group(kind, args, device, os.path.join(workdir, f"memory-{kind}"), budget)
    totals = {k: g.get("total_mib") for k, g in section["groups"].items() if g.get("status") == "ok"}
    section["ratios"] = {f"{k}/reduce-overhead": _ratio(totals.get(k), totals.get("reduce-overhead"))
                         for k in section["groups"] if k != "reduce-overhead"}


# ---------------------------------------------------------------------------------------------
# Section 3: cold start
# ---------------------------------------------------------------------------------------------


def run_coldstart_model(name: str, args, device: torch.device, daemon: Daemon, workdir: str, budget: Budget) -> dict:
    from cgtree.client.graph_cache import ENV_VAR as GRAPH_CACHE_ENV

    os.makedirs(workdir, exist_ok=True)
    rows: dict[str, Any] = {}
    # Client processes run as deployed: CGTREE_GRAPH_CACHE points at a graph cache (empty at
    # first: the registering client lowers and writes the entry, later clients hit it); one
    # more new-session client runs without it, lowering as a client with no cache does.
    graph_cache_dir = os.path.join(workdir, "graph-cache")
    shutil.rmtree(graph_cache_dir, ignore_errors=True)
    env = child_env({GRAPH_CACHE_ENV: graph_cache_dir})
    env_uncached = child_env()
    env_uncached.pop(GRAPH_CACHE_ENV, None)
    base = {"model": name, "seed": args.seed, "device": str(device)}

    def attempt(key: str, fn: Callable[[], dict]) -> None:
        if budget.remaining() < 15:
            rows[key] = {"status": "skipped", "note": "time budget"}
            return
        print(f"[bench_daemon] coldstart: {name}: {key} ...", file=sys.stderr, flush=True)
        try:
            rows[key] = {"status": "ok", **fn()}
        except Exception as exc:
            rows[key] = {"status": "error", "note": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()

    def note(row: dict, text: str) -> None:
        row["note"] = (row["note"] + "; " if row.get("note") else "") + text

    if device.type == "cuda":
        cache = tempfile.mkdtemp(prefix="ro-cache-", dir=workdir)  # empty: a cold compile
        ro_env = child_env({"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")})
        attempt("reduce-overhead", lambda: run_child("coldstart-ro", base, env=ro_env, cwd=workdir,
                                                     timeout_s=budget.timeout(args.coldstart_timeout)))
    else:
        rows["reduce-overhead"] = {"status": "n/a", "note": "needs CUDA"}

    opts = {**base, "endpoint": daemon.endpoint, "calls": COLD_START_CALLS}
    session = f"{COLD_SESSION_NAME}-{name}"
    attempt("registering-client", lambda: run_child(
        "coldstart-daemon", {**opts, "session": session, "exit_without_bye": True},
        env=env, cwd=workdir, timeout_s=budget.timeout(args.coldstart_timeout)))

    def cold_client(session_name: str, client_env: dict) -> dict:
        before = daemon.status()["devices"][0]
        result = run_child("coldstart-daemon", {**opts, "session": session_name}, env=client_env, cwd=workdir,
                           timeout_s=budget.timeout(args.coldstart_timeout))
        # The graph and its weights were on the device already: nothing new decoded or sent.
        result["graph_was_registered"] = (result["daemon_graphs"] == before["graphs"]
                                          and result["daemon_weights"] == before["weights"])
        return result

    cold_keys = ("daemon-new-session", "daemon-new-session-uncached", "daemon-named-session")
    registering = rows.get("registering-client", {})
    if registering.get("status") == "ok":
        attempt("daemon-new-session", lambda: cold_client("", env))
        # Before the named session is adopted: its bye at the end drops the graph's last holder.
        attempt("daemon-new-session-uncached", lambda: cold_client("", env_uncached))
        attempt("daemon-named-session", lambda: cold_client(session, env))
        named = rows.get("daemon-named-session", {})
        if named.get("status") == "ok":
            named["adopted"] = named.get("session_id") == registering.get("session_id")
            if not named["adopted"]:
                note(named, "the named session was not adopted (a new session was opened)")
        for key in cold_keys:
            row = rows.get(key, {})
            if row.get("status") != "ok":
                continue
            if not row.get("graph_was_registered"):
                note(row, "the daemon's graph or weight count changed: it was not simply reused")
            if row.get("graph_id") != registering.get("graph_id"):
                note(row, "its graph id differs from the registering client's")
            cache_outcome = (row.get("lowering") or {}).get("graph_cache")
            if key != "daemon-new-session-uncached" and cache_outcome != "hit":
                note(row, f"the graph cache did not hit ({cache_outcome}: {(row.get('lowering') or {}).get('detail')})")
    else:
        for key in cold_keys:
            rows[key] = {"status": "error", "note": "the registering client failed"}
    for key in ("registering-client", *cold_keys):
        row = rows.get(key, {})
        err = row.get("max_rel_err")
        if row.get("status") == "ok" and not (err is not None and err <= MAX_REL_ERR):
            row["status"], row["note"] = "incorrect", f"max relative error {err} > {MAX_REL_ERR:g}"
    return {"paths": rows, "graph_cache_dir": graph_cache_dir}


def run_coldstart(section: dict, args, device: torch.device, workdir: str, budget: Budget) -> None:
    section.update({"status": "ok", "models": {}})
    with Daemon(args.daemon_devices, os.path.join(workdir, "coldstart")).start(budget.timeout(DAEMON_START_TIMEOUT_S)) as daemon:
        for name in args.coldstart_models:
            if budget.remaining() < 30:
                section["models"][name] = {"status": "skipped", "note": "time budget"}
                continue
            section["models"][name] = run_coldstart_model(name, args, device, daemon, os.path.join(workdir, f"cold-{name}"), budget)
        section["daemon_log_tail"] = daemon.log_tail(15)


# ---------------------------------------------------------------------------------------------
# Targets, environment, reports
# ---------------------------------------------------------------------------------------------


def evaluate_targets(sections: dict) -> list[dict]:
    targets = []

    def add(section: str, model: str, target: str, ratio: Optional[float], limit: float) -> None:
        status = "n/a" if ratio is None else ("pass" if ratio <= limit else "fail")
        targets.append({"section": section, "model": model, "target": target, "ratio": ratio, "limit": limit, "status": status})

    latency = sections.get("latency") or {}
    for model, data in (latency.get("models") or {}).items():
        if model in LATENCY_TARGETS and "ratios" in data:
            limit = LATENCY_TARGETS[model]
            add("latency", model, f"daemon-ipc sync p50 <= {limit:g} x reduce-overhead",
                data["ratios"]["daemon-ipc/reduce-overhead"]["sync_p50"], limit)
    memory = sections.get("memory") or {}
    for key, ratio in (memory.get("ratios") or {}).items():
        add("memory", memory.get("model", ""), f"{key.split('/')[0]} total GPU memory <= {MEMORY_TARGET:g} x "
            f"{memory.get('clients')} reduce-overhead processes", ratio, MEMORY_TARGET)
    coldstart = sections.get("coldstart") or {}
    for model, data in (coldstart.get("models") or {}).items():
        paths = data.get("paths") or {}
        ro = paths.get("reduce-overhead") or {}
        for key in ("daemon-new-session", "daemon-named-session"):
            row = paths.get(key) or {}
            ratio = _ratio(row.get("first_submit_ms") if row.get("status") == "ok" else None,
                           ro.get("first_three_ms") if ro.get("status") == "ok" else None)
            add("coldstart", model, f"{key} first submit <= {COLDSTART_TARGET:g} x reduce-overhead first 3 calls", ratio, COLDSTART_TARGET)
        for key in ("daemon-new-session", "daemon-named-session"):
            # Informational: how much of the first submit is the client's own lowering.
            row = paths.get(key) or {}
            ratio = _ratio(row.get("first_submit_excl_lowering_ms") if row.get("status") == "ok" else None,
                           ro.get("first_three_ms") if ro.get("status") == "ok" else None)
            add("coldstart", model, f"(info) {key} first submit without lowering <= {COLDSTART_TARGET:g} x "
                "reduce-overhead first 3 calls", ratio, COLDSTART_TARGET)
        # Informational: a new client without a graph cache (it lowers the model itself).
        row = paths.get("daemon-new-session-uncached") or {}
        ratio = _ratio(row.get("first_submit_ms") if row.get("status") == "ok" else None,
                       ro.get("first_three_ms") if ro.get("status") == "ok" else None)
        add("coldstart", model, f"(info) daemon-new-session-uncached first submit (no graph cache) <= "
            f"{COLDSTART_TARGET:g} x reduce-overhead first 3 calls", ratio, COLDSTART_TARGET)
    return targets


def environment(device: torch.device) -> dict:
    from benchmarks.bench_inprocess import environment as inprocess_environment

    env = inprocess_environment(device)
    env["pyzmq"] = None
    with contextlib.suppress(Exception):
        import zmq

        env["pyzmq"], env["libzmq"] = zmq.__version__, zmq.zmq_version()
    if device.type == "cuda":
        rows = _smi("--query-gpu=name,driver_version,memory.total")
        env["nvidia_smi"] = rows[0] if rows else None
        env["pytorch_cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return env




def _status(row: dict) -> str:
    return row.get("status", "?") + (f" ({row['note']})" if row.get("note") else "")


def render_markdown(report: dict) -> str:
    env, config = report["environment"], report["config"]
    lines = [
        "## Daemon: round trip, memory, cold start",
        "",
        f"torch {env['torch']} (CUDA {env['torch_cuda']}), Python {env['python']}, pyzmq {env.get('pyzmq')}, "
        f"device {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else "")
        + f", cgtree {env.get('cgtree_commit') or '?'}; sections {', '.join(config['sections'])}.",
        "",
    ]
    sections = report["sections"]
    latency = sections.get("latency")
    if latency:
        lines += [f"### Round trip per call ({config['rounds']} rounds x {config['iters']} calls per path, "
                  f"{config['warmup']} warmup; sync = call + torch.cuda.synchronize())", ""]
        if latency.get("status") != "ok":
            lines += [_status(latency), ""]
        for name, data in latency.get("models", {}).items():
            if "paths" not in data:
                lines += [f"#### {name}: {_status(data)}", ""]
                continue
            lines += [f"#### {name}: {data['description']}", "",
                      "| path | inputs | sync p50 (us) | sync p99 (us) | async mean (us) | in daemon p50 (us) | client: prepare / request / outputs p50 (us) | first 3 calls (ms) | max rel err | status |",
                      "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
            for path, row in data["paths"].items():
                sync = row["sync"] or {}
                err = row["max_rel_err"]
                lines.append(f"| {path} | {row['inputs']} | {_fmt(sync.get('p50_us'))} | {_fmt(sync.get('p99_us'))} | "
                             f"{_fmt(row['async_mean_us'])} | {_fmt((row.get('details') or {}).get('daemon_us_p50'))} | "
                             f"{_client_phases(row.get('details') or {})} | "
                             f"{_fmt((row['cold_start_ms'] or {}).get('total'), 2)} | "
                             f"{'-' if err is None else f'{err:.1e}'} | {_status(row)} |")
            lines += ["", "| ratio | sync p50 | sync p99 | async mean |", "|---|---:|---:|---:|"]
            for key, ratio in data["ratios"].items():
                lines.append(f"| {key} | {_fmt_ratio(ratio['sync_p50'])} | {_fmt_ratio(ratio['sync_p99'])} | {_fmt_ratio(ratio['async_mean'])} |")
            lines.append("")
    memory = sections.get("memory")
    if memory:
        lines += [f"### GPU memory: {memory.get('clients', config['clients'])} processes running "
                  f"{memory.get('model', config['memory_model'])}", ""]
        if memory.get("status") != "ok":
            lines += [_status(memory), ""]
        if memory.get("groups"):
            lines += ["| setup | GPU memory used (MiB) | mem_get_info delta (MiB) | daemon (MiB) | clients with a CUDA context | per client (MiB) | left after teardown (MiB) | status |",
                      "|---|---:|---:|---:|---:|---|---:|---|"]
            for kind, group in memory["groups"].items():
                per = group.get("per_process_mib") or {}
                clients = per.get("clients")
                per_client = "-" if clients is None else (f"{min(clients):,.0f}-{max(clients):,.0f}" if clients else "-")
                with_ctx = per.get("clients_with_cuda_context")
                lines.append(f"| {MEMORY_GROUP_LABELS.get(kind, kind)} | {_fmt(group.get('total_mib'), 0)} | "
                             f"{_fmt(group.get('torch_mem_get_info_delta_mib'), 0)} | {_fmt(per.get('daemon'), 0)} | "
                             f"{'-' if with_ctx is None else with_ctx} | {per_client} | "
                             f"{_fmt(group.get('left_after_teardown_mib'), 0)} | {_status(group)} |")
            lines += ["", "| ratio (total GPU memory) | value |", "|---|---:|"]
            for key, ratio in memory.get("ratios", {}).items():
                lines.append(f"| {key} | {_fmt_ratio(ratio)} |")
            lines.append("")
    coldstart = sections.get("coldstart")
    if coldstart:
        lines += ["### Cold start: a new process, graph already in the daemon", "",
                  "First submit = Client() creation to the first output ready: `client.register(model, [x])` "
                  "(lowering, or a graph-cache hit; hello; register) + `client.submit`; for reduce-overhead, its first call "
                  "(empty inductor cache). Client processes run with `CGTREE_GRAPH_CACHE` set (the registering client "
                  "writes the entry, later ones read it), except `daemon-new-session-uncached`. The process column says "
                  "[lowering route, graph cache outcome]. Process start = just before spawn (Python, torch import, CUDA init).", ""]
        if coldstart.get("status") != "ok":
            lines += [_status(coldstart), ""]
        for name, data in coldstart.get("models", {}).items():
            if "paths" not in data:
                lines += [f"#### {name}: {_status(data)}", ""]
                continue
            lines += [f"#### {name}", "",
                      "| process | first submit (ms) | lower / register / submit (ms) | first submit without lowering (ms) | first 3 calls (ms) | process start to first result (s) | modes | status |",
                      "|---|---:|---|---:|---:|---:|---|---|"]
            for key, row in data["paths"].items():
                if not isinstance(row, dict):
                    continue
                parts = row.get("breakdown_ms") or {}
                split = "-" if not parts else f"{_fmt(parts.get('lower_encode'))} / {_fmt(parts.get('hello_register'))} / {_fmt(parts.get('submit'))}"
                how = row.get("lowering") or {}
                label = f"{key} [{how.get('route')}, cache {how.get('graph_cache')}]" if how else key
                lines.append(f"| {label} | {_fmt(row.get('first_submit_ms'))} | {split} | "
                             f"{_fmt(row.get('first_submit_excl_lowering_ms'))} | {_fmt(row.get('first_three_ms'))} | "
                             f"{_fmt(row.get('process_start_to_first_result_s'), 2)} | {', '.join(row.get('modes') or []) or '-'} | {_status(row)} |")
            lines.append("")
    lines += ["### Targets", "", "| section | model | target | ratio | result |", "|---|---|---|---:|---|"]
    for target in report["targets"]:
        lines.append(f"| {target['section']} | {target['model']} | {target['target']} | {_fmt_ratio(target['ratio'])} | {target['status']} |")
    lines.append("")
    return "\n".join(lines)


MEMORY_GROUP_LABELS = {
    "reduce-overhead": "N x torch.compile(reduce-overhead)",
    "daemon": "cgtreed + N clients without CUDA",
    "daemon-cuda-clients": "cgtreed + N clients with CUDA tensors (CUDA context each)",
}
MEMORY_GROUPS = tuple(MEMORY_GROUP_LABELS)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (smoke mode)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated (default: {','.join(SECTIONS)})")
    parser.add_argument("--quick", action="store_true", help="fewer calls; cold start on tiny only; no Client.submit memory group")
    parser.add_argument("--models", default=None, help="latency models (default: all)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per path per round (default 1000; quick 300; cpu 100/20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per round (default iters/10, at least 5)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all paths (default 3; quick 2; cpu 2/1)")
    parser.add_argument("--clients", type=int, default=8, help="processes per memory group (default 8)")
    parser.add_argument("--memory-model", default="mlp24")
    parser.add_argument("--memory-calls", type=int, default=5, help="calls per memory client before measuring (default 5)")
    parser.add_argument("--memory-groups", default=None, help=f"comma-separated (default: {','.join(MEMORY_GROUPS)}; quick without daemon-cuda-clients)")
    parser.add_argument("--memory-timeout", type=float, default=120.0, help="seconds for a memory group's clients to be ready")
    parser.add_argument("--coldstart-models", default=None, help="default: all models (quick: tiny)")
    parser.add_argument("--coldstart-timeout", type=float, default=90.0, help="seconds per cold-start process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=0.0, help="skip what would start after this many seconds (0: no limit)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "results" / "bench_daemon.json")
    parser.add_argument("--md", type=Path, default=None, help="markdown tables (default: --json with .md)")
    parser.add_argument("--fail-on-target", action="store_true", help="exit 3 when a target is missed")
    args = parser.parse_args(argv)

    cpu = args.device.startswith("cpu")
    args.sections = [s for s in args.sections.split(",") if s]
    args.models = [m for m in (args.models or ",".join(model_names())).split(",") if m]
    args.coldstart_models = [m for m in (args.coldstart_models or ("tiny" if args.quick else ",".join(model_names()))).split(",") if m]
    default_groups = [g for g in MEMORY_GROUPS if not (args.quick and g == "daemon-cuda-clients")]
    args.memory_groups = [g for g in (args.memory_groups or ",".join(default_groups)).split(",") if g]
    unknown = ([s for s in args.sections if s not in SECTIONS] + [m for m in args.models + args.coldstart_models if m not in model_names()]
               + [g for g in args.memory_groups if g not in MEMORY_GROUPS] + ([args.memory_model] if args.memory_model not in model_names() else []))
    if unknown:
        parser.error(f"unknown section, model or memory group: {', '.join(unknown)}")
    if args.iters is None:
        args.iters = (20 if args.quick else 100) if cpu else (300 if args.quick else 1000)
    if args.rounds is None:
        args.rounds = (1 if args.quick else 2) if cpu else (2 if args.quick else 3)
    if args.iters < 1 or args.rounds < 1 or args.clients < 1 or args.memory_calls < 3:
        parser.error("--iters, --rounds, --clients must be at least 1, --memory-calls at least 3 (warmup, record, replay)")
    if args.warmup is None:
        args.warmup = max(5, args.iters // 10)
    if args.md is None:
        args.md = args.json.with_suffix(".md")
    return args


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM (a caller's timeout) into an exception: finally blocks stop the daemons.
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available; use --device cpu for a smoke run", file=sys.stderr)
            return 2
        if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
            # Read when the allocator starts (below): CUDA IPC exports need the classic allocator.
            print("note: PYTORCH_CUDA_ALLOC_CONF had expandable_segments:True; using False (CUDA IPC)", file=sys.stderr)
        os.environ.update(ALLOC_ENV)
        device = torch.device("cuda", device.index if device.index is not None else 0)
        torch.cuda.set_device(device)
        sync = torch.cuda.synchronize
        args.daemon_devices = str(device)
    elif device.type == "cpu":
        sync = lambda: None  # noqa: E731
        args.daemon_devices = "cpu"
    else:
        print(f"unsupported device {device}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _on_sigterm)
    atexit.register(stop_all_processes)
    budget = Budget(args.time_budget)
    workdir = tempfile.mkdtemp(prefix="cgtb-", dir="/tmp")  # short: ipc socket paths live here
    # reduce-overhead in this process compiles into a temporary cache (as bench_inprocess does);
    # the memory section's processes reuse it (their compile time is not what they measure).
    cache_dir = os.path.join(workdir, "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    started = time.perf_counter()

    report: dict[str, Any] = {
        "benchmark": "daemon",
        "schema": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "config": {
            "device": str(device), "sections": args.sections, "quick": args.quick, "models": args.models,
            "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds, "seed": args.seed,
            "clients": args.clients, "memory_model": args.memory_model, "memory_calls": args.memory_calls,
            "memory_groups": args.memory_groups, "coldstart_models": args.coldstart_models,
            "time_budget_s": args.time_budget, "max_rel_err": MAX_REL_ERR, "daemon_config": DAEMON_CONFIG,
            "grad_mode": "no_grad (timed calls)",
        },
        "sections": {},
    }
    interrupted = None
    try:
        for name in SECTIONS:
            if name not in args.sections:
                continue
            if name == "memory" and device.type != "cuda":
                report["sections"]["memory"] = {"status": "n/a", "note": "needs CUDA"}
                continue
            if interrupted or budget.remaining() < 30:
                report["sections"][name] = {"status": "skipped", "note": interrupted or "time budget"}
                continue
            section = report["sections"][name] = {"status": "running"}
            try:
                if name == "latency":
                    run_latency(section, args, device, sync, workdir, budget)
                elif name == "memory":
                    run_memory(section, args, device, workdir, budget)
                else:
                    run_coldstart(section, args, device, workdir, budget)
            except (KeyboardInterrupt, SystemExit) as exc:
                # A caller's timeout (SIGTERM) or Ctrl-C: keep what was measured, report, stop.
                interrupted = f"interrupted ({type(exc).__name__} {exc})".replace(" )", ")")
                section["status"], section["note"] = "error", interrupted
            except Exception as exc:  # one section failing must not cost the others' numbers
                traceback.print_exc()
                section["status"], section["note"] = "error", f"{type(exc).__name__}: {exc}"
    finally:
        stop_all_processes()
        report["wall_s"] = time.perf_counter() - started
        report["targets"] = evaluate_targets(report["sections"])
        report["failed"] = _failures(report["sections"])
        report["ok"] = not report["failed"]
        for path in (args.json, args.md):
            path.parent.mkdir(parents=True, exist_ok=True)
        markdown = render_markdown(report)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        args.md.write_text(markdown)
        print(markdown)
        print(f"wrote {args.json} and {args.md} ({report['wall_s']:.0f} s)", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)

    if report["failed"]:
        print(f"FAILED: {', '.join(report['failed'])}", file=sys.stderr)
        return 2 if interrupted is None else 128 + signal.SIGTERM
    if args.fail_on_target and any(t["status"] == "fail" for t in report["targets"]):
        print("missed target(s)", file=sys.stderr)
        return 3
    return 0


def _failures(sections: dict) -> list[str]:
    bad = ("error", "incorrect")
    failed = [name for name, s in sections.items() if s.get("status") in bad]
    for name, data in (sections.get("latency") or {}).get("models", {}).items():
        failed += [f"latency/{name}/{p}" for p, row in data.get("paths", {}).items() if row["status"] in bad]
    for kind, group in (sections.get("memory") or {}).get("groups", {}).items():
        if group.get("status") in bad:
            failed.append(f"memory/{kind}")
    for name, data in (sections.get("coldstart") or {}).get("models", {}).items():
        failed += [f"coldstart/{name}/{k}" for k, row in data.get("paths", {}).items()
                   if isinstance(row, dict) and row.get("status") in bad]
    return failed


def child_main(argv: list[str]) -> int:
    role, opts = argv[0], json.loads(argv[1])
    CHILD_ROLES[role](opts)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main())
