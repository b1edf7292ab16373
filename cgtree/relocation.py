"""Homes outside the pool for graph outputs a caller keeps as state
(``TreeManager._relocate_kept_outputs``).

A KV cache that a compiled prefill creates is a graph output, so it lives in the pool; the
caller keeps it across generations, so the manager moves it onto memory of its own before the
path ends. HF's ``generate`` makes a new cache per call, and each is moved again. The decode
steps' recordings read the cache in place and key on its address. A move onto a fresh
allocation lands wherever the allocator says: with the CPU's malloc rarely where the last cache
was, with CUDA's caching allocator usually but not always. Every recording of the previous
cache is then recorded again: on HF Mistral, whose mask gives each decode step a shape (a
recording) of its own, no decode step ever replayed.

Here a move goes back into the home its predecessor at the same input position had, once
nothing else holds that home, so the recordings find the cache where they expect it.

Invariants:
- A home is reused only while this object holds its only reference (``_storage_Use_Count`` 1):
  the caller's previous tensor on it and every view of it are gone, so overwriting is safe.
  Without that function (an older torch) no home is ever reused: every move allocates.
- At most ``HOMES_PER_KEY`` homes per (input position, bytes, device). A move beyond them gets
  a fresh allocation that is not kept.
- A dead tenant's home stays allocated until it is reused or ``clear()`` (the manager's close):
  at most ``HOMES_PER_KEY`` caches' worth per position. PyTorch's trees likewise keep a prefill's
  outputs in their pool.
"""

from __future__ import annotations

from typing import Optional

import torch

HOMES_PER_KEY = 4
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class RelocationHomes:
    """Out-of-pool storages, per input position and size, that kept outputs are moved into."""

    def __init__(self) -> None:
        self._homes: dict[tuple, list[torch.UntypedStorage]] = {}

    def move(self, position: int, tensor: torch.Tensor) -> bool:
        """Move ``tensor`` onto a home with a copy of its bytes (``set_``: the caller's object
        keeps its identity); True when an earlier tenant's home was reused."""
        storage = tensor.untyped_storage()
        key = (position, storage.nbytes(), storage.device)
        homes = self._homes.setdefault(key, [])
        home = self._vacant(homes)
        reused = home is not None
        if home is None:
            home = storage.clone()
            if len(homes) < HOMES_PER_KEY:
                homes.append(home)
        else:
            home.copy_(storage)
        with torch.no_grad():
            tensor.set_(home, tensor.storage_offset(), tensor.size(), tensor.stride())
        return reused

    @staticmethod
    def _vacant(homes: list) -> Optional[torch.UntypedStorage]:
        if _use_count is None:
            return None
        return next((home for home in homes if _use_count(home._cdata) == 1), None)

    def clear(self) -> None:
        self._homes.clear()
