"""The addresses a recording reads in place, checked before every replay.

A recorded graph reads its static inputs (parameters, buffers, KV caches) and tree-managed
inputs where they were at record time, so a replay is valid only while each of them still
has that data pointer. Real models have hundreds of such inputs (a timm ViT-Tiny about 150, a
MobileNetV3 with its batch-norm buffers over 200), and the check runs on every call, in
process and in the daemon, so its cost matters. A Python loop pays about 100 ns per input.
CUDA builds of torch ship the loop in C++ (`torch._C._tensors_data_ptrs_at_indices_equal`,
what PyTorch's own trees call in `check_static_inputs_are_stable`), used here when the
recording has enough inputs to repay building its argument list.

Invariants:
- `first_moved` answers exactly what the Python loop answers: the first position, in
  `positions` order, whose tensor's data pointer differs, or None. The C++ call only says
  "all equal"; when it says otherwise, or cannot take the arguments, the loop decides.
- A build without the C++ function (CPU wheels) runs the loop alone.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

# Present in CUDA builds (torch/csrc/cuda/Module.cpp); absent from CPU wheels.
_ALL_AT_ADDRESSES: Optional[Callable[[list, list, list], bool]] = getattr(
    torch._C, "_tensors_data_ptrs_at_indices_equal", None)

# Below this many inputs the loop is as cheap as building the C++ call's list of inputs.
BATCHED_FROM = 8


class InPlaceInputs:
    """The (input position, data pointer) pairs one recording reads in place."""

    __slots__ = ("pairs", "_positions", "_pointer_at", "_batched")

    def __init__(self, pairs: Sequence[tuple[int, int]] = ()) -> None:
        self.pairs: tuple[tuple[int, int], ...] = tuple(pairs)
        # The C++ function indexes both lists by input position.
        self._positions = [position for position, _ in self.pairs]
        self._pointer_at = [0] * (max(self._positions, default=-1) + 1)
        for position, pointer in self.pairs:
            self._pointer_at[position] = pointer
        self._batched = _ALL_AT_ADDRESSES is not None and len(self.pairs) >= BATCHED_FROM

    def __len__(self) -> int:
        return len(self.pairs)

    def first_moved(self, inputs: Sequence[Any], all_at_addresses: Optional[Callable] = None) -> Optional[int]:
        """The first position whose input is no longer at its recorded address; None when every
        one is. ``all_at_addresses`` replaces the C++ check (tests)."""
        check = all_at_addresses or (_ALL_AT_ADDRESSES if self._batched else None)
        if check is not None:
            try:
                if check(inputs if type(inputs) is list else list(inputs), self._pointer_at, self._positions):
                    return None
            except (TypeError, RuntimeError, IndexError):
                pass  # not a tensor where one was recorded, say: the loop says which
        for position, pointer in self.pairs:
            if inputs[position].data_ptr() != pointer:
                return position
        return None
