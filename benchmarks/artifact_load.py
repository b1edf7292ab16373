#!/usr/bin/env python3
"""Where a fresh process spends its time loading an inductor artifact, and what warms it.

A restarted cgtreed loads each compiled graph from its ``standalone_compile`` artifact
(``daemon/compiling.py load_artifact``). On the H200 that took 3-4 s even for a small MLP,
which decides both the warm-restart target (#13) and the served-after-READY target (#14).
This script finds out where those seconds go, each case in a fresh child process (the cost
is a first-use-per-process cost, so it can only be measured there):

1. a ``compile`` child builds artifacts for a few graphs (an MLP, a small transformer-block
   stack, a tiny "canary" graph) with the daemon's own ``compile_artifact``;
2. one ``load`` child per variant times, after CUDA is initialised and inductor imported
   (what the daemon does before READY):
   - ``cold``: load the target artifact (under cProfile, top entries written out), first call,
     second call;
   - ``triton``: first import triton and start its driver, import inductor's Triton runtime
     (each timed), then the same;
   - ``canary``: first load and call the canary artifact (timed), then the same;
   - ``warmup``: first ``daemon.loader_warmup.warm()`` (what cgtreed runs before READY: its
     own canary), then the same.

Prints a table and writes JSON (``--json``). The artifacts live in a temporary inductor cache
that the children share, so every load is a cache hit as in a restarted daemon.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("cold", "triton", "canary", "warmup")
GRAPHS = ("mlp", "blocks")


def _graphs(device: str) -> dict:
    """name -> (function of tensors, example tensors); traced to ATen by make_fx."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    def mlp(w1, b1, w2, b2, x):
        return (torch.relu(x @ w1.t() + b1) @ w2.t() + b2,)

    def blocks(*args):
        *weights, x = args
        for i in range(0, len(weights), 4):
            wq, wo, w1, w2 = weights[i:i + 4]
            h = F.layer_norm(x, x.shape[-1:])
            q = h @ wq
            att = torch.softmax(q @ h.transpose(-1, -2) / 8.0, dim=-1) @ h
            x = x + att @ wo
            x = x + F.gelu(F.layer_norm(x, x.shape[-1:]) @ w1) @ w2
        return (x,)

    def canary(x):
        return (torch.relu(x) + 1.0,)

    block_weights = []
    for _ in range(4):
        block_weights += [rand(256, 256), rand(256, 256), rand(256, 1024), rand(1024, 256)]
    return {
        "mlp": (mlp, [rand(512, 256), rand(512), rand(256, 512), rand(256), rand(64, 256)]),
        "blocks": (blocks, block_weights + [rand(8, 128, 256)]),
        "canary": (canary, [rand(16)]),
    }


def _compile_child(directory: Path, device: str, wanted: set) -> dict:
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from cgtree.daemon.compiling import compile_artifact

    class Decoded:  # what compile_artifact reads from a decoded payload
        def __init__(self, module):
            self.module = module

    seconds = {}
    for name, (fn, examples) in _graphs(device).items():
        if name not in wanted:
            continue
        module = make_fx(fn)(*examples)
        seconds[name] = compile_artifact(Decoded(module), torch.device(device), directory / f"{name}.bin", examples)
    # The daemon's own canary, where cgtreed keeps it (the ``warmup`` variant loads it).
    from cgtree.daemon import loader_warmup
    from cgtree.payload import decode_graph

    target = torch.device(device)
    decoded = decode_graph(loader_warmup.canary_graph_bytes(), device=target)
    seconds["daemon_canary"] = compile_artifact(decoded, target, loader_warmup.canary_path(target))
    return {"compile_s": seconds}


def _timed_call(fn, examples, sync) -> float:
    started = time.perf_counter()
    fn(*examples)
    sync()
    return time.perf_counter() - started


def _load_child(directory: Path, device: str, variant: str, graph: str, profile_path: Path) -> dict:
    phases = {}
    started = time.perf_counter()
    import torch
    phases["import_torch"] = time.perf_counter() - started

    started = time.perf_counter()
    torch.empty(1, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    phases["device_init"] = time.perf_counter() - started

    from cgtree.daemon import compiling
    phases["prepare_to_load"] = compiling.prepare_to_load()

    examples = {name: ex for name, (_, ex) in _graphs(device).items()}
    if variant == "triton":
        started = time.perf_counter()
        import triton
        phases["import_triton"] = time.perf_counter() - started
        started = time.perf_counter()
        triton.runtime.driver.active.get_current_device()
        phases["triton_driver"] = time.perf_counter() - started
        started = time.perf_counter()
        from torch._inductor.runtime import triton_heuristics  # noqa: F401
        phases["import_triton_heuristics"] = time.perf_counter() - started
    elif variant == "canary":
        started = time.perf_counter()
        canary = compiling.load_artifact(directory / "canary.bin")
        phases["canary_load"] = time.perf_counter() - started
        phases["canary_call"] = _timed_call(canary, examples["canary"], sync)
    elif variant == "warmup":
        from cgtree.daemon import loader_warmup

        phases["warm_loader"] = loader_warmup.warm(torch.device(device))

    profiler = cProfile.Profile() if variant == "cold" else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    fn = compiling.load_artifact(directory / f"{graph}.bin")
    phases["load"] = time.perf_counter() - started
    phases["first_call"] = _timed_call(fn, examples[graph], sync)
    if profiler:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
        profile_path.write_text(text.getvalue())
    phases["second_call"] = _timed_call(fn, examples[graph], sync)
    return {"variant": variant, "graph": graph, "phases": phases,
            "load_and_first_call_s": phases["load"] + phases["first_call"]}


def _child(args: list, env: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per variant and graph")
    parser.add_argument("--json", default="artifact_load.json")
    parser.add_argument("--profile-dir", default=".", help="where the cold loads' cProfile tops go")
    parser.add_argument("--graphs", default=",".join(GRAPHS), help=f"comma-separated, of {', '.join(GRAPHS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--child", choices=("compile", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--graph", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    args = parser.parse_args()

    graphs, variants = args.graphs.split(","), args.variants.split(",")
    if args.child == "compile":
        print(json.dumps(_compile_child(Path(args.dir), args.device, {*graphs, "canary"})))
        return 0
    if args.child == "load":
        print(json.dumps(_load_child(Path(args.dir), args.device, args.variant, args.graph, Path(args.profile))))
        return 0

    results = {"device": args.device, "runs": []}
    with tempfile.TemporaryDirectory(prefix="cgtree-artifact-load-") as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"))
        directory = Path(tmp) / "artifacts"
        directory.mkdir()
        base = ["--device", args.device, "--dir", str(directory)]
        results["compile"] = _child(["--child", "compile", *base, "--graphs", args.graphs], env)
        print("compile:", results["compile"], flush=True)
        if "error" in results["compile"]:
            Path(args.json).write_text(json.dumps(results, indent=1))
            return 1
        print(f"{'graph':8} {'variant':8} {'load s':>8} {'1st call':>9} {'2nd call':>9}  before-load phases")
        for repeat in range(args.repeats):
            for graph in graphs:
                for variant in variants:
                    profile = Path(args.profile_dir) / f"artifact_load_profile_{graph}_{repeat}.txt"
                    run = _child(["--child", "load", *base, "--variant", variant, "--graph", graph,
                                  "--profile", str(profile)], env)
                    results["runs"].append(run)
                    if "error" in run:
                        print(graph, variant, "ERROR", run["error"][-600:], flush=True)
                        continue
                    p = run["phases"]
                    extra = {k: round(v, 3) for k, v in p.items()
                             if v is not None and k not in ("load", "first_call", "second_call")}
                    print(f"{graph:8} {variant:8} {p['load']:8.3f} {p['first_call']:9.4f} {p['second_call']:9.5f}  {extra}",
                          flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any("error" in run for run in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
