"""Prometheus metrics for cgtreed: what the tree managers did with each submit, how long it
took, and how much pool memory and how many sessions the daemon holds.

Exposed series (``/metrics`` on a loopback address):
- ``cgtree_submits_total``: submits handled, any outcome.
- ``cgtree_warmups_total`` / ``cgtree_recordings_total`` / ``cgtree_replays_total``: submits
  that ran eagerly in the pool, captured a CUDA graph, or replayed one.
- ``cgtree_skips_total{reason}``: submits run without graphs, by reason category.
- ``cgtree_submit_latency_seconds``: daemon-side handling time per submit; buckets from
  10 us (a replay's bookkeeping) to 1 s (a capture, a first inductor call is slower still).
- ``cgtree_pool_bytes{device}``, ``cgtree_live_blocks{device}``: graph pool size and blocks
  held for live outputs, per device (e.g. ``cuda:0``).
- ``cgtree_sessions``: client sessions open now.

Invariants:
- Every ``Metrics`` owns its own ``CollectorRegistry``: two daemons (or two tests) in one
  process never clash over metric names, and nothing from the global registry (process
  collectors of other libraries) is exposed by accident.
- The HTTP endpoint binds a loopback address only: the daemon's socket is host-local and so
  are its metrics (scrape them with a local Prometheus agent or forward them explicitly).
- ``prometheus_client`` is imported only when a ``Metrics`` is built, and the standard
  library's HTTP server (``wsgiref``, ``socketserver``: ~0.1 s of a start-up on a small VM)
  only when one is started; ``make_metrics(0)`` returns ``NullMetrics`` and needs nothing. ``NullMetrics`` has the same methods doing
  nothing, so the submit path calls ``metrics.observe_submit(...)`` without checking a flag.
- ``skip_reason`` text is reduced to a short category label (``mutated_inputs``,
  ``cpu_device``, ...) and at most ``MAX_SKIP_REASON_LABELS`` distinct labels are kept
  (then ``other``): reasons embed tensor names and traces, and a label per distinct text
  would grow the series without bound.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import threading
from typing import Any

__all__ = [
    "Metrics",
    "NullMetrics",
    "MetricsUnavailableError",
    "make_metrics",
    "skip_reason_label",
    "SUBMIT_LATENCY_BUCKETS",
    "MAX_SKIP_REASON_LABELS",
]

# Seconds. Round trips measured on an H200 are ~100 us with ~27 us in the daemon (NOTES.md
# section 2); captures take 5-14 ms; anything near 1 s is a compile or a stall.
SUBMIT_LATENCY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    100e-3, 250e-3, 500e-3, 1.0,
)

MAX_SKIP_REASON_LABELS = 32

SUBMIT_MODES = ("warmup", "recorded", "replayed", "skipped")

# Known skip reason kinds (PyTorch's wording, kept by cgtree/policy.py) -> stable label.
_KNOWN_SKIP_PREFIXES = (
    ("mutated inputs", "mutated_inputs"),
    ("cpu device", "cpu_device"),
    ("multiple devices", "multiple_devices"),
    ("device mismatch", "device_mismatch"),
    ("graph with symbolic shapes", "dynamic_shapes"),
    ("incompatible op", "incompatible_op"),
    ("size not in capture_sizes", "capture_sizes"),
    ("re-recording limit", "rerecord_limit"),
)


class MetricsUnavailableError(RuntimeError):
    """Metrics were asked for (``metrics_port`` != 0) but prometheus-client is not installed."""


def skip_reason_label(reason: object) -> str:
    """A short, bounded label for a skip reason: its leading words, lower-case, ``_``-joined.

    ``"mutated inputs (2 instances). Found from : ..."`` -> ``"mutated_inputs"``;
    ``"cpu device (x)"`` -> ``"cpu_device"``; None or empty -> ``"unknown"``. A
    ``cgtree.skips.SkipReason`` (anything with a ``kind``) is labelled by its kind.
    """
    if reason is not None and not isinstance(reason, str):
        reason = getattr(reason, "kind", None) or str(reason)
    if not reason:
        return "unknown"
    lowered = reason.strip().lower()
    for prefix, label in _KNOWN_SKIP_PREFIXES:
        if lowered.startswith(prefix):
            return label
    # Unknown wording: keep the words before any detail (parenthesis, colon, digit, quote).
    head = re.split(r"[(:\d'\"<\[.]", lowered, maxsplit=1)[0]
    label = re.sub(r"[^a-z]+", "_", head).strip("_")[:40].rstrip("_")
    return label or "unknown"


class NullMetrics:
    """Metrics switched off (``metrics_port = 0``): every method accepts its arguments and
    does nothing, so callers never test whether metrics are enabled."""

    port: int | None = None

    def start(self, port: int, host: str = "127.0.0.1") -> int:
        return 0

    def stop(self) -> None:
        pass

    def observe_submit(self, seconds: float, mode: str, skip_reason: object = None) -> None:
        pass

    def set_pool_bytes(self, device: str, n: int) -> None:
        pass

    def set_live_blocks(self, device: str, n: int) -> None:
        pass

    def set_sessions(self, n: int) -> None:
        pass

    def render(self) -> bytes:
        return b""


class Metrics:
    """The daemon's Prometheus metrics in a private registry, served over HTTP by ``start``.

    Workflow:
    1. ``Metrics()`` creates the registry and the series (raises ``MetricsUnavailableError``
       without prometheus-client).
    2. ``start(port)`` serves ``/metrics`` on ``host:port`` from a background thread and
       returns the bound port (``port=0`` picks a free one: for tests).
    3. The daemon calls ``observe_submit`` per submit and the ``set_*`` gauges when state
       changes; every method is thread-safe.
    4. ``stop()`` closes the listening socket; the registry stays readable via ``render()``.
    """

    def __init__(self) -> None:
        prometheus_client = _import_prometheus_client()
        self._prometheus_client = prometheus_client
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        Counter, Gauge, Histogram = (
            prometheus_client.Counter,
            prometheus_client.Gauge,
            prometheus_client.Histogram,
        )
        # prometheus_client appends "_total" to counter names in the exposition.
        self._submits = Counter(
            "cgtree_submits", "Submits handled by cgtreed, any outcome.", registry=self.registry
        )
        self._mode_counters = {
            "warmup": Counter(
                "cgtree_warmups",
                "Submits run eagerly inside the graph pool (a function's first call).",
                registry=self.registry,
            ),
            "recorded": Counter(
                "cgtree_recordings", "Submits that captured a new CUDA graph.", registry=self.registry
            ),
            "replayed": Counter(
                "cgtree_replays", "Submits that replayed a recorded CUDA graph.", registry=self.registry
            ),
        }
        self._skips = Counter(
            "cgtree_skips",
            "Submits run without CUDA graphs, by reason category.",
            ["reason"],
            registry=self.registry,
        )
        self._submit_latency = Histogram(
            "cgtree_submit_latency_seconds",
            "Time cgtreed spent handling one submit, from request decoded to reply ready.",
            buckets=SUBMIT_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._pool_bytes = Gauge(
            "cgtree_pool_bytes", "Bytes reserved by the CUDA graph memory pool.", ["device"],
            registry=self.registry,
        )
        self._live_blocks = Gauge(
            "cgtree_live_blocks", "Pool blocks held for graph outputs still alive.", ["device"],
            registry=self.registry,
        )
        self._sessions = Gauge("cgtree_sessions", "Client sessions open now.", registry=self.registry)
        self._skip_labels: set[str] = set()
        self._skip_labels_lock = threading.Lock()
        self._server: Any = None  # a wsgiref WSGIServer once started
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` (loopback only); return the port actually bound.

        ``port=0`` binds an ephemeral port (tests). The daemon itself maps its config's
        ``metrics_port = 0`` to "disabled" and never calls this then (see ``make_metrics``).
        Raises ValueError for a non-loopback host, OSError (naming the address) if binding
        fails, RuntimeError if already started.
        """
        if self._server is not None:
            raise RuntimeError(f"metrics endpoint already started on port {self.port}")
        family = _loopback_family(host)
        from wsgiref.simple_server import make_server

        threading_server, quiet_handler = _http_classes()
        server_class = type(
            "_MetricsServer", (threading_server,), {"address_family": family}
        )
        app = self._prometheus_client.make_wsgi_app(registry=self.registry)
        try:
            server = make_server(host, port, app, server_class, handler_class=quiet_handler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        self._server = server
        self.port = server.server_address[1]
        # poll_interval bounds how long stop() waits for the serving loop to notice (the
        # default 0.5 s would eat into the daemon's shutdown deadline); 10 wakeups/s is noise.
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"cgtree-metrics:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop serving and close the listening socket. Safe to call twice or before start."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def observe_submit(self, seconds: float, mode: str, skip_reason: object = None) -> None:
        """Count one submit and its handling time.

        mode: the manager's ``Execution.mode``: ``"warmup"``, ``"recorded"``, ``"replayed"`` or
            ``"skipped"`` (then ``skip_reason`` is counted under its category label).
        Raises ValueError for another mode (a caller bug; nothing is counted then).
        """
        if mode == "skipped":
            self._skips.labels(reason=self._bounded_skip_label(skip_reason)).inc()
        else:
            counter = self._mode_counters.get(mode)
            if counter is None:
                raise ValueError(f"submit mode must be one of {', '.join(SUBMIT_MODES)}, got {mode!r}")
            counter.inc()
        self._submits.inc()
        self._submit_latency.observe(seconds)

    def set_pool_bytes(self, device: str, n: int) -> None:
        self._pool_bytes.labels(device=str(device)).set(n)

    def set_live_blocks(self, device: str, n: int) -> None:
        self._live_blocks.labels(device=str(device)).set(n)

    def set_sessions(self, n: int) -> None:
        self._sessions.set(n)

    def render(self) -> bytes:
        """The current exposition text (what a scrape of ``/metrics`` returns)."""
        return self._prometheus_client.generate_latest(self.registry)

    def _bounded_skip_label(self, reason: str | None) -> str:
        label = skip_reason_label(reason)
        with self._skip_labels_lock:
            if label in self._skip_labels:
                return label
            if len(self._skip_labels) >= MAX_SKIP_REASON_LABELS:
                return "other"
            self._skip_labels.add(label)
            return label


def make_metrics(port: int, host: str = "127.0.0.1") -> Metrics | NullMetrics:
    """The daemon's metrics for its config's ``metrics_port``.

    0: ``NullMetrics`` (disabled; prometheus-client not needed). Otherwise a started
    ``Metrics`` on ``host:port``; raises ``MetricsUnavailableError`` without prometheus-client
    and OSError when the port cannot be bound.
    """
    if port == 0:
        return NullMetrics()
    metrics = Metrics()
    metrics.start(port, host)
    return metrics


def _import_prometheus_client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise MetricsUnavailableError(
            "Prometheus metrics are enabled (daemon.metrics_port != 0) but the prometheus-client "
            "package is not installed: pip install 'cgtree[metrics]' (or prometheus-client), "
            "or set metrics_port = 0"
        ) from exc
    return prometheus_client


def _loopback_family(host: str) -> socket.AddressFamily:
    """AF_INET/AF_INET6 for a loopback ``host``; ValueError for anything else."""
    if host == "localhost":
        return socket.AF_INET
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"metrics host must be a loopback address such as 127.0.0.1, got {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"metrics host must be a loopback address such as 127.0.0.1, got {host!r}")
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


@functools.lru_cache(maxsize=1)
def _http_classes() -> tuple[type, type]:
    """The HTTP server and handler classes, built on first use (their imports cost start-up
    time that a daemon without metrics should not pay)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
        # A slow scraper must not block the next scrape or shutdown; worker threads are daemons
        # so a hung connection never keeps the daemon process alive at exit.
        daemon_threads = True

    class _QuietHandler(WSGIRequestHandler):
        # wsgiref logs every request to stderr, which is the journal: one line per scrape is noise.
        def log_message(self, format: str, *args: Any) -> None:
            pass

    return _ThreadingWSGIServer, _QuietHandler
