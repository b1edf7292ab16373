"""CPU replay backend: the tree logic of CUDA graph trees, exercised without CUDA.

"Recording" runs the function once on buffers for its copied inputs and keeps its outputs as
the recording's static output memory; "replay" copies new inputs into the buffers, runs the
function again and writes the results into that same memory. So outputs of a replay live at
the recorded addresses and a later replay overwrites them, exactly as with a CUDA graph.

Invariants:
- ``name`` is "cpu-replay": status and logs never present this as CUDA.
- Random numbers come from the global CPU generator on every run, so replays draw what eager
  would after the same seed.
- The allocator bookkeeping CUDA needs (checkpoints) has no counterpart here: those calls are
  counted by the manager and are no-ops in this backend.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten

from cgtree.backends.base import Backend, Recording, buffer_for_input, copy_inputs, copy_into_buffer, expanded_dims


class CpuReplayBackend(Backend):
    name = "cpu-replay"
    record_outputs_are_owning = False

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise ValueError(f"the cpu-replay backend runs on cpu, not {self.device}")
        self._recordings: list[Recording] = []

    def warmup(self, fn: Callable, inputs: Sequence[Any], inspector: Optional[Any]) -> Any:
        with inspector if inspector is not None else contextlib.nullcontext():
            return fn(*inputs)

    def record(
        self, fn: Callable, inputs: Sequence[Any], copied_idxs: Sequence[int], inspector: Optional[Any],
        exact_layout: bool = False,
    ) -> tuple[Recording, Any]:
        buffers, expanded = {}, {}
        graph_inputs = list(inputs)
        for idx in copied_idxs:
            buffer = buffer_for_input(inputs[idx], exact_layout=exact_layout)
            expanded_along = expanded_dims(buffer)
            copy_into_buffer(buffer, inputs[idx], expanded_along)
            buffers[idx] = buffer
            if expanded_along:
                expanded[idx] = expanded_along
            graph_inputs[idx] = buffer
        if inspector is not None:
            inspector.watch_inputs(graph_inputs)
        with inspector if inspector is not None else contextlib.nullcontext():
            outputs = fn(*graph_inputs)
        recording = Recording(fn=fn, copied_idxs=tuple(copied_idxs), buffers=buffers, expanded=expanded)
        self._recordings.append(recording)
        return recording, outputs

    def is_pool_memory(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu"

    def finish_record(self, recording: Recording, flat_outputs: list, pool_positions: tuple[int, ...]) -> None:
        # The recorded outputs are this recording's "graph memory": keep them for replays.
        recording.keep_alive = [flat_outputs[pos] for pos in pool_positions]
        recording.pool_positions = pool_positions

    def replay(self, recording: Recording, inputs: Sequence[Any]) -> None:
        copy_inputs(recording, inputs)
        graph_inputs = list(inputs)
        for idx, buffer in recording.buffers.items():
            graph_inputs[idx] = buffer
        fresh, _ = tree_flatten(recording.fn(*graph_inputs))
        for target, pos in zip(recording.keep_alive, recording.pool_positions):
            if target.data_ptr() != fresh[pos].data_ptr():
                target.copy_(fresh[pos])

    def release_recording(self, recording: Recording) -> None:
        recording.keep_alive = []
        recording.buffers = {}
        with contextlib.suppress(ValueError):
            self._recordings.remove(recording)

    def pool_stats(self) -> dict:
        total = 0
        seen: set[int] = set()
        for recording in self._recordings:
            for tensor in list(recording.keep_alive) + list(recording.buffers.values()):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return {"bytes": total, "segments": len(seen), "allocator_live_blocks": None}

    def close(self) -> None:
        for recording in list(self._recordings):
            self.release_recording(recording)
