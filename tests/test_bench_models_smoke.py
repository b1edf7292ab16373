"""``benchmarks/bench_models.py --device cpu --smoke`` runs end to end on a machine without a
GPU (gpt2 and bert through eager, backend="cgtree" on the cpu-replay tree and a real cgtreed),
every row matches eager and says whether it was graphed, from counters; and the model zoo
(``benchmarks/real_models.py``) builds the same model twice from the same seed."""

from __future__ import annotations

import importlib.util
import json
import os
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


real_models = _load("real_models")


def test_zoo_lists_cases_and_filters():
    assert {"hf-causal-lm", "hf-encoder", "hf-vision", "timm", "torchvision", "hf-generate", "hf-train",
            "hf-breadth"} == {case.family for case in real_models.CASES.values()} == set(real_models.FAMILIES)
    assert all(name == case.name for name, case in real_models.CASES.items())
    assert sum(case.family == "hf-causal-lm" for case in real_models.CASES.values()) >= 4
    assert [c.name for c in real_models.cases(names=["bert", "gpt2"])] == ["gpt2", "bert"]
    assert {c.family for c in real_models.cases(families=["timm"])} == {"timm"}
    with pytest.raises(KeyError):
        real_models.cases(names=["no-such-model"])
    fake = real_models.ModelCase("fake", "timm", "surely_not_an_installed_library_xyz", lambda device: None)
    assert "surely_not_an_installed_library_xyz is not installed" == real_models.missing_library(fake)


def _run_once(built, family: str) -> torch.Tensor:
    step_args, step_kwargs = built.inputs(1), built.kwargs(1)
    with torch.no_grad():
        if family == "hf-generate":
            return built.output(built.module.generate(*step_args, **step_kwargs))
        return built.output(built.module(*step_args, **step_kwargs))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_zoo_hf_cases_build_on_cpu_and_repeat_for_the_same_seed():
    device = torch.device("cpu")
    hf_cases = [c for c in real_models.cases() if c.library == "transformers"]
    assert hf_cases and all(real_models.missing_library(c) is None for c in hf_cases)
    for case in hf_cases:
        first, second = case.build(device), case.build(device)
        a, b = _run_once(first, case.family), _run_once(second, case.family)
        assert isinstance(a, torch.Tensor) and torch.isfinite(a.float()).all(), case.name
        assert torch.equal(a, b), case.name
        # Fresh values per step, same shapes.
        x0, x1 = first.inputs(0)[0], first.inputs(1)[0]
        assert x0.shape == x1.shape and not torch.equal(x0, x1), case.name
        assert torch.equal(first.inputs(1)[0], second.inputs(1)[0]), case.name
        assert (case.family == "hf-train") == first.module.training, case.name


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_bench_models_cpu_smoke_run(tmp_path):
    paths = ["eager", "reduce-overhead", "cgtree"]
    if importlib.util.find_spec("zmq") is not None:
        paths.append("cgtreed")
    models = ["gpt2", "bert"]
    timm_case = real_models.CASES["resnet18-timm"]
    if real_models.missing_library(timm_case) is not None:
        models.append(timm_case.name)  # must come back "skipped: timm is not installed"
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_models.py"), "--device", "cpu", "--smoke",
         "--models", ",".join(models), "--paths", ",".join(paths), "--json", str(json_path), "--md", str(md_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    report = json.loads(json_path.read_text())
    by_name = {m["name"]: m for m in report["models"]}
    assert [m["name"] for m in report["models"]] == models
    assert report["child_starts"] == 1  # one child process ran every model
    for name in ("gpt2", "bert"):
        rows = by_name[name]["paths"]
        assert rows["reduce-overhead"]["status"] == "n/a" and rows["reduce-overhead"]["graphed"] is None
        for path in [p for p in paths if p != "reduce-overhead"]:
            row = rows[path]
            assert row["status"] == "ok", (name, path, row)
            assert row["max_rel_err"] <= report["config"]["max_rel_err"], (name, path, row)
            assert row["p50_us"] > 0 and row["timed_calls"] == report["config"]["iters"]
            assert len(row["round_p50_us"]) == report["config"]["rounds"] == 1  # CPU default
            assert "graphed" in row
        assert rows["eager"]["graphed"] is None
        # cgtree: the verdict is the tree manager's counters over the timed calls.
        tree = rows["cgtree"]
        assert isinstance(tree["graphed"], bool) and tree["graphed_note"]
        assert {"replays", "skipped_calls", "recordings", "warmups"} <= set(tree["counters_timed"])
        expected = (tree["counters_timed"]["replays"] >= tree["counted_calls"] >= tree["timed_calls"]
                    and tree["counters_timed"]["skipped_calls"] == 0)
        assert tree["graphed"] == expected, tree
        assert tree["details"]["backends"] == ["cpu-replay"]
        if "cgtreed" in paths:
            # cgtreed: the daemon's session counters plus the graphs the client kept.
            daemon = rows["cgtreed"]
            assert isinstance(daemon["graphed"], bool) and daemon["graphed_note"]
            assert "replays" in daemon["counters_timed"] or daemon["counters_life"].get("graphs_in_client")
            kept = daemon["counters_life"].get("graphs_in_client", 0)
            if kept:
                assert daemon["graphed"] is False and "ran in the client" in daemon["graphed_note"]
            else:
                assert daemon["graphed"] == (daemon["counters_timed"]["replays"] >= daemon["counted_calls"]
                                             and daemon["counters_timed"]["skipped_calls"] == 0), daemon
                # How the timed calls travelled: each was a submit of this row's own session.
                timed = daemon["counters_timed"]
                assert timed["session_submits"] >= daemon["counted_calls"] >= daemon["timed_calls"], timed
                assert timed["session_requests"] >= timed["session_submits"], timed
                assert {"session_lane_requests", "session_doorbell_requests", "session_gate_late"} <= set(timed)
            # What the daemon runs per graph of this session: the CPU daemon's default is ATen code.
            kernels = daemon["details"]["kernels"]
            assert kernels and all(k["kernels"] == "aten" and k["note"].startswith("daemon.compile") for k in kernels)
    if "cgtreed" in paths:
        graphs = [{k["graph"] for k in by_name[name]["paths"]["cgtreed"]["details"]["kernels"]} for name in ("gpt2", "bert")]
        assert not graphs[0] & graphs[1]  # one daemon for both models: each row lists its own session's graphs
        assert report["aten_code_in_daemon"] == []
    if "resnet18-timm" in by_name:
        assert by_name["resnet18-timm"]["status"] == "skipped"
        assert by_name["resnet18-timm"]["note"] == "skipped: timm is not installed"
    markdown = md_path.read_text()
    assert "| gpt2 | hf-causal-lm |" in markdown and "cgtree graphed" in markdown
    assert set(report["summary"]["graphed"]) == set(paths) - {"eager"}


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_bench_models_child_crash_costs_one_path(tmp_path):
    # A child dying on a path (SIGSEGV through the script's test hook) is an error row for that
    # path; a new child runs the model's remaining paths; the run still reports and exits 2.
    json_path = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_models.py"), "--device", "cpu", "--smoke",
         "--models", "bert", "--paths", "eager,cgtree", "--json", str(json_path), "--md", str(tmp_path / "bench.md")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "BENCH_MODELS_CRASH_ON": "bert/eager"},
    )
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-8000:]
    rows = json.loads(json_path.read_text())["models"][0]["paths"]
    assert rows["eager"]["status"] == "error" and "SIGSEGV" in rows["eager"]["note"], rows["eager"]
    assert "Fatal Python error" in rows["eager"]["details"]["crash"]
    assert rows["cgtree"]["status"] == "ok" and rows["cgtree"]["max_rel_err"] <= 1e-3, rows["cgtree"]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_bench_models_crash_and_hang_cost_one_path_each(tmp_path):
    # Two models, one child process for both unless a path kills or hangs it; paths timed side
    # by side in two rounds. gpt2 dies in cgtree's first timed block (SIGSEGV): that path is the
    # error, and the second child measures gpt2's eager again, then hangs opening bert's eager,
    # is killed when it writes no progress for --model-timeout seconds, and a third child
    # measures bert's remaining path.
    json_path = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_models.py"), "--device", "cpu", "--smoke",
         "--models", "gpt2,bert", "--paths", "eager,cgtree", "--rounds", "2", "--model-timeout", "20",
         "--json", str(json_path), "--md", str(tmp_path / "bench.md")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "BENCH_MODELS_CRASH_ON": "gpt2/cgtree@timing,bert/eager:hang"},
    )
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-8000:]
    report = json.loads(json_path.read_text())
    assert [m["name"] for m in report["models"]] == ["gpt2", "bert"], proc.stderr[-8000:]
    gpt2, bert = (m["paths"] for m in report["models"])
    assert list(gpt2) == list(bert) == ["eager", "cgtree"], proc.stderr[-8000:]
    assert gpt2["cgtree"]["status"] == "error" and "SIGSEGV" in gpt2["cgtree"]["note"], gpt2["cgtree"]
    assert "Fatal Python error" in gpt2["cgtree"]["details"]["crash"]
    assert bert["eager"]["status"] == "error", bert["eager"]
    assert "timed out" in bert["eager"]["note"] and "--model-timeout" in bert["eager"]["note"], bert["eager"]
    for row in (gpt2["eager"], bert["cgtree"]):
        assert row["status"] == "ok" and row["max_rel_err"] <= 1e-3 and row["timed_calls"] == 3, row
        assert len(row["round_p50_us"]) == 2, row  # 2 + 1 calls
    assert report["child_starts"] == 3, proc.stderr[-8000:]
    assert report["failed"] == ["gpt2/cgtree", "bert/eager"], proc.stderr[-8000:]


bench_models = _load("bench_models")


def test_a_daemon_graph_that_was_not_compiled_is_reported_beside_its_graphed_row():
    """Graphed and correct, yet ATen code where inductor was meant to run (a compile that failed):
    the counters cannot tell, so the report says it (HF bloom ran so for a session unnoticed)."""
    kernels = [{"graph": "g1", "kernels": "aten", "note": "compile failed: ValueError: Cannot view a tensor"},
               {"graph": "g2", "kernels": "inductor", "note": "compiled in the daemon"},
               {"graph": "g3", "kernels": "aten", "note": "daemon.compile eager"}]
    assert [k["graph"] for k in bench_models.uncompiled_graphs(kernels)] == ["g1"]
    row = bench_models.PathRow(p50_us=300.0, graphed=True, graphed_note="replays +3 over 3 calls, no skips",
                               max_rel_err=0.0, details={"kernels": kernels}).to_json()
    eager = bench_models.PathRow(p50_us=900.0, max_rel_err=0.0).to_json()
    models = [{"name": "bloom", "family": "hf-breadth", "status": "ok", "note": "",
               "paths": {"eager": eager, "cgtreed": row}}]
    assert bench_models.aten_code_in_daemon(models) == ["bloom/g1: compile failed: ValueError: Cannot view a tensor"]
    report = {"environment": {"torch": "x", "torch_cuda": None, "python": "3", "device": "cuda:0"},
              "config": {"paths": ["eager", "cgtreed"], "iters": 3, "generate_iters": 1, "train_iters": 1,
                         "warmup": 1, "max_rel_err": 1e-3},
              "models": models, "summary": bench_models.summarize(models, ["eager", "cgtreed"])}
    markdown = bench_models.render_markdown(report)
    assert "- bloom / cgtreed: graph g1 runs ATen code, not inductor's (compile failed: ValueError" in markdown
    assert "g2" not in markdown and "g3" not in markdown
