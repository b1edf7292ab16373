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
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import select
import signal
import socket
import threading
import time
from functools import partial
from typing import Any, Callable, Optional

import zmq

import cgtree
from cgtree.config import Config, ConfigError, load_config
from cgtree.daemon import commands as command_registry
from cgtree.daemon import loader_warmup, notify, startup
from cgtree.daemon.commands import CommandContext
from cgtree.daemon.compile_service import CompileService
from cgtree.daemon.compiling import prepare_to_load, resolve_compile_mode
from cgtree.daemon.graphs import DeviceRuntime, resolve_devices
from cgtree.daemon.lane import MOVED, LaneConnection, LaneHub, fits_lane, lane_path_for
from cgtree.daemon.doorbell import ON_LANE, REPLAYED, Doorbell, doorbell_policy, is_kick
from cgtree.daemon.plans import PlanReplayed, PlanServices, is_plan_request, pack_plan_reply, parse_plan_request, run_plan
from cgtree.daemon.logsetup import configure_logging, request_context
from cgtree.daemon.metrics import MetricsUnavailableError, NullMetrics, make_metrics
from cgtree.daemon.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    Request,
    decode_request,
    encode_error,
    encode_reply,
    frame_view,
    request_id_of,
    unpack,
)
from cgtree.daemon.reloading import plan_reload
from cgtree.daemon.runtime_dir import has_listener, ipc_path
from cgtree.daemon.sessions import SessionRegistry
from cgtree.daemon.supervision import StatusReporter, Watchdog, status_text
from cgtree.daemon.tenancy import UNVERIFIED, may_use, peer_uid_of_frame
from cgtree.daemon.tenancy import describe as describe_uid

log = logging.getLogger("cgtree.daemon.server")

EXIT_OK = 0
EXIT_FORCED = 1  # second signal or shutdown deadline passed
EXIT_CUDA_ERROR = 70  # EX_SOFTWARE: a sticky CUDA error poisoned the context; restart us
EXIT_START_FAILED = 78  # EX_CONFIG: bad configuration, endpoint in use, unusable device

MAX_REQUESTS_PER_TURN = 64  # then signals and housekeeping get a look in
STOP_DRAIN_S = 0.2  # how long stop() keeps answering queued requests with "unavailable"
MAX_LOOP_WAIT_S = 1.0
DOORBELLS = "doorbells"  # the key wait_for_events reports a rung doorbell under
DONE_RECHECK_S = 20e-6  # how often a spinning loop looks whether a doorbell run finished
# The longest the loop spins for a doorbell run to finish: a longer graph's client pays one
# wake-up (small beside such a graph), and a page whose done word its client overwrote cannot
# keep a core busy for good.
DONE_SPIN_MAX_S = 0.1


class StartError(RuntimeError):
    """The daemon cannot start (endpoint served by another daemon, no usable device, ...)."""


@dataclasses.dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: ``applied`` false means the running configuration was kept
    (``error`` says why); ``changed`` lists dotted keys, ``needs_restart`` those a restart applies."""

    applied: bool
    config_path: Optional[str]
    changed: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    error: Optional[str] = None


def looks_like_cuda_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return "CUDA error" in text or "cudaError" in text or type(exc).__name__ == "AcceleratorError"


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
        self.sessions = SessionRegistry(
            release_graph=self._release_graph, clock=clock,
            linger_s=session_linger_s if session_linger_s is not None else config.daemon.session_linger_s,
            client_gone=self._close_session_lanes,
        )
        self.lanes: Optional[LaneHub] = None  # submit lanes (cgtree.daemon.lane); None when off
        self._spin_until = 0.0  # perf_counter() until which the loop polls without sleeping
        self._awaiting_done = False  # a doorbell run answered at launch may still be on the device
        self._awaiting_done_until = 0.0
        self._serves_cuda = False
        self.metrics: Any = NullMetrics()
        self.counters = {"requests": 0, "errors": 0, "dropped": 0, "internal_errors": 0, "reloads": 0, "reloads_rejected": 0}
        self.state = "starting"  # starting -> serving -> stopping
        self.exit_code: Optional[int] = None  # set when the loop must end (sticky CUDA error)
        self.watchdog = Watchdog(notify.watchdog_interval_s(), clock=clock)
        self._plan_services: Optional[PlanServices] = None  # built on the first plan run
        # Compiles run in a worker process (cgtree.daemon.compile_worker): never on this loop.
        self.compiler = CompileService(timeout_s=config.daemon.compile_timeout_s)
        self._canaries_wanted: list = []  # devices with no loader warm-up canary yet (compiled after READY)
        self.status_reporter = StatusReporter()
        self._buffer_ids = itertools.count(1)
        self._pending_signals: list[int] = []
        self._stop_requested = False
        self._next_housekeeping = 0.0
        self._context: Optional[zmq.Context] = None
        self._socket: Optional[zmq.Socket] = None
        self._poller: Optional[zmq.Poller] = None
        self._spin_poller: Any = None  # select.poll over the raw fds (lanes, wake-up pipe), for spinning
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._previous_handlers: dict[int, Any] = {}
        self._socket_path = ipc_path(endpoint)
        # Peer uids come with ipc:// messages only (libzmq's SO_PEERCRED, cgtree.daemon.tenancy);
        # a tcp:// peer's address could even parse as credentials, so it is never read.
        self._peer_credentials = endpoint.startswith("ipc://")
        self._uid = os.getuid()
        self._bound = False

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
            ready = self.wait_for_events()
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
        self._install_signal_handlers()
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
        self._context = zmq.Context()
        if self._socket_path is not None and os.path.exists(self._socket_path):
            # A file nobody listens on is stale at once; one with a listener gets half a second
            # to answer a ping (a daemon still exiting listens but never answers).
            if has_listener(self._socket_path) and _endpoint_answers(self._context, self.endpoint):
                raise StartError(f"another cgtreed already serves {self.endpoint}")
            log.info("removing stale socket file %s", self._socket_path)
            try:
                os.unlink(self._socket_path)
            except FileNotFoundError:
                pass
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished client fails loudly, not silently
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client's new socket (same routing id) takes over
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.daemon.max_message_bytes)  # per frame; totals are checked per request
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise StartError(f"cannot bind {self.endpoint}: {exc}") from exc
        self._bound = True  # from now on the socket file is ours to remove
        self._socket = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        # The spin loop's poller: the raw fds only (one C call), the ZeroMQ socket is asked for
        # its events directly; zmq.Poller costs several times more per turn.
        self._spin_poller = select.poll()
        self._spin_poller.register(self._wake_r.fileno(), select.POLLIN)
        self._open_lanes()

    def _open_lanes(self) -> None:
        """The submit-lane listener beside an ipc:// socket file (config ``daemon.lanes``)."""
        path = lane_path_for(self._socket_path)
        if not self.config.daemon.lanes or path is None:
            return
        try:  # the same access as the ZeroMQ socket file (systemd deployments: a group)
            mode = os.stat(self._socket_path).st_mode & 0o777
        except OSError:
            mode = 0o600
        hub = LaneHub(path, find_session=self.sessions.by_lane_token, mode=mode, watch=self._watch_fd, unwatch=self._unwatch_fd,
                      make_doorbell=self._make_doorbell, settle=self._settle_devices)
        try:
            hub.open()
        except OSError as exc:  # the service still works over ZeroMQ alone
            log.warning("no submit lanes (cannot listen on %s: %s); every request goes over ZeroMQ", path, exc)
            return
        self._watch_fd(hub.listener.fileno())
        self.lanes = hub

    def doorbell_decision(self) -> tuple[bool, str]:
        """Whether a lane attaching now gets a doorbell, and why (``daemon.doorbell``, live)."""
        return doorbell_policy(self.config.daemon.doorbell, serves_cuda=self._serves_cuda,
                               spins=self.config.daemon.spin_us > 0)

    def _make_doorbell(self) -> Optional[Doorbell]:
        if not self.doorbell_decision()[0]:
            return None
        return Doorbell([name for name, runtime in self.devices.items() if runtime.is_cuda])

    def _spins(self) -> bool:
        """Whether the loop polls without sleeping after an answer: CUDA daemons, and CPU ones
        that were told to ring doorbells (their clients would otherwise kick every request)."""
        if not self.config.daemon.spin_us:
            return False
        return self._serves_cuda or (self.lanes is not None and bool(self.lanes.ringing))

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

    def _watch_fd(self, fd: int) -> None:
        self._poller.register(fd, zmq.POLLIN)
        self._spin_poller.register(fd, select.POLLIN)

    def _unwatch_fd(self, fd: int) -> None:
        self._poller.unregister(fd)
        try:
            self._spin_poller.unregister(fd)
        except KeyError:
            pass

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded in a test thread: the embedder stops us with request_stop()
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT) and (self._stop_signalled() or self._stop_deliveries() > 1):
            self._force_exit_now(signum)
        # Only record it: the loop acts on it between requests (the wake-up fd ends the poll).
        self._pending_signals.append(signum)

    def _stop_signalled(self) -> bool:
        return self._stop_requested or any(s in (signal.SIGTERM, signal.SIGINT) for s in self._pending_signals)

    def _stop_deliveries(self) -> int:
        """SIGTERM/SIGINT deliveries since the loop last drained the wake-up pipe. Python runs a
        handler once for every delivery of one signal that arrived during one long C call (a
        matmul of the request in flight), but its C handler writes a byte per delivery to the
        wake-up fd: peeked at here, a second SIGTERM is never lost that way."""
        try:
            pending = self._wake_r.recv(4096, socket.MSG_PEEK) if self._wake_r is not None else b""
        except OSError:
            return 0
        return sum(1 for number in pending if number in (signal.SIGTERM, signal.SIGINT))

    def _force_exit_now(self, signum: int) -> None:
        """Second SIGTERM/SIGINT: leave now, from the handler. No logging here (the handler may
        have interrupted a logging call holding its lock): one raw line on stderr."""
        message = f"cgtreed: second {signal.Signals(signum).name}: exiting now without freeing sessions\n"
        try:
            os.write(2, message.encode())
        except OSError:
            pass
        self._unlink_socket_file()
        os._exit(EXIT_FORCED)

    def request_stop(self) -> None:
        """Ask for a graceful stop from another thread (tests, embedding)."""
        self._pending_signals.append(signal.SIGTERM)
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"s")
            except OSError:
                pass

    # -------------------------------------------------------------------------------- the loop

    def wait_for_events(self) -> dict:
        """What is ready (socket or fd -> events), after at most the time to the next chore.
        Within ``daemon.spin_us`` of the last answer it polls without sleeping: a client that
        sends its next request right away finds the daemon awake (no thread wake-up)."""
        wake_at = min(self._next_housekeeping, self.watchdog.next_due)
        timeout_s = min(max(0.0, wake_at - self.clock()), MAX_LOOP_WAIT_S)
        try:
            ready = self._poll_spinning()
            if not ready:
                ready = self._sleep(timeout_s)
        except zmq.ZMQError as exc:  # EINTR is retried by pyzmq; anything else: next turn
            log.debug("poll: %s", exc)
            return {}
        if self._wake_r.fileno() in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        return ready

    def _poll_spinning(self) -> dict:
        clock, poll_fds, sock = time.perf_counter, self._spin_poller.poll, self._socket
        hub = self.lanes
        ringing = hub is not None and bool(hub.ringing)  # lanes attach and close between calls only
        while True:
            if clock() >= self._spin_until:
                if not self._awaiting_done:
                    return {}
                # A doorbell run was answered at its launch: its client comes back only after
                # the device finished it, so the window runs on until spin_us after that.
                if not ringing or hub.all_settled():
                    self._awaiting_done = False
                    self._spin_until = clock() + self.config.daemon.spin_us * 1e-6
                elif clock() < self._awaiting_done_until:
                    self._spin_until = clock() + DONE_RECHECK_S
                else:
                    self._awaiting_done = False
                    return {}
            found = poll_fds(0)
            zmq_ready = sock.getsockopt(zmq.EVENTS) & zmq.POLLIN
            rung = ringing and hub.any_rung()
            if found or zmq_ready or rung:
                ready = dict(found)
                if zmq_ready:
                    ready[sock] = zmq.POLLIN
                if rung:
                    ready[DOORBELLS] = zmq.POLLIN
                return ready

    def _sleep(self, timeout_s: float) -> dict:
        """Block in poll until something is ready. Doorbell pages say the daemon is asleep while
        it is (their clients send on the lane then), and are looked at once more after saying
        so: a request stored just before is still seen (``cgtree.daemon.doorbell``)."""
        hub = self.lanes
        if hub is None or not hub.ringing:
            return dict(self._poller.poll(timeout=timeout_s * 1000.0))
        if not hub.all_settled():
            self._settle_devices()  # a sticky error in a doorbell run is found before sleeping
            if self.exit_code is not None:
                return {}
            hub.forget_in_flight()  # every device is idle: whatever the pages' done words say
        hub.set_awake(False)
        if hub.any_rung():
            ready = {DOORBELLS: zmq.POLLIN}
        else:
            ready = dict(self._poller.poll(timeout=timeout_s * 1000.0))
        hub.set_awake(True)
        return ready

    def handle_signals(self) -> None:
        while self._pending_signals:
            signum = self._pending_signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload(trigger="SIGHUP")
            elif signum in (signal.SIGTERM, signal.SIGINT) and not self._stop_requested:
                log.info("%s: stopping (a second signal forces exit)", signal.Signals(signum).name)
                self._stop_requested = True

    def serve_pending(self, ready: Optional[dict] = None) -> None:
        """Answer what is queued: ZeroMQ requests, then new lanes and lane requests (``ready``
        from ``wait_for_events`` says which lane fds to read; None: every lane)."""
        if ready is None or self._socket in ready:
            self._serve_zmq()
        if self.lanes is not None:
            self._serve_lanes(ready)
            if self.lanes.ringing:
                self._serve_doorbells()
        if self._spins():
            # CPU replay backends spin only for doorbells: their own work needs the cores.
            self._spin_until = time.perf_counter() + self.config.daemon.spin_us * 1e-6

    def _serve_zmq(self) -> None:
        for _ in range(MAX_REQUESTS_PER_TURN):
            # A signal that arrived during the last request is seen before the next one: a stop
            # finishes the request in flight, not the queue behind it.
            if self._pending_signals:
                return
            try:
                message = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("receive failed: %s", exc)
                return
            reply = self.handle_message(message)
            if reply is not None:
                self._send(reply)
            if self.exit_code is not None:
                return

    def _serve_lanes(self, ready: Optional[dict]) -> None:
        hub = self.lanes
        if ready is None or hub.listener.fileno() in ready:
            hub.accept()
        # Only the lanes with something to read (the poll said which): a turn costs the same
        # with one session or a thousand.
        connections = list(hub.connections.values()) if ready is None else \
            [c for c in map(hub.connections.get, ready) if c is not None]
        for connection in connections:
            if hub.connections.get(connection.fd) is not connection:
                continue  # closed earlier in this turn (a newer lane of its session replaced it)
            if self._pending_signals or self.exit_code is not None:
                return
            # One datagram per ready lane and turn: a client has one request in flight, and a
            # second read would only meet EAGAIN (an exception: microseconds on every submit).
            for event in hub.read(connection, 1 if ready is not None else MAX_REQUESTS_PER_TURN):
                if event.closed:
                    hub.close(connection)
                    if connection.session is not None and connection.session.client.alive() is False:
                        self._next_housekeeping = 0.0  # a client died: reclaim its session now
                elif event.refused is not None:
                    log.info("lane handshake refused: %s", event.refused)
                elif event.error is not None:
                    self.counters["errors"] += 1
                    hub.send(connection, [encode_error(None, "too_large" if "larger" in event.error else "bad_request",
                                                       f"submit lane: {event.error}")])
                elif event.frames is not None:
                    self._answer_on_lane(connection, event.frames)
                if self._pending_signals or self.exit_code is not None:
                    return

    def _answer_on_lane(self, connection: LaneConnection, frames: list) -> None:
        session = connection.session
        if session.state != "live" or session.identity is None:
            # The session ended under the lane (normally its lanes close with it): say so, so
            # the client says hello again, knowing the request did not run.
            self.lanes.send(connection, [encode_error(_peek_request_id(frames[0]), "no_session", "the session of this lane has ended")])
            self.lanes.close(connection)
            return
        if is_plan_request(frames):
            reply = self.answer_plan(session, frames[0])
        elif is_kick(frames):
            if connection.doorbell is not None:  # the client rang while the daemon fell asleep
                self._serve_doorbell(connection)
            return
        else:
            reply = self.answer(session.identity, frames, session.owner)  # the lane's uid was checked at its handshake
        self._reply_on_lane(connection, reply)

    def _reply_on_lane(self, connection: LaneConnection, reply: list) -> None:
        if fits_lane(reply):
            self.lanes.send(connection, reply)
        else:  # too large for a datagram: over ZeroMQ, and a notice on the lane
            self._send([connection.session.identity, *reply])
            self.lanes.send(connection, MOVED)

    def _serve_doorbells(self) -> None:
        for connection in list(self.lanes.ringing):
            if self._pending_signals or self.exit_code is not None:
                return
            if connection.doorbell is not None and connection.doorbell.rung():
                self._serve_doorbell(connection)

    def _serve_doorbell(self, connection: LaneConnection) -> None:
        """Answer the request rung on ``connection``'s doorbell, if any: a replayed plan run in
        the page (outputs ready when the device writes its done word), anything else on the lane."""
        doorbell = connection.doorbell
        taken = doorbell.take()
        if taken is None:
            return
        seq, plan_id = taken
        session = connection.session
        session.counters["doorbell_requests"] += 1
        if session.state != "live" or session.identity is None:
            self._answer_on_lane_instead(connection, seq, [encode_error(seq, "no_session", "the session of this lane has ended")])
            self.lanes.close(connection)
            return
        outcome = self.answer_plan(session, None, plan=(seq, plan_id), settle=partial(doorbell.signal_done, seq=seq))
        if isinstance(outcome, PlanReplayed):
            self._awaiting_done = self._spins()
            self._awaiting_done_until = time.perf_counter() + DONE_SPIN_MAX_S
            doorbell.answer(seq, REPLAYED, generation=outcome.generation, node_id=outcome.node_id,
                            daemon_us=outcome.daemon_us, device_index=outcome.device_index)
        else:
            self._answer_on_lane_instead(connection, seq, outcome)

    def _answer_on_lane_instead(self, connection: LaneConnection, seq: int, reply: list) -> None:
        """A doorbell request's full reply: on the lane (ZeroMQ when too large), then the ack."""
        self._reply_on_lane(connection, reply)
        if connection.doorbell is not None:
            connection.doorbell.answer(seq, ON_LANE)

    def _close_session_lanes(self, session: Any) -> None:
        if self.lanes is not None:
            self.lanes.close_session_lanes(session)

    def handle_message(self, message: list) -> Optional[list]:
        """One multipart message -> the multipart reply (None: unanswerable, dropped)."""
        if len(message) < 2:
            self.counters["dropped"] += 1
            log.warning("dropped a message with no content after its routing id")
            return None
        identity = message[0].bytes
        # A REQ client puts an empty delimiter frame before the envelope; echo it back.
        head = [identity]
        body_frames = message[1:]
        if len(body_frames) >= 2 and len(body_frames[0]) == 0:
            head.append(b"")
            body_frames = body_frames[1:]
        peer_uid = peer_uid_of_frame(message[0]) if self._peer_credentials else UNVERIFIED
        return head + self.answer(identity, body_frames, peer_uid)

    def answer(self, identity: bytes, body_frames: list, peer_uid: Optional[int] = UNVERIFIED) -> list:
        """One request's frames (envelope, data) from ``identity``, sent by a process of uid
        ``peer_uid`` (``cgtree.daemon.tenancy``) -> the reply's frames."""
        self.counters["requests"] += 1
        session = self.sessions.get(identity)
        request, refusal = self._decode(body_frames)
        request_id = request.request_id if request is not None else getattr(refusal, "request_id", None)
        if refusal is None and session is not None and not may_use(peer_uid, session.owner):
            # A routing id bound to another user's session (handed over, guessed): nothing of that
            # session may be touched, whatever the command.
            refusal = ProtocolError("forbidden", f"this routing id belongs to a session of another user; {describe_uid(peer_uid)} may not use it")
            session = None
        with request_context(request_id if request_id is not None else "?", session.label if session is not None else None):
            if refusal is not None:
                return [self._refuse(request_id, "?" if request is None else request.op, refusal)]
            return self._dispatch(identity, session, request, peer_uid)

    def answer_plan(self, session: Any, frame: Any, *, plan: Optional[tuple[int, int]] = None,
                    settle: Optional[Callable] = None) -> Any:
        """A prepared submit (``cgtree.daemon.plans``) on ``session``'s lane -> the reply's frames;
        for a doorbell's (``plan`` = (seq, plan id), ``settle``) a ``PlanReplayed`` when it
        replayed. The hot path of a submit loop: no per-request context object; errors are
        answered as ``_guarded`` answers them."""
        self.counters["requests"] += 1
        request_id, plan_id = parse_plan_request(frame) if plan is None else plan
        session.touch(self.clock())
        session.counters["requests"] += 1
        if self._plan_services is None:
            self._plan_services = PlanServices(self.devices, self.watchdog.keepalive, self.metrics)
        with request_context(request_id, session.label):
            try:
                outcome = run_plan(self._plan_services, session, request_id, plan_id, settle=settle,
                                   finish_general=partial(self._general_plan_reply, request_id, plan_id, session))
            except Exception as exc:  # noqa: BLE001 - every failure becomes its error reply
                return [self._error_reply(request_id, "submit (plan)", exc)]
        if isinstance(outcome, PlanReplayed) and plan is None:
            return [pack_plan_reply(request_id, outcome.generation, outcome.node_id, outcome.daemon_us)]
        return outcome

    def _general_plan_reply(self, request_id: Any, plan_id: int, session: Any, state: Any, runtime: Any, graph_id: str,
                            outputs: list, received: float) -> list:
        """The full submit reply to a plan run that did not replay into the same slots; it names
        the plan again while the plan still stands (the same output buffer)."""
        from cgtree.daemon.commands import submit

        reply = submit.finish(self._context_for(session.identity, request_id, session.owner), session, state, runtime, graph_id,
                              outputs, received, to_host=False)
        plan = state.plans.by_id.get(plan_id)
        if plan is not None and submit.plannable(reply, state, graph_id) and state.output_buffers.get(graph_id) is plan.buffer:
            reply.body["plan"] = plan_id
        return [encode_reply(request_id, reply.body), *reply.frames]

    def _decode(self, body_frames: list) -> tuple[Optional[Request], Optional[ProtocolError]]:
        """The request, or the refusal (carrying ``request_id`` when the envelope had one)."""
        size = sum(len(frame) for frame in body_frames)
        try:
            if not body_frames:  # a lane datagram of zero frames (a ZeroMQ message always has one)
                raise ProtocolError("bad_request", "the message has no frames: frame 0 must be the envelope")
            if size > self.config.daemon.max_message_bytes:
                error = ProtocolError("too_large", f"message of {size} bytes exceeds daemon.max_message_bytes = {self.config.daemon.max_message_bytes}")
                error.request_id = _peek_request_id(body_frames[0])
                raise error
            return decode_request(frame_view(body_frames[0]), body_frames[1:]), None
        except ProtocolError as exc:
            return None, exc

    def _dispatch(self, identity: bytes, session: Any, request: Request, peer_uid: Optional[int]) -> list:
        """Run the request's command: [reply envelope, *data frames], or [error envelope]."""
        request_id, op = request.request_id, request.op

        def run() -> list:
            command = command_registry.COMMANDS.get(op)
            if command is None:
                raise ProtocolError("unknown_op", f"no command {op!r} (known: {', '.join(sorted(command_registry.COMMANDS))})")
            if command.NEEDS_SESSION and session is None:
                raise ProtocolError("no_session", f"{op} needs a session: send hello first")
            if session is not None:
                session.touch(self.clock())
                session.counters["requests"] += 1
            reply = command.execute(self._context_for(identity, request_id, peer_uid), session, request.body, request.frames)
            return [encode_reply(request_id, reply.body), *reply.frames]

        return self._guarded(request_id, op, run)

    def _guarded(self, request_id: Any, op: str, run: Callable[[], list]) -> list:
        """``run()``'s reply frames; a refusal, a CUDA error or a bug becomes its error reply."""
        started = time.perf_counter()
        try:
            log.debug("request %s: %s", request_id, op)
            frames = run()
            log.debug("request %s: %s answered in %.3f ms", request_id, op, (time.perf_counter() - started) * 1e3)
            return frames
        except Exception as exc:  # noqa: BLE001 - every failure becomes its error reply
            return [self._error_reply(request_id, op, exc)]

    def _error_reply(self, request_id: Any, op: str, exc: Exception) -> bytes:
        """The error reply for ``exc`` raised while serving a request (counted and logged)."""
        if isinstance(exc, ProtocolError):
            return self._refuse(request_id, op, exc)
        self.counters["errors"] += 1
        if looks_like_cuda_error(exc):
            return self.on_cuda_error(request_id, exc)
        self.counters["internal_errors"] += 1
        log.error("request %s failed with an internal error (op %s)", request_id, op, exc_info=exc)
        return encode_error(request_id, "internal", f"{type(exc).__name__}: {exc} (request {request_id!r}; see the daemon log)")

    def _refuse(self, request_id: Any, op: str, exc: ProtocolError) -> bytes:
        self.counters["errors"] += 1
        log.info("request %s refused: %s (op %s)", request_id, exc, op)
        return encode_error(request_id, exc.code, exc.message)

    def on_cuda_error(self, request_id: Any, exc: BaseException) -> bytes:
        """Hook for CUDA errors: a sticky one (the context is poisoned) ends the daemon."""
        sticky = cuda_context_is_broken(list(self.devices))
        log.error("request %s: CUDA error (%s): %s", request_id, "sticky: exiting for a restart" if sticky else "not sticky", exc)
        if sticky:
            self.exit_code = EXIT_CUDA_ERROR
            self.state = "stopping"
            notify.stopping(f"sticky CUDA error: exiting (status {EXIT_CUDA_ERROR}) for a restart: {exc}"[:200])
        return encode_error(request_id, "cuda_error", f"{exc}" + (" (sticky: the daemon restarts)" if sticky else ""))

    def _send(self, frames: list) -> None:
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (client gone) or EAGAIN (not reading)
            self.counters["dropped"] += 1
            log.info("reply to a client dropped: %s", exc)

    def _context_for(self, identity: bytes, request_id: Any, peer_uid: Optional[int]) -> CommandContext:
        return CommandContext(
            identity=identity, request_id=request_id, config=self.config, devices=self.devices,
            sessions=self.sessions, metrics=self.metrics, daemon_info=self.info,
            next_buffer_id=self._next_buffer_id, reload=self._reload_command, keepalive=self.watchdog.keepalive,
            lane_path=self.lanes.path if self.lanes is not None else None, peer_uid=peer_uid, daemon_uid=self._uid,
        )

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
        if plan.applies("daemon.max_message_bytes") and self._socket is not None:
            self._socket.setsockopt(zmq.MAXMSGSIZE, self.config.daemon.max_message_bytes)  # new connections
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
        self._restore_signal_handlers()
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
        refused = self._refuse_lane_requests()
        while self.clock() < until and self._socket is not None:
            try:
                message = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                time.sleep(0.01)  # a request already on its way still gets its answer
                continue
            except zmq.ZMQError:
                break
            if len(message) < 2:
                continue
            head = [message[0]] + ([b""] if len(message) > 2 and len(message[1]) == 0 else [])
            request_id = None
            try:
                request_id = request_id_of(unpack(message[len(head)].bytes))
            except Exception:
                pass
            self._send(head + [encode_error(request_id, "unavailable", "the daemon is stopping; retry after it restarts")])
            refused += 1
        return refused

    def _refuse_lane_requests(self) -> int:
        """Requests already queued on lanes get ``unavailable`` (never run: safe to re-send)."""
        refused = 0
        if self.lanes is None:
            return 0
        for connection in list(self.lanes.connections.values()):
            taken = connection.doorbell.take() if connection.doorbell is not None else None
            if taken is not None:
                self._answer_on_lane_instead(connection, taken[0], [encode_error(
                    taken[0], "unavailable", "the daemon is stopping; retry after it restarts")])
                refused += 1
            for event in self.lanes.read(connection, MAX_REQUESTS_PER_TURN):
                if event.frames is not None and not is_kick(event.frames):
                    request_id = _peek_request_id(event.frames[0])
                    self.lanes.send(connection, [encode_error(request_id, "unavailable", "the daemon is stopping; retry after it restarts")])
                    refused += 1
        return refused

    def _arm_hard_deadline(self, seconds: float) -> threading.Timer:
        # The last resort when teardown hangs inside a C call (signals cannot run Python then).
        def expire() -> None:
            log.error("shutdown did not finish within %.1f s: exiting now", seconds)
            self._unlink_socket_file()
            os._exit(EXIT_FORCED)

        timer = threading.Timer(seconds + 1.0, expire)
        timer.daemon = True
        timer.start()
        return timer

    def _close_socket(self) -> None:
        if self.lanes is not None:
            self.lanes.shutdown()
            self.lanes = None
        if self._socket is not None:
            try:
                self._socket.close(linger=100)  # let the "unavailable" replies out
            except zmq.ZMQError:
                pass
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None
        self._unlink_socket_file()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None

    def _unlink_socket_file(self) -> None:
        # Only files we bound: a daemon refused at start must not remove a live one's socket.
        if self._socket_path is not None and self._bound:
            for path in (self._socket_path, lane_path_for(self._socket_path)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not remove %s: %s", path, exc)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(-1)

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
            "doorbell": dict(zip(("enabled", "why"), self.doorbell_decision())),
            "compile": {"mode": self.config.daemon.compile, "worker_pid": self.compiler.worker_pid(),
                        "jobs": self.compiler.describe(), **self.compiler.counters},
            "counters": dict(self.counters),
        }


# Kept for callers that build a Daemon without starting it (unit tests).
_NoMetrics = NullMetrics


def _peek_request_id(frame: Any) -> Any:
    """The request id of an envelope, if cheaply readable (before decoding it properly)."""
    if len(frame) > 64 * 1024:
        return None
    try:
        return request_id_of(unpack(frame_view(frame)))
    except Exception:
        return None


def _endpoint_answers(context: zmq.Context, endpoint: str, timeout_ms: int = 500) -> bool:
    """Whether a daemon answers a ping on ``endpoint`` (so its socket file is not stale)."""
    from cgtree.daemon.protocol import encode_request, unpack

    probe = context.socket(zmq.DEALER)
    probe.setsockopt(zmq.LINGER, 0)
    try:
        probe.connect(endpoint)
        probe.send(encode_request(0, "ping", {}))
        if probe.poll(timeout_ms, zmq.POLLIN):
            unpack(probe.recv())
            return True
        return False
    except Exception:
        return False
    finally:
        probe.close(0)


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
