"""cgtree configuration: ``config.toml`` parsed once into frozen dataclasses.

Invariants:
- Every key of the file maps to exactly one field of a frozen dataclass below; an unknown
  table or key, a value of the wrong type or out of range raises ``ConfigError`` naming the
  dotted key and the offending value. Nothing is silently ignored or coerced.
- ``Policy`` is the same object whether it came from the file's ``[policy]`` table or was built
  in code (``Policy(skip_warmup=True)``); the tree manager only ever reads it.
- Parsing is pure: no file other than the one named is read, no environment consulted
  (command-line overrides are applied by the daemon on top of the parsed result).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key and the value."""


@dataclass(frozen=True)
class Policy:
    """What the tree manager records, replays or skips. Mirrors PyTorch's cudagraph knobs.

    skip_warmup: record a CUDA graph on a function's first call instead of running it eagerly
        once first. Saves one call, but the first call's allocations then come from capture.
    support_input_mutation: a function that mutates a tree-managed input (an output of an
        earlier graph on the current path) still runs under graphs. Mutating a static input
        (parameter, buffer, KV cache) always does, as in PyTorch; mutating any other input
        always runs without graphs (the graph would write its private copy).
    skip_dynamic_graphs: functions declared dynamic (symbolic shapes) run without graphs.
    dynamic_shape_warn_limit: warn once when a function has been recorded at more than this
        many distinct input shapes (each shape costs a recording and pool memory).
    rerecord_limit: how often a function may be re-recorded under one parent because a static
        input moved; past it the function runs without graphs there.
    capture_sizes: if non-empty, only calls whose leading dimension of the first copied tensor
        input is in this list are graphed; other sizes run without graphs (vLLM-style allow-list).
    move_cpu_inputs_to_device: copy CPU tensor inputs to the manager's device instead of
        skipping graphs with ``cpu device (<arg>)``.
    """

    skip_warmup: bool = False
    support_input_mutation: bool = False
    skip_dynamic_graphs: bool = False
    dynamic_shape_warn_limit: int = 8
    rerecord_limit: int = 128
    capture_sizes: tuple[int, ...] = ()
    move_cpu_inputs_to_device: bool = False

    def __post_init__(self) -> None:
        _check_type("policy.skip_warmup", self.skip_warmup, bool)
        _check_type("policy.support_input_mutation", self.support_input_mutation, bool)
        _check_type("policy.skip_dynamic_graphs", self.skip_dynamic_graphs, bool)
        _check_type("policy.move_cpu_inputs_to_device", self.move_cpu_inputs_to_device, bool)
        _check_int("policy.dynamic_shape_warn_limit", self.dynamic_shape_warn_limit, minimum=1)
        _check_int("policy.rerecord_limit", self.rerecord_limit, minimum=0)
        sizes = _freeze_list(self, "capture_sizes")
        if not isinstance(sizes, tuple):
            raise ConfigError(f"policy.capture_sizes must be a list of positive integers, got {sizes!r}")
        for size in sizes:
            _check_int("policy.capture_sizes", size, minimum=1)
        if len(set(sizes)) != len(sizes):
            raise ConfigError(f"policy.capture_sizes has duplicates: {list(sizes)!r}")


@dataclass(frozen=True)
class DaemonConfig:
    """How cgtreed listens, whom it serves and what it accepts.

    endpoint: ZeroMQ ``ipc://`` endpoint; empty means ``ipc://<runtime dir>/cgtreed.sock`` where
        the runtime dir is ``$XDG_RUNTIME_DIR/cgtree`` (or ``/tmp/cgtree-<uid>``), mode 0700.
    devices: ``"auto"`` (every CUDA device, or the CPU replay backend when there is none),
        ``"cpu"``, or a list such as ``["cuda:0", "cuda:1"]``.
    max_message_bytes: requests larger than this are refused with ``too_large``.
    session_timeout_s: a session whose client's liveness cannot be checked (pid not visible)
        and that sent no request for this long is reclaimed.
    session_linger_s: a *named* session whose client died keeps its trees (parked, outputs
        invalidated) this long, so a restarted client with the same name finds them warm.
    reap_interval_s: how often dead client processes are looked for.
    allowed_op_namespaces: operator namespaces a graph payload may use besides the built-in
        ``aten``, ``prims`` and the symbolic-int ``operator`` functions.
    compile: ``"eager"`` replays decoded ATen graphs as they are; ``"inductor"`` compiles them
        first, in a compile worker process (inductor's own cudagraphs off: cgtree does the
        graphs); ``"auto"`` (default) is inductor on CUDA devices and eager on the CPU replay
        backend (``cgtree.daemon.compiling.resolve_compile_mode`` says why).
    compile_timeout_s: a compile that takes longer is stopped; the graph keeps its ATen code.
    cache_dir: inductor's on-disk cache (so a restarted daemon does not recompile); empty means
        inductor's default.
    shutdown_timeout_s: SIGTERM/SIGINT finish in-flight work within this deadline, then exit.
    log_level / log_format: stdlib logging level and ``"text"`` (journald-friendly) or ``"json"``.
    metrics_port: 0 disables the Prometheus endpoint; otherwise it is bound on 127.0.0.1:port.
    lanes: offer each session a submit lane (a unix seqpacket socket beside an ``ipc://``
        endpoint) for small requests; ZeroMQ alone when false (``cgtree.daemon.lane`` says why).
    spin_us: after answering a request the daemon polls without sleeping this long, so a
        client's next request is picked up without a wake-up (0: always sleep in poll). Only
        when it serves a CUDA device: CPU replay backends need their cores for the work.
    doorbell: plan runs through a shared-memory page per lane instead of lane datagrams
        (``cgtree.daemon.doorbell``): ``"auto"`` for CUDA daemons that spin, on x86-64;
        ``"on"`` also for CPU replay backends (the daemon then spins on CPU too); ``"off"``.
        Applies to lanes attached after a reload.
    """

    endpoint: str = ""
    devices: str | tuple[str, ...] = "auto"
    max_message_bytes: int = 256 * 1024 * 1024
    session_timeout_s: float = 300.0
    session_linger_s: float = 60.0
    reap_interval_s: float = 1.0
    allowed_op_namespaces: tuple[str, ...] = ()
    compile: str = "auto"
    compile_timeout_s: float = 600.0
    cache_dir: str = ""
    shutdown_timeout_s: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int = 0
    lanes: bool = True
    spin_us: int = 500
    doorbell: str = "auto"

    def __post_init__(self) -> None:
        _check_type("daemon.endpoint", self.endpoint, str)
        if self.endpoint and not self.endpoint.startswith(("ipc://", "tcp://127.0.0.1:", "inproc://")):
            raise ConfigError(
                f"daemon.endpoint must be an ipc:// endpoint (or tcp://127.0.0.1:PORT), got {self.endpoint!r}"
            )
        devices = _freeze_list(self, "devices")
        if isinstance(devices, str):
            if devices not in ("auto", "cpu"):
                raise ConfigError(f"daemon.devices must be \"auto\", \"cpu\" or a list of devices, got {devices!r}")
        elif isinstance(devices, tuple):
            if not devices:
                raise ConfigError("daemon.devices must not be an empty list")
            for dev in devices:
                if not isinstance(dev, str) or not (dev == "cpu" or dev.startswith("cuda:")):
                    raise ConfigError(f"daemon.devices entries must be \"cpu\" or \"cuda:N\", got {dev!r}")
        else:
            raise ConfigError(f"daemon.devices must be a string or a list, got {devices!r}")
        _check_int("daemon.max_message_bytes", self.max_message_bytes, minimum=1024)
        _check_number("daemon.session_timeout_s", self.session_timeout_s, minimum=0.1)
        _check_number("daemon.session_linger_s", self.session_linger_s, minimum=0.0)
        _check_number("daemon.reap_interval_s", self.reap_interval_s, minimum=0.01)
        _check_number("daemon.shutdown_timeout_s", self.shutdown_timeout_s, minimum=0.0)
        namespaces = _freeze_list(self, "allowed_op_namespaces")
        if not isinstance(namespaces, tuple) or not all(isinstance(n, str) and n.isidentifier() for n in namespaces):
            raise ConfigError(f"daemon.allowed_op_namespaces must be a list of namespace names, got {namespaces!r}")
        if self.compile not in ("auto", "eager", "inductor"):
            raise ConfigError(f"daemon.compile must be \"auto\", \"eager\" or \"inductor\", got {self.compile!r}")
        _check_number("daemon.compile_timeout_s", self.compile_timeout_s, minimum=1.0)
        _check_type("daemon.cache_dir", self.cache_dir, str)
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"daemon.log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"daemon.log_format must be \"text\" or \"json\", got {self.log_format!r}")
        _check_int("daemon.metrics_port", self.metrics_port, minimum=0)
        if self.metrics_port > 65535:
            raise ConfigError(f"daemon.metrics_port must be at most 65535, got {self.metrics_port!r}")
        _check_type("daemon.lanes", self.lanes, bool)
        _check_int("daemon.spin_us", self.spin_us, minimum=0)
        if self.spin_us > 1_000_000:
            raise ConfigError(f"daemon.spin_us must be at most 1000000 (one second), got {self.spin_us!r}")
        if self.doorbell not in ("auto", "on", "off"):
            raise ConfigError(f"daemon.doorbell must be \"auto\", \"on\" or \"off\", got {self.doorbell!r}")


@dataclass(frozen=True)
class Config:
    """The whole file: ``[policy]`` and ``[daemon]``."""

    policy: Policy = field(default_factory=Policy)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)


_TABLES = {"policy": Policy, "daemon": DaemonConfig}


def parse_config(data: Mapping[str, Any]) -> Config:
    """Build a ``Config`` from an already-parsed TOML mapping, rejecting unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"configuration must be a table, got {type(data).__name__}")
    sections: dict[str, Any] = {}
    for table_name, value in data.items():
        cls = _TABLES.get(table_name)
        if cls is None:
            raise ConfigError(f"unknown table [{table_name}] (known: {', '.join(sorted(_TABLES))})")
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{table_name}] must be a table, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in value:
            if key not in known:
                raise ConfigError(
                    f"unknown key {table_name}.{key} = {value[key]!r} (known: {', '.join(sorted(known))})"
                )
        try:
            sections[table_name] = cls(**value)
        except TypeError as exc:  # defensive: dataclass signature mismatch
            raise ConfigError(f"[{table_name}]: {exc}") from None
    return Config(**sections)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate ``config.toml``. Raises ``ConfigError`` (never a bare TOML error)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {os.fspath(path)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{os.fspath(path)}: not valid TOML: {exc}") from None
    return parse_config(data)


def replace_policy(policy: Policy, **changes: Any) -> Policy:
    """A copy of ``policy`` with ``changes`` applied and validated."""
    return dataclasses.replace(policy, **changes)


def _freeze_list(instance: Any, name: str) -> Any:
    """TOML gives lists; frozen dataclasses keep tuples (hashable, immutable). Returns the value."""
    value = getattr(instance, name)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(instance, name, value)
    return value


def _check_type(key: str, value: Any, expected: type) -> None:
    # bool is a subclass of int: reject True where a number is expected and vice versa.
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if expected is not bool and (not isinstance(value, expected) or isinstance(value, bool)):
        raise ConfigError(f"{key} must be a {expected.__name__}, got {value!r}")


def _check_int(key: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key} must be at least {minimum}, got {value!r}")


def _check_number(key: str, value: Any, *, minimum: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key} must be at least {minimum}, got {value!r}")
