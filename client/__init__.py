"""cgtree's client side: ``Client`` talks to cgtreed; ``lowering`` turns models into payloads.

``from cgtree.client import Client`` is the whole API for most users (see ``client.py``);
``torch.compile(model, backend=cgtree.client.backend(client))`` runs compiled graphs in cgtreed.
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
from cgtree.client.compile_backend import backend

__all__ = ["Client", "ClientError", "DaemonError", "DaemonTimeout", "DaemonUnavailable", "GraphHandle",
           "RequestInterrupted", "backend"]
