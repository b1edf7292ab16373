#!/usr/bin/env python3
"""Where a steady-state submit's time goes, stage by stage, in both processes.

Starts a ``cgtreed`` (``--devices cuda:0``) in a wrapper that stamps the daemon's stages, runs a
submit loop in this process with the client's stages stamped, and prints the p50 of every gap
between consecutive stages over the loop. Both processes read ``time.perf_counter_ns``
(CLOCK_MONOTONIC on Linux), so stamps of the two sides compare directly.

- By default the client rings the lane's doorbell page (``cgtree.daemon.doorbell``), as a
  default ``Client`` does: stages call, graph_call (the compile backend), submit, plan_run,
  rung, verdict | daemon_woke, rung_taken, plan_dispatch, run_plan, tree_call, gate_wait,
  gate_passed, replay_start, replay_launched, signal_start, signalled, run_plan_done, answered |
  acked, outputs_built, done_seen, plan_run_done, submit_done, graph_done, call_done,
  caller_synced. A gated run (the default for a hot plan, ``cgtree.daemon.doorbell``) rings
  before the client's checks, whose end is ``verdict``; the daemon's ``gate_wait`` ->
  ``gate_passed`` is how long it waited for it. Gaps are between stages in time order.
- ``--lane``: ``Client(doorbell=False)``: plan runs as lane datagrams, with the daemon's host
  synchronize (request_sent, read_start/read_done, sync_start/synchronized, send_start/
  send_done, reply_received instead of the page's stages).
- Then the same model under ``torch.compile(backend="cgtree")`` in this process, stamped the
  same way (call, tree_call, replay_start, replay_launched, call_done, caller_synced), and
  ``mode="reduce-overhead"`` timed whole, for reference.

    python3 benchmarks/submit_stages.py --model gpt            # or tiny, mlp24; --lane
    python3 benchmarks/submit_stages.py --model gpt --json results/stages_gpt.json

Models: ``tiny``/``mlp24`` (``benchmarks/models.py``) submitted directly with one handle;
``gpt`` (``benchmarks/gpt.py``) and the inference cases of ``benchmarks/real_models.py`` (``gpt2``,
``llama``, ``bert``, ...) through ``torch.compile(backend=cgtree.client.backend(client))``
with ``daemon.compile = "inductor"``. Stamps are function wrappers (a fraction of a
microsecond each); read the figures as a breakdown, and take latency targets from
``bench_daemon.py`` / ``bench_compile.py``. Plan runs need CUDA: without it the script says so
and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.append(str(REPO_ROOT))  # appended: an installed cgtree wins over the bare folder

STAMPS_ENV = "CGTREE_STAGES_OUT"
LANE_ENV = "CGTREE_STAGES_LANE"
_now = time.perf_counter_ns

# Stages in the order a plan run passes them: client, daemon, client again (a run stamps the
# ones of its transport: the page's or the lane's).
CLIENT_BEFORE = ("call", "graph_call", "submit", "plan_run", "request_sent", "rung", "verdict")
DAEMON_ORDER = ("daemon_woke", "read_start", "read_done", "rung_taken", "plan_dispatch", "run_plan", "tree_call",
                "gate_wait", "gate_passed", "replay_start", "replay_launched", "sync_start", "synchronized", "signal_start", "signalled",
                "run_plan_done", "answered", "send_start", "send_done")
CLIENT_AFTER = ("reply_received", "acked", "outputs_built", "done_seen", "plan_run_done", "submit_done", "graph_done",
                "call_done", "caller_synced")
ORDER = CLIENT_BEFORE + DAEMON_ORDER + CLIENT_AFTER
DAEMON_STAGES = frozenset(DAEMON_ORDER)
# Stamped before the plan's dispatch: the daemon's last ones before it belong to the run.
DAEMON_PRELUDE = frozenset(("daemon_woke", "read_start", "read_done", "rung_taken"))
FIRST_DAEMON_STAGE = "plan_dispatch"  # one per plan run: the daemon's sequences are keyed on it


def _wrap(owner: Any, name: str, stamps: list, before: str | None, after: str | None,
          when: Callable[[Any], bool] = lambda result: True) -> None:
    original = getattr(owner, name)

    def stamped(*args: Any, **kwargs: Any) -> Any:
        if before:
            stamps.append((before, _now()))
        result = original(*args, **kwargs)
        if after and when(result):
            stamps.append((after, _now()))
        return result

    setattr(owner, name, stamped)


def resolve(target: str) -> tuple[Any, str]:
    """``"package.module:Owner.attr"`` (or ``"package.module:function"``) -> (owner, attribute name)."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *owners, name = path.split(".")
    for part in owners:
        owner = getattr(owner, part)
    if not hasattr(owner, name):
        raise AttributeError(f"{target}: no such attribute to stamp")
    return owner, name


# (what is wrapped, stamp before the call, stamp after it[, only when the result says so])
TREE_STAMPS = (
    ("cgtree.manager:TreeManager._call", "tree_call", None),
    ("cgtree.backends.cuda:CudaGraphBackend.replay", "replay_start", "replay_launched"),
)
DAEMON_STAMPS = (
    ("cgtree.daemon.waiting:Waiter._poll_spinning", None, "daemon_woke", bool),
    ("cgtree.daemon.lane:LaneHub.read", "read_start", "read_done"),
    ("cgtree.daemon.doorbell:Doorbell.take", None, "rung_taken", lambda taken: taken is not None),
    ("cgtree.daemon.dispatch:Dispatcher.answer_plan", "plan_dispatch", None),
    ("cgtree.daemon.dispatch:run_plan", "run_plan", "run_plan_done"),  # as the dispatch module calls it
    ("cgtree.daemon.doorbell:Doorbell.signal_done", "signal_start", "signalled"),
    ("cgtree.daemon.doorbell:Doorbell.answer", None, "answered"),
    ("cgtree.daemon.doorbell:LaunchGate.__call__", "gate_wait", "gate_passed"),
    ("cgtree.daemon.lane:LaneHub.send", "send_start", "send_done"),
)
# A lane plan run synchronizes right after launching its replay. (Not stamped with a doorbell:
# the daemon synchronizes there only before it sleeps, which would stamp the wrong run.)
LANE_DAEMON_STAMPS = (("cgtree.daemon.graphs:DeviceRuntime.synchronize", "sync_start", "synchronized"),)
CLIENT_STAMPS = (
    ("cgtree.client.compile_backend:DaemonGraph.__call__", "graph_call", "graph_done"),
    ("cgtree.client.client:Client.submit", "submit", "submit_done"),
    # The compile backend submits a graph that writes no input with its weight check as the observation.
    ("cgtree.client.client:Client.submit_observing", "submit", "submit_done"),
    # ... and one that writes its inputs with the weight check as its veto (run after the ring when gated).
    ("cgtree.client.client:Client.submit_vetoable", "submit", "submit_done"),
    ("cgtree.client.plans:Plans.submit_planned", "plan_run", "plan_run_done"),
    ("cgtree.client.plans:Plans.outputs_of", None, "outputs_built"),
    ("cgtree.client.lane:ClientLane.request", "request_sent", "reply_received"),
    ("cgtree.client.doorbell:ClientDoorbell.ring", None, "rung"),
    ("cgtree.client.doorbell:ClientDoorbell.verdict", None, "verdict"),
    ("cgtree.client.doorbell:ClientDoorbell.wait_ack", None, "acked"),
    ("cgtree.client.doorbell:ClientDoorbell.wait_done", None, "done_seen"),
)


def install_stamps(table: tuple, stamps: list) -> None:
    for target, before, after, *when in table:
        owner, name = resolve(target)
        _wrap(owner, name, stamps, before, after, *when)


# ---------------------------------------------------------------------------------------------
# Daemon side


def daemon_main(argv: list[str]) -> int:
    from cgtree.daemon import main as daemon_entry

    stamps: list = []
    install_stamps(DAEMON_STAMPS + TREE_STAMPS + (LANE_DAEMON_STAMPS if os.environ.get(LANE_ENV) == "1" else ()), stamps)
    code = daemon_entry.main(argv)
    Path(os.environ[STAMPS_ENV]).write_text(json.dumps(stamps))
    return code


# ---------------------------------------------------------------------------------------------
# Alignment (pure)


def daemon_sequences(stamps: list) -> list[dict]:
    """One dict of stage -> ns per plan run: the wake-up and read that preceded its dispatch,
    then the first of each later daemon stage."""
    sequences, current, last = [], None, {}
    for stage, t in stamps:
        if stage in DAEMON_PRELUDE:
            last[stage] = t
            continue
        if stage == FIRST_DAEMON_STAGE:
            current = {**last, stage: t}
            sequences.append(current)
        elif current is not None and stage in DAEMON_STAGES and stage not in current:
            current[stage] = t
    return sequences


def client_sequences(stamps: list) -> list[dict]:
    """One dict of stage -> ns per call: a call starts at its ``call`` stamp (or, for a loop
    that stamps none, at ``submit``)."""
    sequences, current = [], None
    for stage, t in stamps:
        if stage == "call" or (stage == "submit" and (current is None or "submit" in current)):
            current = {}
            sequences.append(current)
        if current is not None and stage not in current:
            current[stage] = t
    return sequences


def stage_table(client: list[dict], daemon: list[dict]) -> list[dict]:
    """p50/mean of each gap between consecutive stages (the i-th client call with the i-th
    daemon plan run, counted from the end; ``daemon`` empty for an in-process loop), and of
    the whole call."""
    if daemon:
        pairs = list(zip(client[-len(daemon):], daemon[-len(client):]))
    else:
        pairs = [(c, {}) for c in client]
    gaps: dict[str, list[float]] = {}
    for c, d in pairs:
        merged = {**c, **d}
        # In time order: a gated run (cgtree.daemon.doorbell) interleaves the client's checks
        # with the daemon's work, so the listed order is not always the order things happened.
        present = sorted((s for s in ORDER if s in merged), key=lambda s: merged[s])
        for a, b in zip(present, present[1:]):
            gaps.setdefault(f"{a} -> {b}", []).append((merged[b] - merged[a]) / 1e3)
        first = "call" if "call" in merged else "submit"
        if first in merged and "caller_synced" in merged:
            gaps.setdefault(f"whole call ({first} -> caller_synced)", []).append((merged["caller_synced"] - merged[first]) / 1e3)
    return [{"gap": gap, "p50_us": round(statistics.median(v), 1), "mean_us": round(statistics.fmean(v), 1), "n": len(v)}
            for gap, v in gaps.items()]


# ---------------------------------------------------------------------------------------------
# Client side


def _model_call(name: str, client: Any, device: Any) -> tuple[Callable[[], Any], Any, tuple]:
    """(call, the eager module, its inputs) for ``name``."""
    import torch

    if name == "gpt":
        from benchmarks.gpt import GPTConfig, build_gpt, step_inputs
        from cgtree.client import backend

        cfg = GPTConfig()
        compiled = torch.compile(build_gpt(cfg, device, seed=0), backend=backend(client), fullgraph=True)
        inputs = step_inputs(cfg, device, cfg.max_seq // 2)
        return (lambda: compiled(*inputs)), build_gpt(cfg, device, seed=0), inputs
    if name not in ("tiny", "mlp24"):
        return _real_model_call(name, client, device)
    from benchmarks.models import build_model

    model = build_model(name, device, seed=0)
    with torch.enable_grad():
        handle = client.register(model.module, list(model.inputs), device=str(device))
    return (lambda: client.submit(handle, model.inputs)), model.module, tuple(model.inputs)


def _real_model_call(name: str, client: Any, device: Any) -> tuple[Callable[[], Any], Any, tuple]:
    """A ``benchmarks/real_models.py`` inference case (gpt2, llama, bert, ...) through
    ``torch.compile(backend=cgtree.client.backend(client))``, called as ``bench_models.py`` calls it."""
    import torch

    from benchmarks import real_models
    from cgtree.client import backend

    case = next(iter(real_models.cases(names=[name])))
    built = case.build(device)
    inputs, kwargs = built.inputs(0), built.kwargs(0)
    compiled = torch.compile(built.module, backend=backend(client))
    call = _with_kwargs(built.module, kwargs)
    return (lambda: compiled(*inputs, **kwargs)), call, inputs


def _with_kwargs(module: Any, kwargs: dict) -> Any:
    """``module`` called with ``kwargs`` added: the in-process paths compile this."""
    import torch

    class WithKwargs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: Any) -> Any:
            return self.inner(*args, **kwargs)

    return WithKwargs()


def _stamped_loop(call: Callable[[], Any], stamps: list, warmup: int, iters: int) -> None:
    import torch

    for _ in range(warmup):
        call()
        torch.cuda.synchronize()
    stamps.clear()
    for _ in range(iters):
        stamps.append(("call", _now()))
        out = call()
        stamps.append(("call_done", _now()))
        torch.cuda.synchronize()
        stamps.append(("caller_synced", _now()))
        del out


def _through_daemon(args: argparse.Namespace, work: Path) -> tuple[list, Any, Any, tuple]:
    """(stage table, last execution, eager module, inputs) of the submit loop through a stamped daemon."""
    import torch

    from benchmarks.bench_compile import DAEMON_CONFIG as COMPILE_CONFIG
    from benchmarks.bench_daemon import DAEMON_CONFIG, child_env
    from cgtree.client import Client

    (work / "config.toml").write_text(COMPILE_CONFIG.format(compile="inductor") if args.model not in ("tiny", "mlp24") else DAEMON_CONFIG)
    socket_path, stamps_path = work / "s", work / "stamps.json"
    log = open(work / "cgtreed.log", "wb")
    env = child_env({STAMPS_ENV: str(stamps_path), LANE_ENV: "1" if args.lane else "0"})
    daemon = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--daemon", "--config", str(work / "config.toml"),
                               "--endpoint", f"ipc://{socket_path}", "--devices", "cuda:0"],
                              env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not socket_path.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cgtreed did not start:\n{(work / 'cgtreed.log').read_text()[-2000:]}")
            time.sleep(0.1)
        stamps: list = []
        install_stamps(CLIENT_STAMPS, stamps)
        client = Client(f"ipc://{socket_path}", timeout_s=600, doorbell=not args.lane)
        with torch.no_grad():
            call, module, inputs = _model_call(args.model, client, torch.device("cuda:0"))
            _stamped_loop(call, stamps, args.warmup, args.iters)
        execution = client.last_execution
        client.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    table = stage_table(client_sequences(stamps), daemon_sequences(json.loads(stamps_path.read_text())))
    return table, execution, module, inputs


def run(args: argparse.Namespace) -> dict:
    import torch

    import cgtree.compile  # noqa: F401  (registers backend="cgtree")

    work = Path(tempfile.mkdtemp(prefix="cgstages-"))
    table, execution, module, inputs = _through_daemon(args, work)
    stamps: list = []
    install_stamps(TREE_STAMPS, stamps)  # only the in-process loop below runs a tree manager in this process
    in_process = torch.compile(module, backend="cgtree", options={"compiler": "inductor"})
    with torch.no_grad():
        _stamped_loop(lambda: in_process(*inputs), stamps, args.warmup, args.iters)
    in_process_table = stage_table(client_sequences(stamps), [])
    reference = torch.compile(module, mode="reduce-overhead")
    reference_stamps: list = []
    with torch.no_grad():
        _stamped_loop(lambda: reference(*inputs), reference_stamps, args.warmup, args.iters)
    samples = [(c["caller_synced"] - c["call"]) / 1e3 for c in client_sequences(reference_stamps)]
    return {"model": args.model, "transport": "lane" if args.lane else "doorbell", "iters": args.iters,
            "last_execution": execution, "stages": table, "in_process_stages": in_process_table,
            "reduce_overhead_p50_us": round(statistics.median(samples), 1)}


def _print_table(title: str, rows: list) -> None:
    print(title)
    for row in rows:
        print(f"  {row['gap']:48s} p50 {row['p50_us']:8.1f} us   mean {row['mean_us']:8.1f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--daemon"]:
        return daemon_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny",
                        help="tiny, mlp24, gpt, or an inference case of benchmarks/real_models.py (gpt2, llama, bert, ...)")
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=500, help="untimed calls first (plans and their recordings settle)")
    parser.add_argument("--lane", action="store_true", help="plan runs on the lane's datagrams (Client(doorbell=False))")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("submit_stages: plan runs need CUDA; nothing to measure here", file=sys.stderr)
        return 2
    report = run(args)
    _print_table(f"{args.model} through cgtreed ({report['transport']}): {args.iters} calls; last: {report['last_execution']}",
                 report["stages"])
    _print_table(f"{args.model} under backend=\"cgtree\" in this process:", report["in_process_stages"])
    print(f"  reduce-overhead in this process: p50 {report['reduce_overhead_p50_us']} us")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
