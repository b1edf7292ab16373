"""CUDA backend: ``torch.cuda.CUDAGraph`` captures sharing one private memory pool.

Workflow the manager drives:
1. warmup: run the function eagerly on the side stream with every allocation routed to the
   pool, so warmup outputs come from the same memory the graphs use.
2. record: allocate buffers for copied inputs in the pool, copy the inputs in, capture the
   function on the side stream into the pool, replay once to compute this call's outputs,
   then turn the input buffers into non-owning views (their blocks return to the pool; the
   graph keeps using the addresses) and save the allocator's checkpoint state.
3. replay: copy copied inputs into the buffers and replay, on the caller's current stream.
4. checkpoint: before a warmup or recording that follows replays, restore the allocator to
   the current node's post-recording state, hand live replay outputs their deleters and free
   the blocks of outputs that died since.

Invariants:
- One pool and one side stream per backend (per device per manager); an empty "anchor" graph
  captured at start keeps the pool alive between recordings, and ``close`` frees it.
- The private allocator bindings are feature-detected at start; a torch without them fails
  fast with the list of what is missing (tested: torch 2.11 and 2.13).
- Expandable segments change how pool memory is mapped; the checkpoint logic assumes the
  classic allocator, as PyTorch's own graph trees do.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch

from cgtree.backends.base import Backend, Recording, buffer_for_input, copy_inputs, copy_into_buffer, expanded_dims
from cgtree.liveness import TensorGeometry, free_owned, non_owning_storage, tensor_on

_REQUIRED_BINDINGS = (
    "_cuda_getCheckpointState",
    "_cuda_setCheckpointPoolState",
    "_cuda_cudaCachingAllocator_raw_delete",
    "_cuda_endAllocateToPool",
    "_cuda_releasePool",
    "_construct_storage_from_data_pointer",
)


def missing_bindings() -> list[str]:
    """Private allocator bindings this torch lacks (empty when the CUDA backend can run)."""
    missing = [name for name in _REQUIRED_BINDINGS if not hasattr(torch._C, name)]
    if not (
        hasattr(torch._C, "_cuda_beginAllocateCurrentThreadToPool")
        or hasattr(torch._C, "_cuda_beginAllocateCurrentStreamToPool")
    ):
        missing.append("_cuda_beginAllocateCurrentThreadToPool")
    return missing


def _clear_cublas_workspaces() -> None:
    """cuBLAS keeps a workspace per (handle, stream), allocated on first use. First used inside
    the pool, it would pin a pool block forever (the pool could never be released): drop the
    cached workspaces before and after pool work, as PyTorch's trees do."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def _begin_allocate_to_pool(device_index: int, pool) -> None:
    begin = getattr(torch._C, "_cuda_beginAllocateCurrentThreadToPool", None)
    if begin is None:  # older spelling: route the current stream instead of the thread
        begin = torch._C._cuda_beginAllocateCurrentStreamToPool
    begin(device_index, pool)


class CudaGraphBackend(Backend):
    name = "cuda"
    record_outputs_are_owning = True

    def __init__(self, device: torch.device | str) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the cuda backend needs a cuda device, got {device}")
        if not torch.cuda.is_available():
            raise RuntimeError("the cuda backend needs CUDA, and torch.cuda.is_available() is False")
        missing = missing_bindings()
        if missing:
            raise RuntimeError(
                f"torch {torch.__version__} lacks allocator bindings cgtree needs: {', '.join(missing)} "
                "(tested with torch 2.11 and 2.13)"
            )
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.index = self.device.index
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(self.device)
        self._recordings: list[Recording] = []
        # The pool lives while a graph captured into it lives: capture an empty graph to hold it.
        self._anchor: Optional[torch.cuda.CUDAGraph] = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self._anchor.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            self._anchor.capture_end()

    # -- warmup ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _allocating_in_pool(self):
        """Run on the side stream with every allocation of this thread going to the pool."""
        torch.cuda.synchronize(self.device)
        _clear_cublas_workspaces()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            _begin_allocate_to_pool(self.index, self.pool)
            try:
                yield
            finally:
                torch._C._cuda_endAllocateToPool(self.index, self.pool)
                torch._C._cuda_releasePool(self.index, self.pool)
                torch.cuda.synchronize(self.device)
                _clear_cublas_workspaces()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def warmup(self, fn: Callable, inputs: Sequence[Any], inspector: Optional[Any]) -> Any:
        with self._allocating_in_pool(), inspector if inspector is not None else contextlib.nullcontext():
            return fn(*inputs)

    # -- record ---------------------------------------------------------------------------
    def record(
        self, fn: Callable, inputs: Sequence[Any], copied_idxs: Sequence[int], inspector: Optional[Any],
        exact_layout: bool = False,
    ) -> tuple[Recording, Any]:
        graph_inputs = list(inputs)
        owning_buffers, expanded = {}, {}
        with self._allocating_in_pool():
            for idx in copied_idxs:
                buffer = buffer_for_input(inputs[idx], self.device, exact_layout=exact_layout)  # a CPU scalar's too
                expanded_along = expanded_dims(buffer)
                copy_into_buffer(buffer, inputs[idx], expanded_along)
                owning_buffers[idx] = buffer
                if expanded_along:
                    expanded[idx] = expanded_along
                graph_inputs[idx] = buffer
        if inspector is not None:
            inspector.watch_inputs(graph_inputs)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        _clear_cublas_workspaces()
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                with inspector if inspector is not None else contextlib.nullcontext():
                    outputs = fn(*graph_inputs)
            except BaseException:
                with contextlib.suppress(Exception):
                    graph.capture_end()
                _clear_cublas_workspaces()
                raise
            graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        graph.replay()
        torch.cuda.synchronize(self.device)
        _clear_cublas_workspaces()
        # Keep the buffers' addresses for the graph but give their blocks back to the pool:
        # later recordings may reuse them, which is safe because a buffer is only read while
        # its own graph runs.
        buffers = {idx: self._non_owning_view(buf) for idx, buf in owning_buffers.items()}
        del owning_buffers, graph_inputs
        recording = Recording(fn=fn, copied_idxs=tuple(copied_idxs), buffers=buffers, graph=graph, expanded=expanded)
        self._recordings.append(recording)
        return recording, outputs

    def _non_owning_view(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        alias = non_owning_storage(storage.data_ptr(), storage.nbytes(), self.device)
        return tensor_on(alias, TensorGeometry.of(tensor))

    def is_pool_memory(self, tensor: torch.Tensor) -> bool:
        ptr = tensor.untyped_storage().data_ptr()
        for segment in self._pool_segments():
            if segment["address"] <= ptr < segment["address"] + segment["total_size"]:
                return True
        return False

    # -- replay ---------------------------------------------------------------------------
    def replay(self, recording: Recording, inputs: Sequence[Any]) -> None:
        copy_inputs(recording, inputs)
        recording.graph.replay()

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_state(self) -> Any:
        return torch._C._cuda_getCheckpointState(self.index, self.pool)

    def apply_checkpoint(self, state: Any, live_storage_ptrs: list[int], dead_data_ptrs: list[int]) -> None:
        torch.cuda.synchronize(self.device)
        torch._C._cuda_setCheckpointPoolState(self.index, state, [], live_storage_ptrs)
        for ptr in dict.fromkeys(dead_data_ptrs):  # aliased outputs share a block: free once
            torch._C._cuda_cudaCachingAllocator_raw_delete(ptr)

    # -- bookkeeping ----------------------------------------------------------------------
    def _pool_segments(self) -> list[dict]:
        return [
            segment
            for segment in torch.cuda.memory_snapshot()
            if tuple(segment.get("segment_pool_id", (0, 0))) == tuple(self.pool)
            and segment.get("device", self.index) == self.index
        ]

    def pool_stats(self) -> dict:
        segments = self._pool_segments()
        live_blocks = sum(
            1 for segment in segments for block in segment["blocks"] if block["state"] == "active_allocated"
        )
        return {
            "bytes": sum(segment["total_size"] for segment in segments),
            "segments": len(segments),
            "allocator_live_blocks": live_blocks,
        }

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def release_stale(self, ref) -> None:
        free_owned(ref)

    def release_recording(self, recording: Recording) -> None:
        recording.graph = None
        recording.buffers = {}
        with contextlib.suppress(ValueError):
            self._recordings.remove(recording)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        for recording in list(self._recordings):
            self.release_recording(recording)
        self._anchor = None
        _clear_cublas_workspaces()
        # Blocks of a released pool are only returned to the driver by empty_cache.
        torch.cuda.empty_cache()
