"""What a replay backend does for the tree manager: mechanism only, no decisions.

The manager decides what to warm up, record, replay, checkpoint and invalidate; a backend
carries it out on one device. Two backends exist: ``cuda`` (real CUDA graphs in one private
pool) and ``cpu-replay`` (re-runs the function into recorded buffers, for CI and GPU-less
machines). Both hand the manager the same kind of facts, so the tree logic is identical.

Invariants every backend keeps:
- ``record`` returns the function's outputs for this call, computed from the inputs given.
- ``replay`` writes the new outputs at exactly the addresses ``record`` reported.
- Copied inputs are copied into buffers owned by the recording; in-place inputs are used as
  given (their addresses are the manager's business). With ``exact_layout`` a buffer has its
  input's strides, zero strides of expanded dims included (compiled kernels check their
  inputs' strides); only the distinct elements are copied then (``copy_into_buffer``).
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
    expanded: dict[int, tuple[int, ...]] = field(default_factory=dict)  # input index -> its buffer's expanded dims
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
        self, fn: Callable, inputs: Sequence[Any], copied_idxs: Sequence[int], inspector: Optional[Any],
        exact_layout: bool = False,
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


def buffer_for_input(value: torch.Tensor, device: Optional[torch.device] = None, *,
                     exact_layout: bool = False) -> torch.Tensor:
    """An uninitialized buffer for a copied input, on ``device`` (default: the input's): same
    strides when they are dense and non-overlapping; for an expanded input (zero strides),
    with ``exact_layout`` the same strides over storage for its distinct elements (what
    PyTorch's trees do: inductor's code asserts the strides it was compiled for), else
    contiguous (an expanded buffer cannot take a plain ``copy_``: ``copy_into_buffer``)."""
    device = value.device if device is None else device
    if _is_non_overlapping_and_dense(value):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)
    dims = expanded_dims(value)
    if exact_layout and dims and _is_non_overlapping_and_dense(_first_along(value, dims)):
        extent = 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
        storage = torch.empty(extent, dtype=value.dtype, device=device)
        return storage.as_strided(value.shape, value.stride())
    return torch.empty(value.shape, dtype=value.dtype, device=device)


def expanded_dims(value: torch.Tensor) -> tuple[int, ...]:
    """The dims along which ``value`` repeats one slice (stride 0, size above 1)."""
    return tuple(d for d, (size, stride) in enumerate(zip(value.shape, value.stride())) if stride == 0 and size > 1)


def _first_along(value: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    for dim in dims:
        value = value.narrow(dim, 0, 1)
    return value


def copy_into_buffer(buffer: torch.Tensor, value: torch.Tensor, dims: Sequence[int] = ()) -> None:
    """Copy ``value`` into its input buffer; ``dims``: the buffer's expanded dims, along which
    only the first slice is stored and read. ``value`` must repeat that slice there too
    (dynamo's stride guards make sure for compiled graphs); a value that does not is refused
    rather than copied in part."""
    if dims:
        if any(value.stride(dim) != 0 for dim in dims):
            raise ValueError(f"input of shape {tuple(value.shape)} and strides {value.stride()} is not expanded along "
                             f"dims {tuple(dims)} like the input this graph was recorded with")
        buffer, value = _first_along(buffer, dims), _first_along(value, dims)
    buffer.copy_(value)


def copy_inputs(recording: Recording, inputs: Sequence[Any]) -> None:
    """A replay's input copies into ``recording``'s buffers."""
    if recording.expanded:
        for idx, buffer in recording.buffers.items():
            copy_into_buffer(buffer, inputs[idx], recording.expanded.get(idx, ()))
        return
    for idx, buffer in recording.buffers.items():
        buffer.copy_(inputs[idx])


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
