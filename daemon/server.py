"""cgtreed's server: the ``Daemon`` that binds the endpoint, serves requests one at a time
and keeps sessions, devices and configuration in order.

Workflow (``run``):
1. ``start()``: start every device (refusing expandable segments on CUDA), bind a ROUTER
   socket on the endpoint (refusing one a live daemon serves) and, beside an ``ipc://`` socket
   file, the submit-lane listener (``<socket>.lane``, same mode; ``cgtree.daemon.lane``),
   install signal handlers, start the metrics endpoint, then tell systemd ``READY=1`` with a
   ``STATUS=`` line.
2. The main loop: ``wait_for_events`` (the socket, the lanes, the signal wake-up pipe, at most
   until the next housekeeping or watchdog ping; polling without sleeping for
   ``daemon.spin_us`` after an answer), ``handle_signals``, ``serve_pending`` (dispatch each
   request, from ZeroMQ or a lane, to its command), ``housekeeping`` when due, ``WATCHDOG=1``
   when due.
3. ``stop()``: ``STOPPING=1``; stop intake (queued requests, lane ones included, get
   ``unavailable``), close every session (trees, pools, IPC handles), close the socket and the
   lanes and remove their files; exit 0 within
   ``shutdown_timeout_s``, non-zero when the deadline passed.

Signals (gunicorn/uvicorn style):
- SIGTERM/SIGINT: graceful stop. The request being served is finished and answered; requests
  still queued get the retryable ``unavailable``; then ``stop()``.
- A second SIGTERM/SIGINT forces exit at once (status 1, socket file removed). This is the one
  handler that acts instead of queueing: the loop it would queue for is what is slow.
- SIGHUP: ``reload()`` (the ``reload`` command does the same without signal permission).

Invariants:
- Signal handlers only record the signal and poke the wake-up pipe (except the forced exit
  above); everything else happens in the loop, between requests.
- One bad request never takes the loop down: protocol errors get their error reply, any
  other exception in a handler becomes ``internal`` with the request id logged. Unanswerable
  messages (no routing id, nothing after it) are dropped and counted.
- Every log line written while a request is handled, its refusal included, carries the
  request id (``logsetup.request_context``).
- A sticky CUDA error is the exception: the request gets ``cuda_error``, queued requests get
  ``unavailable`` (they never ran: safe to retry), then the daemon exits non-zero
  (``EXIT_CUDA_ERROR``) so its supervisor restarts it with a fresh context. It never goes on
  answering errors from a poisoned context.
- Sends never block the loop: a client that vanished or stopped reading loses its reply.
- ``WATCHDOG=1`` comes from the loop (and from commands between long steps through
  ``CommandContext.keepalive``), never from a timer thread.

``Daemon`` keeps the lifecycle (start, the loop, stop, reload, the fatal CUDA exit, ``info``);
the rest lives in modules named after it, each given the ``Daemon`` whose state it uses:
- ``cgtree.daemon.waiting``: how the loop waits (``Waiter``: spin or sleep, the wake-up pipe);
- ``cgtree.daemon.transports``: how requests come and go (``zmq``, ``lanes``, ``doorbells``);
- ``cgtree.daemon.dispatch``: request -> command -> reply, errors, tenancy checks (``Dispatcher``);
- ``cgtree.daemon.signals``: the signal handlers (``SignalHandlers``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import zmq

import cgtree
from cgtree.config import Config, ConfigError, load_config
from cgtree.daemon import loader_warmup, notify, startup
from cgtree.daemon.compile_service import CompileService
from cgtree.daemon.compiling import prepare_to_load, resolve_compile_mode
from cgtree.daemon.dispatch import Dispatcher, looks_like_cuda_error
from cgtree.daemon.graphs import DeviceRuntime, resolve_devices
from cgtree.daemon.lane import LaneHub
from cgtree.daemon.logsetup import configure_logging
from cgtree.daemon.metrics import MetricsUnavailableError, NullMetrics, make_metrics
from cgtree.daemon.protocol import PROTOCOL_VERSION, encode_error
from cgtree.daemon.reloading import plan_reload
from cgtree.daemon.sessions import SessionRegistry
from cgtree.daemon.signals import SignalHandlers
from cgtree.daemon.startup import StartError
from cgtree.daemon.supervision import (
    EXIT_CUDA_ERROR,
    EXIT_FORCED,
    EXIT_OK,
    EXIT_START_FAILED,
    StatusReporter,
    Watchdog,
    status_text,
)
from cgtree.daemon.transports.doorbells import DoorbellTransport
from cgtree.daemon.transports.lanes import LaneTransport
from cgtree.daemon.transports.zmq import ZmqTransport
from cgtree.daemon.waiting import Waiter

log = logging.getLogger("cgtree.daemon.server")

STOP_DRAIN_S = 0.2  # how long stop() keeps answering queued requests with "unavailable"


@dataclasses.dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: ``applied`` false means the running configuration was kept
    (``error`` says why); ``changed`` lists dotted keys, ``needs_restart`` those a restart applies."""

    applied: bool
    config_path: Optional[str]
    changed: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    error: Optional[str] = None


def cuda_context_is_broken(device_names: list[str]) -> bool:
    """Probe: a sticky error makes every later CUDA call fail, a synchronize included."""
    import torch

    for name in device_names:
        if not name.startswith("cuda"):
            continue
        try:
            torch.cuda.synchronize(torch.device(name))
        except Exception:
            return True
    return False


class Daemon:
    """cgtreed. ``Daemon(config, ...).run()`` returns the process exit code.

    config: the configuration in force at start (command-line overrides applied).
    endpoint: the resolved ZeroMQ endpoint to bind.
    device_names: devices to serve; default from ``config.daemon.devices``.
    config_path: the file SIGHUP / ``reload`` re-read; None: reload is refused.
    reload_config: how to load it again, with the same command-line overrides applied
        (``main`` passes one); default ``load_config(config_path)``.
    clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, config: Config, *, endpoint: str, device_names: Optional[list[str]] = None,
                 config_path: Optional[str] = None, reload_config: Optional[Callable[[], Config]] = None,
                 clock: Callable[[], float] = time.monotonic, session_linger_s: Optional[float] = None) -> None:
        self.config = config
        self.endpoint = endpoint
        self.config_path = config_path
        self._load_config = reload_config or (lambda: load_config(self.config_path))
        self.clock = clock
        self.started_at = clock()
        self.device_names = device_names if device_names is not None else resolve_devices(config.daemon.devices)
        self.devices: dict[str, DeviceRuntime] = {}
        # What the loop waits on, how requests come and go, and what answers them (module docs).
        self.waiting = Waiter(self)
        self.zmq_transport = ZmqTransport(self, endpoint)
        self.lane_transport = LaneTransport(self)
        self.doorbells = DoorbellTransport(self)
        self.transports = (self.zmq_transport, self.lane_transport, self.doorbells)  # served in this order
        self.dispatcher = Dispatcher(self)
        self.signals = SignalHandlers(self)
        self.sessions = SessionRegistry(
            release_graph=self._release_graph, clock=clock,
            linger_s=session_linger_s if session_linger_s is not None else config.daemon.session_linger_s,
            client_gone=self.lane_transport.close_session_lanes,
        )
        self.lanes: Optional[LaneHub] = None  # submit lanes (cgtree.daemon.lane); None when off
        self._serves_cuda = False
        self.metrics: Any = NullMetrics()
        self.counters = {"requests": 0, "errors": 0, "dropped": 0, "internal_errors": 0, "reloads": 0, "reloads_rejected": 0}
        self.state = "starting"  # starting -> serving -> stopping
        self.exit_code: Optional[int] = None  # set when the loop must end (sticky CUDA error)
        self.watchdog = Watchdog(notify.watchdog_interval_s(), clock=clock)
        # Compiles run in a worker process (cgtree.daemon.compile_worker): never on this loop.
        self.compiler = CompileService(timeout_s=config.daemon.compile_timeout_s)
        self._canaries_wanted: list = []  # devices with no loader warm-up canary yet (compiled after READY)
        self.status_reporter = StatusReporter()
        self._buffer_ids = itertools.count(1)
        self._pending_signals: list[int] = []
        self._stop_requested = False
        self._next_housekeeping = 0.0
        # Peer uids come with ipc:// messages only (libzmq's SO_PEERCRED, cgtree.daemon.tenancy);
        # a tcp:// peer's address could even parse as credentials, so it is never read.
        self._peer_credentials = endpoint.startswith("ipc://")
        self._uid = os.getuid()

    # ------------------------------------------------------------------------------- lifecycle

    def run(self) -> int:
        try:
            self.start()
        except StartError as exc:
            log.error("cannot start: %s", exc)
            notify.status(f"cannot start: {exc}"[:200])  # what `systemctl status` shows next to the failure
            self._close_socket()
            return EXIT_START_FAILED
        durations = startup.phases()
        log.info("serving %s (pid %d, protocol %d; READY %s)", self.endpoint, os.getpid(), PROTOCOL_VERSION,
                 startup.summary(durations), extra={"startup_s": durations})
        if not self._peer_credentials:
            log.warning("%s is not an ipc:// endpoint: the daemon cannot tell its clients' users apart, so every "
                        "client may see and adopt every other's sessions (docs/DEPLOY.md, tenants)", self.endpoint)
        while self.exit_code is None and not self._stop_requested:
            ready = self.waiting.wait_for_events()
            self.handle_signals()
            if self._stop_requested or self.exit_code is not None:
                break
            self.serve_pending(ready)
            if self.clock() >= self._next_housekeeping:
                self.housekeeping()
            self.watchdog.ping_if_due()
        if self.exit_code is not None:  # fatal (sticky CUDA error): no orderly teardown possible
            self._refuse_queued(self.clock() + STOP_DRAIN_S)
            self.compiler.close()
            self._close_socket()
            return self.exit_code
        return self.stop()

    def start(self) -> None:
        """Devices, endpoint, signals, metrics; then READY=1 (systemd's start job ends here)."""
        startup.mark("config")
        self._start_devices()
        startup.mark("devices")
        self._warm_loaders()
        startup.mark("warmup")
        self._bind()
        startup.mark("bind")
        self.signals.install()
        self.metrics = self._start_metrics()
        self.state = "serving"
        text = self._status_text()
        startup.mark("ready")
        notify.ready(text)
        self.status_reporter.sent(text)
        self.watchdog.keepalive()
        for device in self._canaries_wanted:
            loader_warmup.compile_canary(self.compiler, device)

    def _start_devices(self) -> None:
        if self.device_names is None or not self.device_names:
            raise StartError("no devices to serve")
        _refuse_expandable_segments(self.device_names)
        for name in self.device_names:
            try:
                runtime = DeviceRuntime(
                    name,
                    allowed_namespaces=lambda: self.config.daemon.allowed_op_namespaces,
                    compile_mode=lambda: self.config.daemon.compile,
                    compiler=self.compiler,
                )
            except Exception as exc:
                raise StartError(f"device {name}: {exc}") from exc
            self.devices[name] = runtime
            self._serves_cuda = self._serves_cuda or runtime.is_cuda
            # Say plainly what runs: a CPU replay backend is never presented as CUDA.
            log.info("device %s: backend %s%s", name, runtime.backend,
                     "" if runtime.backend == "cuda" else " (no CUDA graphs: functions are re-run into recorded buffers)")
        if self.config.daemon.cache_dir:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", self.config.daemon.cache_dir)

    def _warm_loaders(self) -> None:
        """Where a device compiles: import inductor and warm the compiled-graph loader with the
        canary (``loader_warmup``: the first load in a process costs seconds), so that compiled
        graphs load at once after READY; devices without a canary yet get one after READY."""
        compiling = [rt.device for rt in self.devices.values()
                     if resolve_compile_mode(self.config.daemon.compile, rt.device) == "inductor"]
        if not compiling:
            return
        try:
            log.info("inductor imported for loading compiled graphs in %.2f s", prepare_to_load())
        except Exception as exc:  # noqa: BLE001 - graphs then keep their ATen code; serving goes on
            log.warning("inductor does not import (%s: %s): graphs will run their ATen code", type(exc).__name__, exc)
            return
        self._canaries_wanted = [device for device in compiling if loader_warmup.warm_or_log(device) is None]

    def _start_metrics(self) -> Any:
        port = self.config.daemon.metrics_port
        try:
            metrics = make_metrics(port)
        except (MetricsUnavailableError, OSError, ValueError) as exc:
            raise StartError(f"metrics on 127.0.0.1:{port}: {exc}") from exc
        if port:
            log.info("metrics served on http://127.0.0.1:%d/metrics", metrics.port)
        return metrics

    def _bind(self) -> None:
        """The ZeroMQ endpoint (``transports.zmq``), the loop's wake-up pipe and pollers
        (``waiting``), then the submit-lane listener (``transports.lanes``)."""
        sock = self.zmq_transport.bind()
        self.waiting.open(sock)
        self.lane_transport.open()

    def _settle_devices(self) -> None:
        """Wait for every CUDA device's work (before a doorbell page may go, before sleeping
        with doorbell runs in flight). A sticky CUDA error found here ends the daemon."""
        for runtime in self.devices.values():
            if not runtime.is_cuda:
                continue
            try:
                runtime.synchronize()
            except Exception as exc:  # noqa: BLE001 - only CUDA can fail here
                if looks_like_cuda_error(exc):
                    self.on_cuda_error("(doorbell run)", exc)
                    return
                raise

    def request_stop(self) -> None:
        """Ask for a graceful stop from another thread (tests, embedding)."""
        self._pending_signals.append(signal.SIGTERM)
        if self.waiting.wake_w is not None:
            try:
                self.waiting.wake_w.send(b"s")
            except OSError:
                pass

    # -------------------------------------------------------------------------------- the loop

    def handle_signals(self) -> None:
        while self._pending_signals:
            signum = self._pending_signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload(trigger="SIGHUP")
            elif signum in (signal.SIGTERM, signal.SIGINT) and not self._stop_requested:
                log.info("%s: stopping (a second signal forces exit)", signal.Signals(signum).name)
                self._stop_requested = True

    def serve_pending(self, ready: Optional[dict] = None) -> None:
        """Answer what is queued: ZeroMQ requests, then new lanes and lane requests, then rung
        doorbells (``ready`` from ``wait_for_events`` says which lane fds to read; None: every lane)."""
        for transport in self.transports:
            transport.serve(ready)
        if self.waiting.spins():
            # CPU replay backends spin only for doorbells: their own work needs the cores.
            self.waiting.spin_until = time.perf_counter() + self.config.daemon.spin_us * 1e-6

    def handle_message(self, message: list) -> Optional[list]:
        """One multipart message -> the multipart reply (``Dispatcher.handle_message``)."""
        return self.dispatcher.handle_message(message)

    def on_cuda_error(self, request_id: Any, exc: BaseException) -> bytes:
        """Hook for CUDA errors: a sticky one (the context is poisoned) ends the daemon."""
        sticky = cuda_context_is_broken(list(self.devices))
        log.error("request %s: CUDA error (%s): %s", request_id, "sticky: exiting for a restart" if sticky else "not sticky", exc)
        if sticky:
            self.exit_code = EXIT_CUDA_ERROR
            self.state = "stopping"
            notify.stopping(f"sticky CUDA error: exiting (status {EXIT_CUDA_ERROR}) for a restart: {exc}"[:200])
        return encode_error(request_id, "cuda_error", f"{exc}" + (" (sticky: the daemon restarts)" if sticky else ""))

    def _next_buffer_id(self) -> int:
        return next(self._buffer_ids)

    def _reload_command(self) -> ReloadOutcome:
        return self.reload(trigger="reload command")

    # --------------------------------------------------------------------------- housekeeping

    def housekeeping(self) -> None:
        """Reap dead sessions, expire parked ones, let IPC memory go, update gauges and STATUS."""
        now = self.clock()
        self._next_housekeeping = now + self.config.daemon.reap_interval_s
        for session, reason in self.sessions.reap(self.config.daemon.session_timeout_s):
            log.info("reclaimed session %s: %s", session.label, reason)
        if any(rt.is_cuda for rt in self.devices.values()):
            import torch

            torch.cuda.ipc_collect()  # free output buffers whose clients closed their mappings
        self.compiler.poll()  # finished compiles land even when nobody asks (a registering client died)
        self.metrics.set_sessions(len(self.sessions))
        if self.metrics.port:  # metrics served: per-device pool gauges
            self._update_pool_gauges()
        self.status_reporter.update(self._status_text())

    def _status_text(self) -> str:
        parked = sum(1 for s in self.sessions.sessions.values() if s.state == "parked")
        return status_text(endpoint=self.endpoint, devices=list(self.devices), live_sessions=len(self.sessions) - parked,
                           parked_sessions=parked, graphs=sum(len(rt.graphs.graphs) for rt in self.devices.values()))

    def _update_pool_gauges(self) -> None:
        from cgtree.daemon.commands.status import manager_summary

        for name in self.devices:
            pool_bytes = live_blocks = 0
            for session in self.sessions.sessions.values():
                state = session.devices.get(name)
                if state is not None and state.manager is not None:
                    summary = manager_summary(state.manager)
                    pool_bytes += summary["pool_bytes"]
                    live_blocks += summary["live_blocks"]
            self.metrics.set_pool_bytes(name, pool_bytes)
            self.metrics.set_live_blocks(name, live_blocks)

    # ---------------------------------------------------------------------------------- reload

    def reload(self, trigger: str = "SIGHUP") -> ReloadOutcome:
        """Re-read the config file (SIGHUP or the ``reload`` command). New policies apply to new
        recordings; the log level and format change at once; an invalid file is rejected, logged
        and the running configuration kept. systemd sees RELOADING=1, then READY=1."""
        if not self.config_path:
            log.warning("%s: no --config file to reload; keeping the running configuration", trigger)
            return self._reload_rejected("cgtreed was started without --config: there is no file to reload")
        notify.reloading()
        try:
            loaded = self._load_config()
        except (ConfigError, OSError) as exc:
            log.error("%s: %s; keeping the running configuration", trigger, exc)
            return self._reload_rejected(str(exc))
        plan = plan_reload(self.config, loaded)
        for key in plan.needs_restart:
            log.warning("%s: %s changed; it takes effect at the next restart", trigger, key)
        self.config = plan.config
        self.sessions.linger_s = self.config.daemon.session_linger_s
        self.compiler.timeout_s = self.config.daemon.compile_timeout_s
        if plan.policy_changed:
            for session in self.sessions.sessions.values():
                for state in session.devices.values():
                    if state.manager is not None:
                        state.manager.set_policy(self.config.policy)
        if plan.logging_changed:
            configure_logging(self.config.daemon.log_level, self.config.daemon.log_format)
        if plan.applies("daemon.max_message_bytes") and self.zmq_transport.socket is not None:
            self.zmq_transport.socket.setsockopt(zmq.MAXMSGSIZE, self.config.daemon.max_message_bytes)  # new connections
        self.counters["reloads"] += 1
        applied = [key for key in plan.changed if key not in plan.needs_restart]
        log.info("%s: configuration reloaded from %s (%s)", trigger, self.config_path,
                 f"changed: {', '.join(applied)}" if applied else "nothing changed")
        self._ready_again(self._status_text())
        return ReloadOutcome(True, self.config_path, plan.changed, plan.needs_restart)

    def _reload_rejected(self, error: str) -> ReloadOutcome:
        self.counters["reloads_rejected"] += 1
        self._ready_again(f"reload rejected, running configuration kept: {error}"[:200])
        return ReloadOutcome(False, self.config_path, error=error)

    def _ready_again(self, text: str) -> None:
        notify.ready(text)
        self.status_reporter.sent(text)

    # ------------------------------------------------------------------------------------ stop

    def stop(self) -> int:
        """Graceful stop: refuse queued requests, free every session, close the endpoint."""
        self.state = "stopping"
        notify.stopping(f"stopping: closing {len(self.sessions)} sessions")
        seconds = self.config.daemon.shutdown_timeout_s
        deadline = self.clock() + seconds
        timer = self._arm_hard_deadline(seconds)
        refused = self._refuse_queued(min(deadline, self.clock() + STOP_DRAIN_S))
        finished = self.sessions.close_all("the daemon is stopping", deadline=deadline, should_stop=self._between_sessions)
        self.compiler.close()
        self._close_socket()
        self.metrics.stop()
        self.signals.restore()
        timer.cancel()
        if not finished:
            log.warning("stopped before every session was freed: shutdown_timeout_s = %.1f s passed", seconds)
            return EXIT_FORCED
        log.info("stopped cleanly (%d queued requests refused)", refused)
        return EXIT_OK

    def _between_sessions(self) -> bool:
        """Between two session closes: keep systemd's watchdog fed; never ask to stop early
        (a second signal exits from its handler)."""
        self.watchdog.keepalive()
        return False

    def _refuse_queued(self, until: float) -> int:
        refused = self.lane_transport.refuse_pending(until)
        refused += self.zmq_transport.refuse_pending(until)
        return refused

    def _arm_hard_deadline(self, seconds: float) -> threading.Timer:
        # The last resort when teardown hangs inside a C call (signals cannot run Python then).
        def expire() -> None:
            log.error("shutdown did not finish within %.1f s: exiting now", seconds)
            self.zmq_transport.unlink_socket_file()
            os._exit(EXIT_FORCED)

        timer = threading.Timer(seconds + 1.0, expire)
        timer.daemon = True
        timer.start()
        return timer

    def _close_socket(self) -> None:
        self.lane_transport.close()
        self.zmq_transport.close()  # the socket file and the lane listener's are removed here
        self.waiting.close()

    # ------------------------------------------------------------------------------- plumbing

    def _release_graph(self, device: str, entry: Any) -> None:
        runtime = self.devices.get(device)
        if runtime is not None:
            runtime.graphs.release(entry)

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "version": getattr(cgtree, "__version__", "?"),
            "protocol": PROTOCOL_VERSION,
            "endpoint": self.endpoint,
            "state": self.state,
            "uptime_s": round(self.clock() - self.started_at, 3),
            "config_path": self.config_path,
            "policy": dataclasses.asdict(self.config.policy),
            "log_level": self.config.daemon.log_level,
            "sessions": len(self.sessions),
            "session_linger_s": self.sessions.linger_s,
            "watchdog_s": self.watchdog.interval_s,
            "metrics_port": self.metrics.port,
            "lane_path": self.lanes.path if self.lanes is not None else None,
            "spin_us": self.config.daemon.spin_us,
            "doorbell": dict(zip(("enabled", "why"), self.doorbells.doorbell_decision())),
            "compile": {"mode": self.config.daemon.compile, "worker_pid": self.compiler.worker_pid(),
                        "jobs": self.compiler.describe(), **self.compiler.counters},
            "counters": dict(self.counters),
        }


# Kept for callers that build a Daemon without starting it (unit tests).
_NoMetrics = NullMetrics


def expandable_segments_enabled(environ: Any) -> bool:
    """Whether the allocator configuration in ``environ`` turns expandable segments on.
    Both spellings count (``PYTORCH_CUDA_ALLOC_CONF`` and torch >= 2.9's ``PYTORCH_ALLOC_CONF``);
    the value is compared case-insensitively, as torch does."""
    for variable in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        for part in environ.get(variable, "").split(","):
            key, _, value = part.partition(":")
            if key.strip() == "expandable_segments" and value.strip().lower() == "true":
                return True
    return False


def _refuse_expandable_segments(device_names: list[str], environ: Any = os.environ) -> None:
    """CUDA IPC cannot share expandable-segment memory (cuMem handles need fds): refuse."""
    if not any(name.startswith("cuda") for name in device_names):
        return
    if expandable_segments_enabled(environ):
        raise StartError(
            "PYTORCH_CUDA_ALLOC_CONF enables expandable_segments: memory of expandable segments cannot be "
            "shared with clients through CUDA IPC handles (they are cuMem handles that need file "
            "descriptors). Unset it, or set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False, for cgtreed."
        )
