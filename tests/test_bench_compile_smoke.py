"""``benchmarks/bench_compile.py --device cpu`` runs end to end on a machine without a GPU: the
GPT step compiles through backend="cgtree" (cpu-replay tree) and through a real cgtreed (CPU),
matches eager over a sequence of decoding steps, and the report has the rows it promises.

The model is shrunk (1 layer, d_model 64, 16 positions) so the run takes seconds; the GPU run
uses the issue's sizes. The inductor paths are n/a on the CPU (a cold compile takes ~18 s)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    """Import benchmarks/<name>.py by path (the repository root on sys.path would let the bare
    cgtree/ folder shadow the installed package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpt = _load("gpt")


def test_gpt_step_is_deterministic_and_writes_its_caches_in_place():
    cfg = gpt.GPTConfig(layers=2, d_model=32, heads=4, batch=2, max_seq=8, vocab=50)
    first, second = gpt.build_gpt(cfg, seed=3), gpt.build_gpt(cfg, seed=3)
    addresses = [t.data_ptr() for t in first.caches()]
    with torch.no_grad():
        for step in range(3):
            tokens, pos = gpt.step_inputs(cfg, "cpu", step)
            torch.testing.assert_close(first(tokens, pos), second(tokens, pos))
    assert [t.data_ptr() for t in first.caches()] == addresses
    assert all(t[:, :, :3].abs().sum() > 0 and t[:, :, 3:].abs().sum() == 0 for t in first.caches())


def test_bench_compile_cpu_smoke_run(tmp_path):
    # The inductor paths are asked for too: they must come back n/a, not fail.
    paths = "eager,reduce-overhead,cgtree,cgtree-aten"
    if importlib.util.find_spec("zmq") is not None:
        paths += ",daemon"
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_compile.py"), "--device", "cpu",
         "--paths", paths, "--iters", "3", "--layers", "1", "--d-model", "64", "--max-seq", "16",
         "--json", str(json_path), "--md", str(md_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(json_path.read_text())
    rows = report["results"]["paths"]
    for path in [p for p in paths.split(",") if p not in ("reduce-overhead", "cgtree")]:
        assert rows[path]["status"] == "ok", rows[path]
        assert rows[path]["sync"]["p50_us"] > 0 and rows[path]["async_mean_us"] > 0
        assert rows[path]["max_rel_err"] <= report["config"]["max_rel_err"]
    assert rows["cgtree-aten"]["details"]["backend"] == "cpu-replay"
    assert rows["cgtree-aten"]["details"]["last_execution_mode"] == "replayed"
    for path in ("reduce-overhead", "cgtree"):
        assert rows[path]["status"] == "n/a"
    assert "| cgtree-aten |" in md_path.read_text()
    if "daemon" in paths:
        assert rows["daemon"]["details"]["last_execution"]["mode"] == "replayed"
