"""cgtree's client side: ``Client`` talks to cgtreed; ``lowering`` turns models into payloads.

``from cgtree.client import Client`` is the whole API for most users (see ``client.py``).
"""

from cgtree.client.client import (
    Client,
    ClientError,
    DaemonError,
    DaemonTimeout,
    DaemonUnavailable,
    GraphHandle,
    RequestInterrupted,
)

__all__ = ["Client", "ClientError", "DaemonError", "DaemonTimeout", "DaemonUnavailable", "GraphHandle",
           "RequestInterrupted"]
