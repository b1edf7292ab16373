"""Re-read the daemon's configuration file, as SIGHUP does, for callers without permission to
signal the daemon (``cgtreectl reload``). Anyone who can connect may ask; the file itself stays
as writable as the operator made it, so this only re-reads what the operator wrote.

Request: ``{}``.

Reply: ``{"reloaded": true, "config_path": str, "changed": [str], "needs_restart": [str]}``.
``changed`` lists the dotted keys whose values differ from the running configuration
(``policy.skip_warmup``, ``daemon.log_level``); policies apply to recordings made from now on,
the log level and format at once. ``needs_restart`` lists the changed keys that only a restart
applies (``daemon.endpoint``, ``daemon.devices``, ``daemon.metrics_port``, ``daemon.lanes``); they keep their
running values until then.

Errors: ``reload_failed`` (the file is invalid, with the key and value named, or unreadable,
or the daemon was started without ``--config``; the running configuration is kept).
"""

from __future__ import annotations

from cgtree.daemon.protocol import ProtocolError, Reply

NAME = "reload"
NEEDS_SESSION = False


def execute(ctx, session, body, frames) -> Reply:
    outcome = ctx.reload()
    if not outcome.applied:
        raise ProtocolError("reload_failed", f"{outcome.error}; the running configuration is kept")
    return Reply({"reloaded": True, "config_path": outcome.config_path,
                  "changed": list(outcome.changed), "needs_restart": list(outcome.needs_restart)})
