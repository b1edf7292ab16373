"""What a configuration reload (SIGHUP, or the ``reload`` command) changes: a pure decision
over the running configuration and the one just loaded. The daemon applies the plan.

Invariants:
- The loaded configuration must have gone through the same command-line overrides as the
  running one (``--endpoint``, ``--devices``), so a key the command line fixes never shows
  up as "changed" on every reload.
- Keys bound at start (``RESTART_ONLY``: the endpoint, the devices, the metrics port, the lanes) keep
  their running values in the plan's configuration and are listed in ``needs_restart``:
  a reload never pretends to have applied them.
- Policies apply to tree managers made from now on and to function variants existing
  managers see from now on (``TreeManager.set_policy``): recordings already made stay.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cgtree.config import Config

__all__ = ["RESTART_ONLY", "ReloadPlan", "plan_reload", "changed_keys"]

RESTART_ONLY = ("daemon.endpoint", "daemon.devices", "daemon.metrics_port", "daemon.lanes")


@dataclass(frozen=True)
class ReloadPlan:
    """config: what to run with now. changed: dotted keys whose value differs (applied or not).
    needs_restart: the changed keys that only a restart applies."""

    config: Config
    changed: tuple[str, ...]
    needs_restart: tuple[str, ...]

    @property
    def policy_changed(self) -> bool:
        return any(key.startswith("policy.") for key in self.changed)

    @property
    def logging_changed(self) -> bool:
        return any(key in ("daemon.log_level", "daemon.log_format") for key in self.changed)

    def applies(self, key: str) -> bool:
        return key in self.changed and key not in self.needs_restart


def changed_keys(old: Config, new: Config) -> tuple[str, ...]:
    """Dotted keys (``policy.skip_warmup``, ``daemon.log_level``) whose values differ."""
    keys = []
    for section in ("policy", "daemon"):
        before, after = getattr(old, section), getattr(new, section)
        for field in dataclasses.fields(before):
            if getattr(before, field.name) != getattr(after, field.name):
                keys.append(f"{section}.{field.name}")
    return tuple(keys)


def plan_reload(running: Config, loaded: Config) -> ReloadPlan:
    changed = changed_keys(running, loaded)
    needs_restart = tuple(key for key in changed if key in RESTART_ONLY)
    kept: dict[str, Any] = {key.split(".", 1)[1]: getattr(running.daemon, key.split(".", 1)[1]) for key in RESTART_ONLY}
    config = dataclasses.replace(loaded, daemon=dataclasses.replace(loaded.daemon, **kept))
    return ReloadPlan(config=config, changed=changed, needs_restart=needs_restart)
