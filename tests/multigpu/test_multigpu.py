"""Several GPUs of one host: a tree manager per device, routing by the inputs' device, and the
cross-device skip (seed test_multiple_devices_msg). Needs two CUDA devices: ``pytest -m multigpu``
on a 2-GPU host. The same decisions run in CI through tests/multigpu/test_routing_cpu.py."""

from __future__ import annotations

import logging

import pytest
import torch

pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


def test_one_manager_and_pool_per_device():
    from cgtree.manager import TreeManager

    managers = [TreeManager(f"cuda:{i}") for i in range(2)]
    try:
        fns = [m.cudagraphify(lambda x: x * 2, name=f"double{i}") for i, m in enumerate(managers)]
        for i, fn in enumerate(fns):
            for _ in range(3):
                x = torch.ones(4, device=f"cuda:{i}")
                out = fn(x)
                assert out.device == torch.device("cuda", i)
                torch.testing.assert_close(out, x * 2)
        assert [m.counters["replays"] for m in managers] == [1, 1]
        assert managers[0].backend.pool != managers[1].backend.pool or managers[0].device != managers[1].device
    finally:
        for m in managers:
            m.close()


def test_multiple_devices_msg(caplog):
    from cgtree.manager import TreeManager

    mgr = TreeManager("cuda:0")
    try:
        foo = mgr.cudagraphify(lambda x, y: (x + 1, y + 2), name="foo")
        with caplog.at_level(logging.WARNING, logger="cgtree.skips"):
            foo(torch.ones([10], device="cuda:0"), torch.ones([20]))
            foo(torch.ones([10], device="cuda:0"), torch.ones([10], device="cuda:1"))
        messages = [r.getMessage() for r in caplog.records if r.name == "cgtree.skips"]
        assert "skipping cudagraphs due to cpu device (arg1)" in messages[0]
        assert "skipping cudagraphs due to multiple devices" in messages[1]
        assert mgr.counters["skips"] == 2
    finally:
        mgr.close()


def test_the_daemon_routes_by_device_and_skips_cross_device_inputs(daemon_factory):
    from cgtree.client import Client

    daemon = daemon_factory(devices="cuda:0,cuda:1", extra_env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()).eval().to("cuda:1")
    with Client(daemon.endpoint, timeout_s=60) as client:
        for _ in range(3):
            x = torch.randn(4, 16, device="cuda:1")
            (out,) = client.submit(model, [x])
            torch.testing.assert_close(out, model(x))
        assert client.last_execution["mode"] == "replayed"
        devices = {d["device"]: d for d in client.status()["devices"]}
        assert set(devices) == {"cuda:0", "cuda:1"}
        assert devices["cuda:1"]["graphs"] >= 1 and devices["cuda:0"]["graphs"] == 0

        a, b = torch.ones(8, device="cuda:0"), torch.ones(8, device="cuda:1")
        outs = client.submit(torch.fx.symbolic_trace(_TwoInputs()), [a, b])
        assert client.last_execution["mode"] == "skipped"
        assert "multiple devices" in client.last_execution["skip_reason"]
        torch.testing.assert_close(outs[0].cpu(), torch.full([8], 2.0))


class _TwoInputs(torch.nn.Module):
    def forward(self, a, b):
        return a + 1, b + 2
