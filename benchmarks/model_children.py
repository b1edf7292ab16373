"""The parent side of ``bench_models.py --isolate``: child processes (``bench_models.py --child
CONFIG``, ``python -X faulthandler``) that each run a *list* of models, so that python, torch,
transformers, CUDA and inductor start once per child, not once per model, while a crash or a
hang still costs one path of one model, not the run.

How a child reports: its config names an out file, which the child rewrites atomically (a
temporary file, then ``os.replace``) when it starts a model, when a path starts being prepared
or timed (a forward model's paths are timed side by side, in rounds) and when a model's rows
are written: ``{"models": [the entry of every model it started, in order], "finished": n,
"running": {"model", "path"} or null, "writes": w}``, the first ``n`` entries being final.
Every rewrite is *progress*; ``writes`` counts them (a file's mtime may not change between two
rewrites in the same clock tick).

Invariants:

- Entries come out of ``run_isolated`` once each, final, in the order of the work items,
  their ``paths`` in the order asked for; each is yielded as soon as it is final, while the
  child runs on, so the caller can save the report after every model.
- A child that dies (a signal, an exit status other than 0 and ``EXIT_DAEMON_GONE``) or hangs
  (no progress for ``--model-timeout`` seconds, or still running ``BUDGET_GRACE_S`` after the
  time budget ran out) is killed and costs exactly the path it was running: ``running`` in its
  out file (else the first path of its first unfinished model that the file does not hold;
  the other paths of that model, alive beside it, are run again by the next child). That path
  becomes an error row whose note names the signal, the crashing thread's innermost frame and
  the model library's frame (faulthandler's report in the child's log), or the time-out; a new
  child takes that model's remaining paths and the models after it.
- The daemon is the parent's (``Context.daemon_endpoint``: started on first need, restarted if
  it died) and is handed to each child with its pid; a child that finds it dead before a
  cgtreed path exits ``EXIT_DAEMON_GONE`` (not a crash: no row), the parent restarts the daemon
  and a new child goes on; the same path finding it dead twice is an error row.
- The time budget is one absolute deadline (``time.monotonic()``, one clock for every process
  of the machine) shared by the parent and its children: a child starts no model and no path
  after it; the parent marks what is left "skipped: time budget" (a model never started: the
  whole model; a model started: its remaining paths).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

POLL_S = 0.2  # how often the parent looks at a child's out file and exit status
BUDGET_GRACE_S = 120.0  # a path started before the budget ran out may still finish
EXIT_DAEMON_GONE = 75  # a child's exit status: cgtreed was dead before a cgtreed path
BUDGET_NOTE = "skipped: time budget"


# ---------------------------------------------------------------------------------------------
# What a dead child's log says


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {-returncode} ({signal.Signals(-returncode).name})"
        return f"signal {-returncode}"
    return f"exit status {returncode}"


def crash_report(stderr_text: str) -> str:
    """The faulthandler block of a crashed child ("Fatal Python error: ..." and its frames)."""
    lines = stderr_text.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith("Fatal Python error"):
            block = [line for line in lines[index:index + 200] if not line.startswith("Extension modules")]
            return "\n".join(block)
    return "\n".join(lines[-15:])


def _current_thread_frames(crash: str) -> list[str]:
    """The crashing thread's frames, innermost first (faulthandler lists it as "Current thread")."""
    lines = crash.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), 0)
    return [line.strip() for line in lines[start:] if line.strip().startswith("File ")]


def _innermost_frame(crash: str) -> str:
    frames = _current_thread_frames(crash)
    return frames[0] if frames else ""


def _model_frame(crash: str) -> str:
    """The crashing thread's innermost frame in a model library (transformers, timm, torchvision)."""
    libraries = ("transformers", "timm", "torchvision")
    return next((f for f in _current_thread_frames(crash) if any(f"/{lib}/" in f for lib in libraries)), "")


def death_note(returncode: int, stderr_text: str) -> tuple[str, str]:
    """The error note of the path a child died in, and faulthandler's report."""
    crash = crash_report(stderr_text)
    note = f"child process died ({_signal_name(returncode)}) during this path"
    frame = _innermost_frame(crash)
    if frame:
        note += f"; innermost frame: {frame}"
    caller = _model_frame(crash)
    if caller and caller != frame:
        note += f"; in the model's code: {caller}"
    return note, crash


# ---------------------------------------------------------------------------------------------
# Work and children


@dataclass
class WorkItem:
    """One model: its entry as merged so far, and the paths no child has finished yet."""

    case: Any  # real_models.ModelCase
    entry: dict
    paths: list[str]
    order: list[str] = field(default_factory=list)  # the paths asked for, for the entry's order
    started: bool = False  # a child wrote its entry (or died in it)
    daemon_gone: int = 0  # children that found cgtreed dead before this model's cgtreed path

    def final(self) -> bool:
        return self.entry["status"] != "ok" or not self.paths

    def absorb(self, child_entry: dict) -> None:
        """What a child wrote about this model (idempotent: the out file is read many times)."""
        self.started = True
        done = child_entry.get("paths") or {}
        self.entry["paths"].update(done)
        if child_entry.get("status") not in (None, "ok"):
            self.entry["status"], self.entry["note"] = child_entry["status"], child_entry.get("note", "")
        self.paths = [p for p in self.paths if p not in done]

    def result(self) -> dict:
        self.entry["paths"] = {p: self.entry["paths"][p] for p in self.order if p in self.entry["paths"]}
        return self.entry


class Child:
    """One child process running ``items`` (``bench_models.py --child``), its log forwarded to
    this process's stderr as it grows."""

    def __init__(self, script: Path, base: str, config: dict) -> None:
        from benchmarks.bench_daemon import child_env, python_argv, spawn

        self.out_path, self.err_path = base + ".json", base + ".stderr"
        Path(base + ".config.json").write_text(json.dumps({**config, "out": self.out_path}))
        with open(self.err_path, "wb") as err:
            self.proc = spawn([*python_argv(), "-X", "faulthandler", str(script), "--child", base + ".config.json"],
                              env=child_env(), cwd=os.path.dirname(base), stdout=err, stderr=subprocess.STDOUT)
        self.last_progress = time.monotonic()
        self._writes_seen = 0
        self.doc: dict = {}  # the out file as last read
        self._log_offset = 0

    def read_progress(self) -> Optional[dict]:
        """The out file when the child rewrote it since the last look (progress), else None."""
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(Path(self.out_path).read_text())  # whole: the child replaces it atomically
            if doc.get("writes", 0) != self._writes_seen:
                self._writes_seen = doc.get("writes", 0)
                self.last_progress = time.monotonic()
                self.doc = doc
                return doc
        return None

    def forward_log(self) -> None:
        with contextlib.suppress(OSError), open(self.err_path, "rb") as err:
            err.seek(self._log_offset)
            chunk = err.read()
            self._log_offset += len(chunk)
            if chunk:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()

    def log_text(self) -> str:
        return Path(self.err_path).read_text(errors="replace")

    def stop(self) -> None:
        from benchmarks.bench_daemon import stop_process

        stop_process(self.proc, grace_s=5.0)
        self.forward_log()


def run_isolated(items: list[WorkItem], ctx: Any, *, script: Path, child_args: dict,
                 path_row: Callable[..., dict]) -> Iterator[dict]:
    """Runs ``items`` in as few children as crashes and hangs allow; yields each model's final
    entry in order (module docstring). ``ctx`` is ``bench_models.Context``; ``path_row(status=,
    note=, details=)`` makes a path's row."""
    pending = list(items)
    while True:
        while pending and pending[0].final():
            yield pending.pop(0).result()
        if not pending:
            return
        if ctx.over_budget():
            for item in pending:
                if item.started:
                    for path in item.paths:
                        item.entry["paths"][path] = path_row(status="skipped", note=BUDGET_NOTE)
                    item.paths = []
                else:
                    item.entry["status"], item.entry["note"] = "skipped", BUDGET_NOTE
            continue
        endpoint, daemon_pid = None, None
        if any("cgtreed" in item.paths for item in pending):
            try:
                endpoint = ctx.daemon_endpoint()
                daemon_pid = ctx.daemon.proc.pid
            except Exception as exc:
                note = "cgtreed: " + (ctx.daemon_error or f"{type(exc).__name__}: {exc}")
                for item in pending:
                    if "cgtreed" in item.paths:
                        item.entry["paths"]["cgtreed"] = path_row(status="error", note=note)
                        item.paths.remove("cgtreed")
                continue
        batch = [item for item in pending if not item.final()]
        ctx.child_starts += 1
        config = {"args": child_args, "work": [{"model": item.case.name, "paths": item.paths} for item in batch],
                  "endpoint": endpoint, "daemon_pid": daemon_pid, "deadline": ctx.deadline}
        child = Child(script, os.path.join(ctx.workdir, f"child{ctx.child_starts}"), config)
        finished, timed_out = 0, None
        try:
            while True:
                try:
                    child.proc.wait(timeout=POLL_S)
                    exited = True
                except subprocess.TimeoutExpired:
                    exited = False
                child.forward_log()
                finished = _absorb(batch, child.read_progress(), finished)
                while pending and pending[0].final():
                    yield pending.pop(0).result()
                if exited:
                    break
                now = time.monotonic()
                silent = now - child.last_progress
                if silent > ctx.args.model_timeout:
                    timed_out = f"child process timed out after {silent:.0f} s during this path (--model-timeout)"
                elif ctx.deadline is not None and now > ctx.deadline + BUDGET_GRACE_S:
                    timed_out = (f"child process timed out after {silent:.0f} s during this path "
                                 f"(--time-budget, +{BUDGET_GRACE_S:.0f} s)")
                if timed_out:
                    break
        finally:
            child.stop()
        finished = _absorb(batch, child.read_progress(), finished)
        unfinished = next((item for item in batch[finished:] if not item.final()), None)
        if unfinished is None:
            continue
        returncode = child.proc.returncode
        if timed_out is None and returncode == EXIT_DAEMON_GONE:
            unfinished.daemon_gone += 1
            if unfinished.daemon_gone < 2:
                continue  # the daemon is restarted for the next child
            note, crash = "cgtreed exited before this path, again after a restart", ""
        elif timed_out is None and returncode == 0 and ctx.over_budget():
            continue  # the child stopped at the deadline; what is left is skipped above
        elif timed_out is not None:
            note, crash = timed_out, ""
        else:
            note, crash = death_note(returncode, child.log_text())
        running = child.doc.get("running") or {}
        failed = unfinished.paths[0]
        if running.get("model") == unfinished.case.name and running.get("path") in unfinished.paths:
            failed = running["path"]
        unfinished.paths.remove(failed)
        unfinished.started = True
        unfinished.entry["paths"][failed] = path_row(status="error", note=note, details={"crash": crash})
        print(f"[bench_models]   {unfinished.case.name} / {failed}: error {note}", file=sys.stderr, flush=True)


def _absorb(batch: list[WorkItem], doc: Optional[dict], finished: int) -> int:
    """Merges a child's out file into ``batch``; returns how many of its models are final."""
    if doc is None:
        return finished
    for item, child_entry in zip(batch, doc.get("models") or []):
        item.absorb(child_entry)
    finished = int(doc.get("finished") or 0)
    for item in batch[:finished]:
        item.paths = []  # the child finished it (paths over the budget are skipped rows)
    return finished
