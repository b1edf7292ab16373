"""cgtree: CUDA graph trees as a shared service.

The core library records CUDA graphs of functions, replays them, and keeps every graph of a
tree in one private memory pool per device (see ``cgtree.manager``). It runs in-process on its
own; ``cgtree.daemon`` serves it to other processes and ``cgtree.client`` talks to the daemon.
"""

from cgtree.config import Config, ConfigError, DaemonConfig, Policy, load_config, parse_config

__all__ = ["Config", "ConfigError", "DaemonConfig", "Policy", "load_config", "parse_config"]
__version__ = "0.1.0"
