"""cgtreed's commands: one module per command, found and registered automatically.

Every module in this package whose name does not start with ``_`` is a command. It defines:

- ``NAME``: the ``op`` string of the envelope;
- ``NEEDS_SESSION``: whether the client must have said ``hello`` first (else ``no_session``);
- ``execute(ctx: CommandContext, session: Session | None, body: dict, frames: list) -> Reply``;
- a module docstring that *is* the command's protocol specification: first line a summary,
  then ``Request:``, ``Reply:`` and ``Errors:`` paragraphs. ``docs/PROTOCOL.md`` embeds these
  docstrings verbatim (``python -m cgtree.daemon.commands`` prints that section) and a test
  checks that it is in step.

Invariants:
- Handlers never see an unchecked envelope (``protocol.decode_request`` ran first) and raise
  ``ProtocolError`` for anything they refuse; any other exception becomes ``internal`` in the
  dispatcher, which logs the request id. A handler never answers by itself.
- Handlers are mechanism: they call the session registry, the device's graph store and the
  tree manager; decisions with no I/O live in pure functions next to those.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Optional

from cgtree.daemon.protocol import ProtocolError, Reply

if TYPE_CHECKING:  # pragma: no cover
    from cgtree.daemon.graphs import DeviceRuntime
    from cgtree.daemon.sessions import Session, SessionDevice, SessionRegistry

__all__ = ["COMMANDS", "CommandContext", "Reply", "load_commands", "protocol_markdown"]


@dataclass
class CommandContext:
    """What a handler may use: the daemon's devices, sessions, configuration and metrics,
    plus who sent this request. Built by the dispatcher once per request."""

    identity: bytes
    request_id: Any
    config: Any  # cgtree.config.Config currently in force
    devices: dict  # device name -> DeviceRuntime
    sessions: "SessionRegistry"
    metrics: Any
    daemon_info: Callable[[], dict]
    next_buffer_id: Callable[[], int]
    # Re-read the configuration file (the daemon's ``reload``); returns its ``ReloadOutcome``.
    reload: Callable[[], Any] = field(default=lambda: None)
    # Call right before and after a step that may take long (a first call that compiles, a
    # capture): keeps systemd's watchdog fed without pinging on every replay.
    keepalive: Callable[[], None] = field(default=lambda: None)
    # The submit lane's socket path (cgtree.daemon.lane); None when lanes are off.
    lane_path: Optional[str] = None
    # Who sent this request: the peer's uid as the kernel reports it (cgtree.daemon.tenancy;
    # None: unverified), and the daemon's own uid (it and root inspect every session).
    peer_uid: Optional[int] = None
    daemon_uid: int = field(default_factory=os.getuid)
    extras: dict = field(default_factory=dict)

    def device(self, name: Any) -> "DeviceRuntime":
        if not isinstance(name, str) or name not in self.devices:
            raise ProtocolError("unknown_device", f"device {name!r} is not served by this daemon (serving: {', '.join(self.devices)})")
        return self.devices[name]

    def session_device(self, session: "Session", runtime: "DeviceRuntime") -> "SessionDevice":
        """The session's state on ``runtime``'s device, creating its tree manager on first use
        with the policy in force now (SIGHUP: new policies apply to new managers)."""
        from cgtree.daemon.sessions import SessionDevice

        state = session.devices.get(runtime.name)
        if state is None:
            state = SessionDevice(runtime.name, runtime.make_manager(self.config.policy))
            session.devices[runtime.name] = state
        return state


def load_commands() -> dict[str, ModuleType]:
    """Import every command module of this package; checks each has the uniform interface."""
    commands: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        name = getattr(module, "NAME", None)
        execute = getattr(module, "execute", None)
        if not isinstance(name, str) or not callable(execute) or not isinstance(getattr(module, "NEEDS_SESSION", None), bool):
            raise ImportError(f"command module {module.__name__} must define NAME, NEEDS_SESSION and execute()")
        if not (module.__doc__ or "").strip():
            raise ImportError(f"command module {module.__name__} needs a docstring: it is the protocol spec")
        if list(inspect.signature(execute).parameters) != ["ctx", "session", "body", "frames"]:
            raise ImportError(f"{module.__name__}.execute must take (ctx, session, body, frames)")
        if name in commands:
            raise ImportError(f"two command modules are named {name!r}")
        commands[name] = module
    return commands


COMMANDS: dict[str, ModuleType] = load_commands()


def protocol_markdown(commands: dict[str, ModuleType] | None = None) -> str:
    """The commands section of docs/PROTOCOL.md, built from the command docstrings."""
    parts = []
    for name, module in sorted((commands or COMMANDS).items()):
        doc = inspect.cleandoc(module.__doc__ or "")
        session_note = "needs a session (hello first)" if module.NEEDS_SESSION else "no session needed"
        parts.append(f"### `{name}`\n\n_{session_note}_\n\n{doc}\n")
    return "\n".join(parts)
