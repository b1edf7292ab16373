"""What a replay backend does for the tree manager: mechanism only, no decisions.

The manager decides what to warm up, record, replay, checkpoint and invalidate; a backend
carries it out on one device. Two backends exist: ``cuda`` (real CUDA graphs in one private
pool) and ``cpu-replay`` (re-runs the function into recorded buffers, for CI and GPU-less
machines). Both hand the manager the same kind of facts, so the tree logic is identical.

Invariants every backend keeps:
- ``record`` returns the function's outputs for this call, computed from the inputs given.
- ``replay`` writes the new outputs at exactly the addresses ``record`` reported.
- Copied inputs are copied into buffers owned by the recording; in-place inputs are used as
  given (their addresses are the manager's business).
- ``name`` says honestly what runs: a CPU backend never calls itself CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch


@dataclass
class Recording:
    """A backend's handle on one recorded function: its graph and its input buffers."""

    fn: Callable
    copied_idxs: tuple[int, ...]
    buffers: dict[int, torch.Tensor]  # input index -> buffer the copied input goes into
    graph: Any = None  # torch.cuda.CUDAGraph on the cuda backend
    keep_alive: list = field(default_factory=list)  # cpu: output tensors that are the "pool"
    pool_positions: tuple[int, ...] = ()  # cpu: flat output positions whose memory is pooled


class Backend:
    """Interface; see ``cpu.py`` and ``cuda.py``."""

    name: str
    device: torch.device
    #: Whether outputs returned by ``record`` are allocator-owned tensors the caller may keep
    #: (cuda), or whether the manager must build non-owning aliases over the pool (cpu).
    record_outputs_are_owning: bool

    def warmup(self, fn: Callable, inputs: Sequence[Any], inspector: Optional[Any]) -> Any:
        raise NotImplementedError

    def record(
        self, fn: Callable, inputs: Sequence[Any], copied_idxs: Sequence[int], inspector: Optional[Any]
    ) -> tuple[Recording, Any]:
        raise NotImplementedError

    def is_pool_memory(self, tensor: torch.Tensor) -> bool:
        raise NotImplementedError

    def finish_record(self, recording: Recording, flat_outputs: list, pool_positions: tuple[int, ...]) -> None:
        """Called once the manager knows which flat outputs live in the pool."""

    def replay(self, recording: Recording, inputs: Sequence[Any]) -> None:
        raise NotImplementedError

    def checkpoint_state(self) -> Any:
        return None

    def apply_checkpoint(self, state: Any, live_storage_ptrs: list[int], dead_data_ptrs: list[int]) -> None:
        """Restore the pool to ``state``, give live storages deleters, free dead blocks."""

    def release_recording(self, recording: Recording) -> None:
        """Drop a recording's graph and buffers."""

    def release_stale(self, ref) -> None:
        """An allocator-owned output was invalidated while still referenced: give its block
        back to the pool now (the stale tensor must not free it later). No-op where the
        backend has no pool allocator to keep consistent (CPU replay)."""

    def pool_stats(self) -> dict:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for all work of this backend's device (no-op on CPU)."""

    def close(self) -> None:
        raise NotImplementedError


def dense_buffer_like(value: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """An uninitialized buffer for a copied input, on ``device`` (default: the input's): same
    strides when they are dense and non-overlapping, contiguous otherwise (an expanded input
    cannot be copied into itself)."""
    device = value.device if device is None else device
    if _is_non_overlapping_and_dense(value):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)
    return torch.empty(value.shape, dtype=value.dtype, device=device)


def _is_non_overlapping_and_dense(value: torch.Tensor) -> bool:
    if value.is_contiguous():
        return True
    # Sort dims by stride; dense iff each stride equals the product of the smaller dims' sizes.
    dims = sorted(range(value.dim()), key=lambda d: value.stride(d))
    expected = 1
    for dim in dims:
        if value.size(dim) == 1:
            continue
        if value.stride(dim) != expected:
            return False
        expected *= value.size(dim)
    return True
