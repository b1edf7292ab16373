"""The loader warm-up canary (``cgtree.daemon.loader_warmup``): an ordinary graph payload the
worker accepts, found per device in the artifact directory, a broken one removed rather than
trusted, and compiled through the compile service when missing. The end-to-end path (compiled
after a first READY, loaded before the next) runs in test_daemon_compile_worker.py."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from cgtree.daemon import loader_warmup
from cgtree.payload import decode_graph


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return tmp_path / "inductor"


def test_the_canary_is_the_same_payload_everywhere_and_passes_the_default_allow_list():
    first = loader_warmup.canary_graph_bytes()
    loader_warmup.canary_graph_bytes.cache_clear()
    assert loader_warmup.canary_graph_bytes() == first  # every process names the same artifact
    decoded = decode_graph(first, device=torch.device("cpu"))  # aten only: what the worker is given
    weight = torch.eye(16)
    x = torch.arange(128, dtype=torch.float32).reshape(8, 16) - 64
    hidden, total = decoded.module(weight, x)
    torch.testing.assert_close(hidden, torch.relu(x) + 1)
    torch.testing.assert_close(total, torch.relu(x).sum(-1))
    assert loader_warmup.canary_id().startswith("canary-")


def test_without_a_canary_there_is_nothing_to_warm(private_cache):
    assert loader_warmup.warm(torch.device("cpu")) is None
    assert loader_warmup.warm_or_log(torch.device("cpu")) is None


def test_a_broken_canary_is_logged_and_removed_so_that_the_worker_writes_a_fresh_one(private_cache, caplog):
    path = loader_warmup.canary_path(torch.device("cpu"))
    path.write_bytes(b"not an inductor artifact")
    with caplog.at_level(logging.WARNING, logger="cgtree.daemon.loader_warmup"):
        assert loader_warmup.warm_or_log(torch.device("cpu")) is None
    assert "canary failed" in caplog.text
    assert not path.exists()


def test_a_missing_canary_goes_to_the_compile_service_and_warms_when_it_lands(private_cache, monkeypatch):
    submitted = []
    compiler = SimpleNamespace(submit=lambda **job: submitted.append(job))
    warmed = []
    monkeypatch.setattr(loader_warmup, "warm", lambda device: warmed.append(device) or 0.5)
    device = torch.device("cpu")

    loader_warmup.compile_canary(compiler, device)
    (job,) = submitted
    assert job["graph_id"] == loader_warmup.canary_id() and job["device"] == "cpu"
    assert job["path"] == loader_warmup.canary_path(device) and job["payload"] == loader_warmup.canary_graph_bytes()
    assert job["namespaces"] == ()  # nothing beyond the default allow-list

    job["on_done"](SimpleNamespace(ok=False, error="no compiler", eager_reason=None))
    assert warmed == []  # a failed compile warms nothing
    job["on_done"](SimpleNamespace(ok=True, error=None, eager_reason=None))
    assert warmed == [device]
