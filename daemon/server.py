"""cgtreed's server: the ``Daemon`` that binds the endpoint, serves requests one at a time
and keeps sessions, devices and configuration in order.

Workflow (``run``):
1. ``start()``: bind a ROUTER socket on the endpoint (refusing one a live daemon serves),
   install signal handlers, log which backend each device runs, tell systemd READY.
2. The main loop: ``poll`` (the socket, the signal wake-up pipe, at most one housekeeping
   period), ``handle_signals``, ``serve_pending`` (dispatch each request to its command),
   ``housekeeping`` when due.
3. ``stop()``: stop intake (queued requests get ``unavailable``), close every session (trees,
   pools, IPC handles), close the socket and remove its file; exit 0 within
   ``shutdown_timeout_s``, or non-zero when forced (second signal, deadline).

Invariants:
- Signal handlers only record the signal and poke the wake-up pipe (gunicorn style);
  everything else happens in the loop, between requests.
- One bad request never takes the loop down: protocol errors get their error reply, any
  other exception in a handler becomes ``internal`` with the request id logged. Unanswerable
  messages (no routing id, nothing after it) are dropped and counted.
- A sticky CUDA error is the exception: the request gets ``cuda_error``, then the daemon
  exits non-zero (``EXIT_CUDA_ERROR``) so its supervisor restarts it with a fresh context.
- Sends never block the loop: a client that vanished or stopped reading loses its reply.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Optional

import zmq

import cgtree
from cgtree.config import Config, ConfigError, load_config
from cgtree.daemon import commands as command_registry
from cgtree.daemon.commands import CommandContext
from cgtree.daemon.graphs import DeviceRuntime, resolve_devices
from cgtree.daemon.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    decode_request,
    encode_error,
    encode_reply,
    request_id_of,
    unpack,
)
from cgtree.daemon.runtime_dir import ipc_path
from cgtree.daemon.sessions import SessionRegistry

log = logging.getLogger("cgtree.daemon.server")

EXIT_OK = 0
EXIT_FORCED = 1  # second signal or shutdown deadline passed
EXIT_CUDA_ERROR = 70  # EX_SOFTWARE: a sticky CUDA error poisoned the context; restart us
EXIT_START_FAILED = 78  # EX_CONFIG: bad configuration, endpoint in use, unusable device

MAX_REQUESTS_PER_TURN = 64  # then signals and housekeeping get a look in
STOP_DRAIN_S = 0.2  # how long stop() keeps answering queued requests with "unavailable"


class StartError(RuntimeError):
    """The daemon cannot start (endpoint served by another daemon, no usable device, ...)."""


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
    """cgtreed. ``Daemon(config, ...).run()`` returns the process exit code."""

    def __init__(self, config: Config, *, endpoint: str, device_names: Optional[list[str]] = None,
                 config_path: Optional[str] = None, clock: Callable[[], float] = time.monotonic,
                 session_linger_s: Optional[float] = None) -> None:
        self.config = config
        self.endpoint = endpoint
        self.config_path = config_path
        self.clock = clock
        self.started_at = clock()
        self.device_names = device_names if device_names is not None else resolve_devices(config.daemon.devices)
        self.devices: dict[str, DeviceRuntime] = {}
        self.sessions = SessionRegistry(
            release_graph=self._release_graph, clock=clock,
            linger_s=session_linger_s if session_linger_s is not None else config.daemon.session_linger_s,
        )
        self.metrics: Any = None
        self.counters = {"requests": 0, "errors": 0, "dropped": 0, "internal_errors": 0}
        self.exit_code: Optional[int] = None  # set when the loop must end
        self._buffer_ids = itertools.count(1)
        self._pending_signals: list[int] = []
        self._stop_requested = False
        self._force_exit = False
        self._next_housekeeping = 0.0
        self._next_watchdog = 0.0
        self._context: Optional[zmq.Context] = None
        self._socket: Optional[zmq.Socket] = None
        self._poller: Optional[zmq.Poller] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._previous_handlers: dict[int, Any] = {}
        self._socket_path = ipc_path(endpoint)
        self._bound = False

    # ------------------------------------------------------------------------------- lifecycle

    def run(self) -> int:
        try:
            self.start()
        except StartError as exc:
            log.error("cannot start: %s", exc)
            self._close_socket()
            return EXIT_START_FAILED
        log.info("serving %s (pid %d, protocol %d)", self.endpoint, os.getpid(), PROTOCOL_VERSION)
        while self.exit_code is None:
            self.wait_for_events()
            self.handle_signals()
            if self._stop_requested or self.exit_code is not None:
                break
            self.serve_pending()
            if self.clock() >= self._next_housekeeping:
                self.housekeeping()
        if self.exit_code is not None:  # fatal (sticky CUDA error): no orderly teardown possible
            self._close_socket()
            return self.exit_code
        return self.stop()

    def start(self) -> None:
        self._start_devices()
        self._bind()
        self._install_signal_handlers()
        self.metrics = _make_metrics(self.config.daemon.metrics_port)
        _notify("ready", f"serving {self.endpoint} on {', '.join(self.devices)}")

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
                )
            except Exception as exc:
                raise StartError(f"device {name}: {exc}") from exc
            self.devices[name] = runtime
            # Say plainly what runs: a CPU replay backend is never presented as CUDA.
            log.info("device %s: backend %s%s", name, runtime.backend,
                     "" if runtime.backend == "cuda" else " (no CUDA graphs: functions are re-run into recorded buffers)")
        if self.config.daemon.cache_dir:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", self.config.daemon.cache_dir)

    def _bind(self) -> None:
        self._context = zmq.Context()
        if self._socket_path is not None and os.path.exists(self._socket_path):
            if _endpoint_answers(self._context, self.endpoint):
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

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded in a test thread: the embedder stops us with request_stop()
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only record it: the loop acts on it between requests (the wake-up fd ends the poll).
        self._pending_signals.append(signum)
        if signum in (signal.SIGTERM, signal.SIGINT) and self._stop_requested:
            self._force_exit = True

    def request_stop(self) -> None:
        """Ask for a graceful stop from another thread (tests, embedding)."""
        self._pending_signals.append(signal.SIGTERM)
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"s")
            except OSError:
                pass

    # -------------------------------------------------------------------------------- the loop

    def wait_for_events(self) -> None:
        timeout_ms = max(0.0, self._next_housekeeping - self.clock()) * 1000.0
        try:
            ready = dict(self._poller.poll(timeout=min(timeout_ms, 1000.0)))
        except zmq.ZMQError as exc:  # EINTR is retried by pyzmq; anything else: next turn
            log.debug("poll: %s", exc)
            return
        if self._wake_r.fileno() in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    def handle_signals(self) -> None:
        while self._pending_signals:
            signum = self._pending_signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                if self._stop_requested:
                    self._force_exit = True
                log.info("%s: stopping (a second signal forces exit)", signal.Signals(signum).name)
                self._stop_requested = True

    def serve_pending(self) -> None:
        for _ in range(MAX_REQUESTS_PER_TURN):
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
        request_id: Any = None
        self.counters["requests"] += 1
        try:
            size = sum(len(frame) for frame in body_frames)
            if size > self.config.daemon.max_message_bytes:
                request_id = _peek_request_id(body_frames[0])
                raise ProtocolError("too_large", f"message of {size} bytes exceeds daemon.max_message_bytes = {self.config.daemon.max_message_bytes}")
            request = decode_request(body_frames[0].buffer, body_frames[1:])
            request_id = request.request_id
            command = command_registry.COMMANDS.get(request.op)
            if command is None:
                raise ProtocolError("unknown_op", f"no command {request.op!r} (known: {', '.join(sorted(command_registry.COMMANDS))})")
            session = self.sessions.get(identity)
            if command.NEEDS_SESSION and session is None:
                raise ProtocolError("no_session", f"{request.op} needs a session: send hello first")
            if session is not None:
                session.touch(self.clock())
                session.counters["requests"] += 1
            ctx = self._context_for(identity, request_id)
            with _request_context(request_id, session.label if session is not None else None):
                reply = command.execute(ctx, session, request.body, request.frames)
            return head + [encode_reply(request_id, reply.body), *reply.frames]
        except ProtocolError as exc:
            request_id = getattr(exc, "request_id", request_id)
            self.counters["errors"] += 1
            log.info("request %s refused: %s", request_id, exc)
            return head + [encode_error(request_id, exc.code, exc.message)]
        except Exception as exc:
            self.counters["errors"] += 1
            if looks_like_cuda_error(exc):
                return head + [self.on_cuda_error(request_id, exc)]
            self.counters["internal_errors"] += 1
            log.exception("request %s failed with an internal error", request_id)
            return head + [encode_error(request_id, "internal", f"{type(exc).__name__}: {exc} (request {request_id!r}; see the daemon log)")]

    def on_cuda_error(self, request_id: Any, exc: BaseException) -> bytes:
        """Hook for CUDA errors: a sticky one (the context is poisoned) ends the daemon."""
        sticky = cuda_context_is_broken(list(self.devices))
        log.error("request %s: CUDA error (%s): %s", request_id, "sticky: exiting for a restart" if sticky else "not sticky", exc)
        if sticky:
            self.exit_code = EXIT_CUDA_ERROR
            _notify("stopping")
        return encode_error(request_id, "cuda_error", f"{exc}" + (" (sticky: the daemon restarts)" if sticky else ""))

    def _send(self, frames: list) -> None:
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (client gone) or EAGAIN (not reading)
            self.counters["dropped"] += 1
            log.info("reply to a client dropped: %s", exc)

    def _context_for(self, identity: bytes, request_id: Any) -> CommandContext:
        return CommandContext(
            identity=identity, request_id=request_id, config=self.config, devices=self.devices,
            sessions=self.sessions, metrics=self.metrics, daemon_info=self.info,
            next_buffer_id=lambda: next(self._buffer_ids),
        )

    # --------------------------------------------------------------------------- housekeeping

    def housekeeping(self) -> None:
        """Reap dead sessions, expire parked ones, let IPC memory go, report to systemd."""
        now = self.clock()
        self._next_housekeeping = now + self.config.daemon.reap_interval_s
        for session, reason in self.sessions.reap(self.config.daemon.session_timeout_s):
            log.info("reclaimed session %s: %s", session.label, reason)
        if any(rt.is_cuda for rt in self.devices.values()):
            import torch

            torch.cuda.ipc_collect()  # free output buffers whose clients closed their mappings
        self.metrics.set_sessions(len(self.sessions))
        if getattr(self.metrics, "port", None):  # metrics served: per-device pool gauges
            self._update_pool_gauges()
        if now >= self._next_watchdog:
            interval = _watchdog_interval_s()
            self._next_watchdog = now + (interval / 2 if interval else 3600.0)
            _notify("watchdog")

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

    def reload(self) -> bool:
        """SIGHUP: re-read the config file. New policies apply to new recordings; an invalid
        file is rejected and the running configuration kept. Returns whether it applied."""
        if not self.config_path:
            log.warning("SIGHUP: no --config file to reload; keeping the running configuration")
            return False
        _notify("reloading")
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: %s; keeping the running configuration", exc)
            _notify("ready", "reload rejected; running configuration kept")
            return False
        old = self.config
        # endpoint and devices are bound at start; say so instead of pretending they changed.
        for key in ("endpoint", "devices", "metrics_port"):
            if getattr(new.daemon, key) != getattr(old.daemon, key):
                log.warning("SIGHUP: daemon.%s changed; it takes effect at the next restart", key)
        new = dataclasses.replace(new, daemon=dataclasses.replace(new.daemon, endpoint=old.daemon.endpoint, devices=old.daemon.devices,
                                                                  metrics_port=old.daemon.metrics_port))
        self.config = new
        self.sessions.linger_s = new.daemon.session_linger_s
        if new.policy != old.policy:
            for session in self.sessions.sessions.values():
                for state in session.devices.values():
                    if state.manager is not None and hasattr(state.manager, "set_policy"):
                        state.manager.set_policy(new.policy)
        if (new.daemon.log_level, new.daemon.log_format) != (old.daemon.log_level, old.daemon.log_format):
            _configure_logging(new.daemon.log_level, new.daemon.log_format)
        if new.daemon.max_message_bytes != old.daemon.max_message_bytes and self._socket is not None:
            self._socket.setsockopt(zmq.MAXMSGSIZE, new.daemon.max_message_bytes)  # new connections
        log.info("SIGHUP: configuration reloaded from %s", self.config_path)
        _notify("ready", f"serving {self.endpoint}")
        return True

    # ------------------------------------------------------------------------------------ stop

    def stop(self) -> int:
        """Graceful stop: refuse queued requests, free every session, close the endpoint."""
        _notify("stopping")
        deadline = self.clock() + self.config.daemon.shutdown_timeout_s
        self._arm_hard_deadline(self.config.daemon.shutdown_timeout_s)
        refused = self._refuse_queued(min(deadline, self.clock() + STOP_DRAIN_S))
        finished = self.sessions.close_all("the daemon is stopping", deadline=deadline, should_stop=self._forced)
        self._close_socket()
        self.metrics.stop() if self.metrics is not None else None
        self._restore_signal_handlers()
        if not finished or self._force_exit:
            log.warning("stopped before every session was freed (%s)", "forced by a second signal" if self._force_exit else "deadline passed")
            return EXIT_FORCED
        log.info("stopped cleanly (%d queued requests refused)", refused)
        return EXIT_OK

    def _forced(self) -> bool:
        self.handle_signals()
        return self._force_exit

    def _refuse_queued(self, until: float) -> int:
        refused = 0
        while self.clock() < until and self._socket is not None:
            try:
                message = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
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
            self._send(head + [encode_error(request_id, "unavailable", "the daemon is shutting down; retry after it restarts")])
            refused += 1
        return refused

    def _arm_hard_deadline(self, seconds: float) -> None:
        # The last resort when teardown hangs inside a C call (signals cannot run Python then).
        def expire() -> None:
            log.error("shutdown did not finish within %.1f s: exiting now", seconds)
            self._unlink_socket_file()
            os._exit(EXIT_FORCED)

        timer = threading.Timer(seconds + 1.0, expire)
        timer.daemon = True
        timer.start()

    def _close_socket(self) -> None:
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
        # Only a file we bound: a daemon refused at start must not remove a live one's socket.
        if self._socket_path is not None and self._bound:
            try:
                os.unlink(self._socket_path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove %s: %s", self._socket_path, exc)

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
            "uptime_s": round(self.clock() - self.started_at, 3),
            "config_path": self.config_path,
            "policy": dataclasses.asdict(self.config.policy),
            "sessions": len(self.sessions),
            "session_linger_s": self.sessions.linger_s,
            "counters": dict(self.counters),
        }


# ------------------------------------------------------------------------------------------
# Ops hooks: systemd notification, metrics, logging. They call the ops modules when present
# and do nothing otherwise, so the daemon runs (and is tested) without them.


def _notify(what: str, status: Optional[str] = None) -> None:
    try:
        from cgtree.daemon import notify
    except ImportError:
        return
    if what == "ready":
        notify.ready(status)
    elif what == "reloading":
        notify.reloading()
    elif what == "stopping":
        notify.stopping()
    elif what == "watchdog":
        notify.watchdog()


def _watchdog_interval_s() -> Optional[float]:
    try:
        from cgtree.daemon import notify
    except ImportError:
        return None
    return notify.watchdog_interval_s()


class _NoMetrics:
    def observe_submit(self, *args: Any, **kwargs: Any) -> None: ...
    def set_sessions(self, n: int) -> None: ...
    def set_pool_bytes(self, device: str, n: int) -> None: ...
    def set_live_blocks(self, device: str, n: int) -> None: ...
    def stop(self) -> None: ...


def _make_metrics(port: int) -> Any:
    try:
        from cgtree.daemon.metrics import make_metrics
    except ImportError:
        return _NoMetrics()
    return make_metrics(port)


def _request_context(request_id: Any, session: Optional[str]) -> Any:
    try:
        from cgtree.daemon.logsetup import request_context
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return request_context(request_id, session)


def _configure_logging(level: str, fmt: str) -> None:
    try:
        from cgtree.daemon.logsetup import configure_logging
    except ImportError:
        logging.basicConfig(level=level.upper())
        logging.getLogger().setLevel(level.upper())
        return
    configure_logging(level, fmt)


def _peek_request_id(frame: Any) -> Any:
    """The request id of an envelope we refuse to process (too large), if cheaply readable."""
    if len(frame) > 64 * 1024:
        return None
    try:
        return request_id_of(unpack(frame.bytes))
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


def _refuse_expandable_segments(device_names: list[str]) -> None:
    """CUDA IPC cannot share expandable-segment memory (cuMem handles need fds): refuse."""
    if not any(name.startswith("cuda") for name in device_names):
        return
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    settings = {part.split(":", 1)[0].strip(): part.split(":", 1)[1].strip() for part in conf.split(",") if ":" in part}
    if settings.get("expandable_segments", "").lower() == "true":
        raise StartError(
            "PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True; their memory cannot be shared through CUDA IPC "
            "handles. Unset it (or set expandable_segments:False) for cgtreed."
        )
