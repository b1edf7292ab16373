"""cgtree: CUDA graph trees as a shared service.

The core library records CUDA graphs of functions, replays them, and keeps every graph of a
tree in one private memory pool per device (see ``cgtree.manager``). It runs in-process on its
own; ``cgtree.daemon`` serves it to other processes and ``cgtree.client`` talks to the daemon.
"""

from cgtree.config import Config, ConfigError, DaemonConfig, Policy, load_config, parse_config

__all__ = ["Config", "ConfigError", "DaemonConfig", "Policy", "TreeManager", "load_config", "parse_config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily: the manager pulls in torch, which cgtreectl and the config tools never need.
    if name == "TreeManager":
        from cgtree.manager import TreeManager

        return TreeManager
    raise AttributeError(f"module 'cgtree' has no attribute {name!r}")
