"""cgtree's client side: ``Client`` talks to cgtreed; ``lowering`` turns models into payloads.

``from cgtree.client import Client`` is the whole API for most users (see ``client.py``);
``torch.compile(model, backend=cgtree.client.backend(client))`` runs compiled graphs in cgtreed.
"""

from cgtree.client.client import Client, GraphHandle
from cgtree.client.errors import ClientError, DaemonError, DaemonTimeout, DaemonUnavailable, RequestInterrupted

__all__ = ["Client", "ClientError", "DaemonError", "DaemonTimeout", "DaemonUnavailable", "GraphHandle",
           "RequestInterrupted", "backend"]


def __getattr__(name: str):
    # Imported on first use: the compile backend pulls in dynamo (~1.3 s), which a client that
    # only submits never needs (its cold start is part of the product).
    if name == "backend":
        from cgtree.client.compile_backend import backend

        return backend
    raise AttributeError(f"module 'cgtree.client' has no attribute {name!r}")
