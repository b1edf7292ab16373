"""The compile worker queue (``cgtree.daemon.compile_service``) with stand-in workers: jobs run
one at a time, in order, without blocking the caller; a worker that dies or overruns fails its
job (never answered twice) and the next job gets a fresh worker; an idle worker is let go."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from cgtree.daemon.compile_service import CompileService
from cgtree.daemon.compile_worker import pack_message, unpack_message

# A stand-in worker speaking the worker's wire: "sleep:<s>" payloads sleep, "die" exits, else ok.
FAKE_WORKER = textwrap.dedent("""
    import os, sys, time
    from cgtree.daemon.compile_worker import pack_message, read_message
    jobs, results = os.fdopen(0, "rb", buffering=0), os.fdopen(1, "wb", buffering=0)
    while True:
        message = read_message(jobs)
        if message is None:
            sys.exit(0)
        header, blob = message
        if blob == b"die":
            os._exit(3)
        if blob.startswith(b"sleep:"):
            time.sleep(float(blob[6:]))
        results.write(pack_message({"job": header["job"], "ok": blob != b"fail", "seconds": 0.01,
                                    "error": "boom" if blob == b"fail" else None}))
""")


def _service(**kwargs) -> CompileService:
    return CompileService(command=[sys.executable, "-c", FAKE_WORKER], **kwargs)


def _submit(service: CompileService, payload: bytes, done: list, name: str = "g"):
    return service.submit(graph_id=name * 8, device="cpu", name=name, path=Path("/nonexistent"), payload=payload,
                          namespaces=(), on_done=done.append)


def _wait(service: CompileService, done: list, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(done) < count and time.monotonic() < deadline:
        service.poll()
        time.sleep(0.01)
    assert len(done) >= count, f"only {len(done)} of {count} jobs finished: {service.describe()}"


def test_the_wire_round_trips_and_waits_for_whole_messages():
    message = pack_message({"job": 7, "ok": True}, b"payload")
    assert unpack_message(bytearray(message[:-1])) is None
    header, blob, used = unpack_message(bytearray(message + b"next"))
    assert header == {"job": 7, "ok": True} and blob == b"payload" and used == len(message)


def test_jobs_run_in_order_one_at_a_time_without_blocking_the_caller():
    service = _service()
    done: list = []
    try:
        started = time.monotonic()
        first = _submit(service, b"sleep:0.5", done, "a")
        second = _submit(service, b"ok", done, "b")
        assert time.monotonic() - started < 0.4  # submit returns at once; the worker compiles
        assert [j["state"] for j in service.describe()] == ["compiling", "queued"]
        assert service.progress(second)["ahead"] == 1
        _wait(service, done, 2)
        assert [r.job for r in done] == [first, second] and all(r.ok for r in done)
        assert service.describe() == [] and service.counters["workers_started"] == 1
    finally:
        service.close()


def test_a_failed_compile_is_reported_with_its_reason():
    service = _service()
    done: list = []
    try:
        _submit(service, b"fail", done)
        _wait(service, done, 1)
        assert not done[0].ok and done[0].error == "boom"
    finally:
        service.close()


def test_a_worker_that_dies_fails_its_job_once_and_the_next_job_gets_a_new_worker():
    service = _service()
    done: list = []
    try:
        _submit(service, b"die", done, "a")
        _submit(service, b"ok", done, "b")
        _wait(service, done, 2)
        assert not done[0].ok and "exited (status 3)" in done[0].error
        assert done[1].ok
        assert service.counters["workers_started"] == 2
        time.sleep(0.2)
        service.poll()
        assert len(done) == 2  # never answered twice
    finally:
        service.close()


def test_a_compile_over_the_timeout_is_stopped():
    service = _service(timeout_s=0.3)
    done: list = []
    try:
        _submit(service, b"sleep:30", done)
        _wait(service, done, 1, timeout_s=20)
        assert not done[0].ok and "longer than 0.3 s" in done[0].error
    finally:
        service.close()


def test_an_idle_worker_is_let_go_and_closing_fails_what_is_left():
    service = _service(idle_exit_s=0.2)
    done: list = []
    _submit(service, b"ok", done)
    _wait(service, done, 1)
    assert service.worker_pid() is not None
    time.sleep(0.3)
    service.poll()
    assert service.worker_pid() is None
    _submit(service, b"sleep:30", done)
    service.close()
    assert len(done) == 2 and not done[1].ok and "stopped" in done[1].error


@pytest.mark.parametrize("bad", [b"\xff" * 8, pack_message({"job": 1}, b"")[:3]])
def test_the_real_worker_answers_or_exits_on_garbage(bad):
    """The worker reads only its daemon's pipe, but a torn message must not hang it."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "cgtree.daemon.compile_worker"], input=bad, capture_output=True, timeout=120)
    assert done.returncode != 0 or done.stdout == b""


def test_the_real_worker_keeps_a_graph_with_a_host_sync_on_aten(tmp_path):
    """The worker judges the graph itself (the loop never traces it): ``.item()`` keeps ATen."""
    import torch

    from cgtree.client import lowering

    class ReadsAValue(torch.nn.Module):
        def forward(self, x):
            return x + x.sum().item()

    encoded = lowering.encode(lowering.lower(ReadsAValue(), [torch.randn(4)]))
    service = CompileService()
    done: list = []
    try:
        service.submit(graph_id=encoded.graph_id, device="cpu", name="ReadsAValue", path=tmp_path / "never.bin",
                       payload=encoded.graph_bytes, namespaces=(), on_done=done.append)
        _wait(service, done, 1, timeout_s=180)
    finally:
        service.close()
    assert not done[0].ok and done[0].error is None
    assert done[0].eager_reason == "it holds an op a CUDA graph cannot hold"
    assert not (tmp_path / "never.bin").exists() and service.counters["not_compiled"] == 1


SLOW_READER = textwrap.dedent("""
    import os, sys, time
    time.sleep(2.0)  # a worker still importing torch reads nothing yet
    from cgtree.daemon.compile_worker import pack_message, read_message
    jobs, results = os.fdopen(0, "rb", buffering=0), os.fdopen(1, "wb", buffering=0)
    while (message := read_message(jobs)) is not None:
        header, blob = message
        results.write(pack_message({"job": header["job"], "ok": len(blob) == 4 << 20, "seconds": 0.0, "error": None}))
""")


def test_a_large_graph_for_a_worker_still_starting_never_blocks_the_caller():
    """A payload far larger than a pipe holds, to a worker that reads nothing for 2 s: submit
    and every poll return at once; the message goes through over later polls, whole."""
    service = CompileService(command=[sys.executable, "-c", SLOW_READER])
    done: list = []
    try:
        started = time.monotonic()
        _submit(service, b"x" * (4 << 20), done)
        for _ in range(5):
            service.poll()
        assert time.monotonic() - started < 1.0
        _wait(service, done, 1)
        assert done[0].ok  # the worker got all 4 MiB
    finally:
        service.close()
