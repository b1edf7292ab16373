"""The benchmarks keep working on a machine without a GPU: models are deterministic, the timing
helpers compute what they say, and ``bench_inprocess.py --device cpu`` runs end to end and
writes a report with eager and cgtree rows (the real numbers come from a GPU host)."""

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
    """Import benchmarks/<name>.py by path: putting the repository root on sys.path would let
    the bare cgtree/ folder shadow the installed package (whose daemon/ and client/ map in)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


timing = _load("timing")
_models = _load("models")
build_model, model_names = _models.build_model, _models.model_names


def _cgtree_manager_importable() -> bool:
    try:
        return importlib.util.find_spec("cgtree.manager") is not None
    except ImportError:
        return False


def test_models_are_the_two_of_the_notes():
    assert {"tiny", "mlp24"} <= set(model_names())
    tiny, mlp24 = build_model("tiny"), build_model("mlp24")
    assert tiny.inputs[0].shape == (16, 64) and tiny.num_static == 2 * 2
    assert mlp24.inputs[0].shape == (16, 512) and mlp24.num_static == 24 * 2


def test_same_seed_builds_the_same_model_and_input():
    first, second = build_model("tiny", seed=7), build_model("tiny", seed=7)
    other = build_model("tiny", seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first.static_tensors, second.static_tensors, strict=True))
    assert torch.equal(first.inputs[0], second.inputs[0])
    assert not torch.equal(first.static_tensors[0], other.static_tensors[0])


def test_building_a_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("tiny")
    assert torch.equal(torch.rand(3), expected)


def test_flat_forward_matches_the_module():
    model = build_model("tiny")
    with torch.no_grad():
        assert torch.equal(model.forward_flat(*model.static_tensors, *model.inputs), model.module(*model.inputs))


def test_percentile_is_nearest_rank():
    samples = [float(v) for v in range(1, 101)]
    assert timing.percentile(samples, 50) == 50.0
    assert timing.percentile(samples, 99) == 99.0
    assert timing.percentile(samples, 100) == 100.0
    assert timing.percentile([5.0], 99) == 5.0


def test_timing_helpers_count_calls_and_drop_outputs():
    calls = []
    syncs = []
    stats = timing.sync_stats(lambda: calls.append(1), iters=30, warmup=4, sync=lambda: syncs.append(1))
    assert len(calls) == 34 and stats.iters == 30
    assert stats.min_us <= stats.p50_us <= stats.p99_us
    assert len(syncs) >= 30  # one per timed sample
    calls.clear()
    assert timing.async_mean(lambda: calls.append(1), iters=10, warmup=2, sync=lambda: None) > 0
    assert len(calls) == 12


@pytest.mark.skipif(
    not _cgtree_manager_importable(),
    reason="cgtree.manager (the core's TreeManager) is not importable yet: nothing to benchmark",
)
def test_bench_inprocess_cpu_smoke_run(tmp_path):
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "bench_inprocess.py"),
            "--device", "cpu",
            "--iters", "20",
            "--models", "tiny",
            "--json", str(json_path),
            "--md", str(md_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(json_path.read_text())
    rows = report["models"]["tiny"]["paths"]
    for path in ("eager", "cgtree"):
        assert rows[path]["status"] == "ok", rows[path]
        assert rows[path]["sync"]["p50_us"] > 0
        assert rows[path]["async_mean_us"] > 0
        assert rows[path]["max_rel_err"] <= report["config"]["max_rel_err"]
    for path in ("reduce-overhead", "torch-tree", "cuda-graph"):
        assert rows[path]["status"] == "n/a"
    assert report["environment"]["torch"] == torch.__version__
    assert "| cgtree |" in md_path.read_text()
