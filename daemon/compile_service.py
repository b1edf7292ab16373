"""The daemon's side of compiling off the serving loop: a queue of compile jobs and the one
worker process that runs them (``cgtree.daemon.compile_worker`` says why a process).

``submit`` queues a job and returns at once; ``poll`` (called by the register command and by
housekeeping, never blocking) hands finished jobs to their ``on_done`` callbacks, starts the
next queued job, and enforces ``timeout_s`` (the worker is killed; the job fails). A worker idle
for ``idle_exit_s`` is told to exit, so that its CUDA context does not stay on the GPU.

Invariants:
- At most one job is in the worker at a time; the rest wait here, in order. A job is never
  answered twice: its callback runs once, with success, failure, a timeout or the worker's death.
- Nothing here blocks the loop: both pipes are non-blocking; a job's message goes into the
  worker's pipe as far as it takes it, and the rest at the next polls (a worker still importing
  torch reads nothing for seconds).
- The worker gets the daemon's environment minus ``NOTIFY_SOCKET`` (only the daemon talks to
  systemd) and inherits its stderr (the journal).
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cgtree.daemon.compile_worker import pack_message, unpack_message

log = logging.getLogger("cgtree.daemon.compile_service")

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_IDLE_EXIT_S = 60.0


@dataclass(eq=False)  # a job is itself: found in the queue by identity
class CompileJob:
    job_id: int
    graph_id: str
    device: str
    name: str
    path: Path
    payload: bytes
    namespaces: tuple[str, ...]
    on_done: Callable[["CompileResult"], None]
    queued_at: float
    started_at: Optional[float] = None

    def describe(self, now: float) -> dict:
        return {"graph": self.graph_id, "name": self.name, "device": self.device,
                "state": "compiling" if self.started_at is not None else "queued",
                "elapsed_s": round(now - self.queued_at, 1)}


@dataclass
class CompileResult:
    job: CompileJob
    ok: bool
    seconds: float = 0.0
    error: Optional[str] = None
    eager_reason: Optional[str] = None  # not compiled on purpose: why its ATen code runs


@dataclass
class _Worker:
    process: subprocess.Popen
    buffer: bytearray = field(default_factory=bytearray)
    idle_since: float = 0.0
    outgoing: memoryview = field(default_factory=lambda: memoryview(b""))  # the job not yet in the pipe


class CompileService:
    """Compile jobs, run one at a time by a worker process started on demand."""

    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S, idle_exit_s: float = DEFAULT_IDLE_EXIT_S,
                 clock: Callable[[], float] = time.monotonic, command: Optional[list[str]] = None) -> None:
        self.timeout_s = timeout_s
        self.idle_exit_s = idle_exit_s
        self._clock = clock
        self._command = command or [sys.executable, "-m", "cgtree.daemon.compile_worker"]
        self._ids = itertools.count(1)
        self._queue: list[CompileJob] = []
        self._running: Optional[CompileJob] = None
        self._worker: Optional[_Worker] = None
        self._exiting: list[subprocess.Popen] = []  # stopped workers not reaped yet
        self.counters = {"submitted": 0, "compiled": 0, "not_compiled": 0, "failed": 0, "workers_started": 0}

    # -- the daemon's calls ----------------------------------------------------------------------

    def submit(self, *, graph_id: str, device: str, name: str, path: Path, payload: bytes,
               namespaces: tuple[str, ...], on_done: Callable[[CompileResult], None]) -> CompileJob:
        job = CompileJob(next(self._ids), graph_id, device, name, path, payload, namespaces, on_done, self._clock())
        self._queue.append(job)
        self.counters["submitted"] += 1
        log.info("graph %s queued for the compile worker (%d ahead of it)", name, len(self._queue) - 1 + (self._running is not None))
        self.poll()
        return job

    def poll(self) -> None:
        """Deliver finished jobs, enforce the timeout, start the next job; never blocks."""
        if self._exiting:
            self._reap()
        if self._running is not None and self._worker is not None and self._worker.outgoing:
            self._send_some()
        if self._running is not None:
            self._collect()
        if self._running is None and self._queue:
            self._start(self._queue.pop(0))
        elif self._running is None and self._worker is not None and \
                self._clock() - self._worker.idle_since >= self.idle_exit_s:
            self._stop_worker("idle")

    def describe(self) -> list[dict]:
        """The jobs in the worker and waiting, oldest first (for ``status`` / cgtreectl)."""
        now = self._clock()
        return [job.describe(now) for job in ([self._running] if self._running else []) + self._queue]

    def progress(self, job: CompileJob) -> dict:
        """Where ``job`` stands: queued or compiling, seconds since it was queued, jobs ahead."""
        order = ([self._running] if self._running else []) + self._queue
        ahead = order.index(job) if job in order else 0
        return {"state": "compiling" if job.started_at is not None else "queued",
                "elapsed_s": round(self._clock() - job.queued_at, 1), "ahead": ahead}

    def worker_pid(self) -> Optional[int]:
        return self._worker.process.pid if self._worker is not None else None

    def close(self) -> None:
        """Stop the worker; jobs not finished fail (the daemon is stopping)."""
        pending = ([self._running] if self._running else []) + self._queue
        self._running, self._queue = None, []
        self._stop_worker("daemon stopping", wait=True)
        for job in pending:
            job.on_done(CompileResult(job, ok=False, error="the daemon stopped before the compile finished"))

    # -- mechanism -------------------------------------------------------------------------------

    def _start(self, job: CompileJob) -> None:
        if self._worker is None or self._worker.process.poll() is not None:
            try:
                self._worker = self._spawn()
            except OSError as exc:
                self._finish(job, CompileResult(job, ok=False, error=f"the compile worker could not start: {exc}"))
                return
        header = {"job": job.job_id, "device": job.device, "path": str(job.path), "namespaces": list(job.namespaces)}
        job.started_at = self._clock()
        self._running = job
        self._worker.outgoing = memoryview(pack_message(header, job.payload))
        job.payload = b""  # the message holds it until the worker has read it all
        self._send_some()
        log.info("graph %s compiling in the compile worker (pid %d)", job.name, self._worker.process.pid)

    def _send_some(self) -> None:
        """Write what the pipe takes now of the job in flight (a large graph, or a worker still
        starting up, fills the pipe: the rest goes at the next poll)."""
        worker = self._worker
        try:
            while worker.outgoing:
                written = os.write(worker.process.stdin.fileno(), worker.outgoing)
                worker.outgoing = worker.outgoing[written:]
        except BlockingIOError:
            return
        except OSError as exc:
            self._worker_lost(f"the compile worker did not take the job ({exc})")

    def _spawn(self) -> _Worker:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        for pipe in (process.stdout, process.stdin):  # the loop never waits on the worker's pipes
            flags = fcntl.fcntl(pipe.fileno(), fcntl.F_GETFL)
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.counters["workers_started"] += 1
        log.info("compile worker started (pid %d)", process.pid)
        return _Worker(process)

    def _collect(self) -> None:
        worker, job = self._worker, self._running
        try:
            while True:
                chunk = os.read(worker.process.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                worker.buffer += chunk
        except BlockingIOError:
            pass
        message = unpack_message(worker.buffer)
        if message is not None:
            header, _, used = message
            del worker.buffer[:used]
            if header.get("job") == job.job_id:
                worker.idle_since = self._clock()
                self._finish(job, CompileResult(job, ok=bool(header.get("ok")), seconds=float(header.get("seconds") or 0.0),
                                                error=header.get("error"), eager_reason=header.get("eager_reason")))
                return
        status = worker.process.poll()
        if status is not None:
            self._worker_lost(f"the compile worker exited ({_exit_text(status)}) while compiling")
        elif self._clock() - job.started_at > self.timeout_s:
            self._stop_worker("timeout")
            self._finish(job, CompileResult(job, ok=False, error=f"the compile took longer than {self.timeout_s:g} s "
                                                                 "(daemon.compile_timeout_s): stopped"))

    def _worker_lost(self, why: str) -> None:
        job = self._running
        self._stop_worker("lost")
        if job is not None:
            self._finish(job, CompileResult(job, ok=False, error=why))

    def _finish(self, job: CompileJob, result: CompileResult) -> None:
        self._running = None if self._running is job else self._running
        self.counters["compiled" if result.ok else ("not_compiled" if result.eager_reason else "failed")] += 1
        try:
            job.on_done(result)
        except Exception:  # noqa: BLE001 - one graph's bookkeeping must not stop the others' compiles
            log.exception("finishing the compile of graph %s failed", job.name)

    def _stop_worker(self, why: str, *, wait: bool = False) -> None:
        """EOF to the worker (an idle one exits by itself), SIGKILL unless idle; reaped by a
        later ``poll`` (or here, with ``wait``): the loop never waits for an exit."""
        worker, self._worker = self._worker, None
        if worker is not None:
            process = worker.process
            try:
                process.stdin.close()
            except OSError:
                pass
            if why != "idle" and process.poll() is None:
                process.send_signal(signal.SIGKILL)
            log.info("compile worker (pid %d) stopping: %s", process.pid, why)
            self._exiting.append(process)
        self._reap(wait)

    def _reap(self, wait: bool = False) -> None:
        for process in list(self._exiting):
            if wait:
                try:
                    process.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.poll() is not None:
                process.stdout.close()
                self._exiting.remove(process)


def _exit_text(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"
