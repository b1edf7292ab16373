"""``benchmarks/profile_paths.py`` on the CPU: one real model in-process under
``backend="cgtree"``, timed and profiled end to end (the GPU comparison with reduce-overhead
comes from a GPU host)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_profile_paths_cpu_smoke_run(tmp_path):
    out, json_path = tmp_path / "profile.txt", tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "profile_paths.py"), "--model", "gpt2", "--device", "cpu",
         "--paths", "cgtree", "--iters", "3", "--warmup", "2", "--profile-calls", "2", "--top", "5",
         "--out", str(out), "--json", str(json_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(json_path.read_text())["gpt2/cgtree"]
    assert result["p50_us"] > 0
    assert result["profiler_counts_per_call"]  # the profiler saw the calls
    text = out.read_text()
    assert "=== gpt2 / cgtree" in text and "--- cProfile" in text and "FAILED" not in text
