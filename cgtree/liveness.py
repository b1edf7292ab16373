"""Output liveness: weak references to output storages, aliases over graph memory, overwrites.

A graph's outputs live at fixed addresses of the pool. The manager never holds them strongly:
liveness is "does any tensor of the caller still use this storage", read from a weak
reference to the storage (intrusive weak pointer, no Python object kept alive).

Invariants:
- A ``StorageRef`` never keeps its storage alive; ``alive()`` is exact (C++ refcount), not gc-dependent.
- Tensors returned from a replay sit on fresh *non-owning* storages built over the recorded
  addresses, so dropping them frees nothing and a later replay can hand out new ones; the
  allocator only learns about them at a checkpoint (``cgtree.backends``).
- ``mark_overwritten`` makes later access to a stale output tensor raise where the torch build
  has the binding (CUDA builds); elsewhere it returns False and the caller only counts it.
"""

from __future__ import annotations

from typing import Optional

import torch

_expired = torch.UntypedStorage._expired
_free_weak_ref = torch.UntypedStorage._free_weak_ref
_from_weak_ref = torch.UntypedStorage._new_with_weak_ptr
_construct_storage = torch._C._construct_storage_from_data_pointer
_set_access_error = getattr(torch._C, "_set_storage_access_error_msg", None)
_free_and_remove_deleter = getattr(torch._C, "_free_And_Remove_DeleterFn", None)

CAN_RAISE_ON_OVERWRITTEN_ACCESS = _set_access_error is not None


class StorageRef:
    """A weak reference to one storage, remembering its address."""

    __slots__ = ("_cdata", "data_ptr", "nbytes")

    def __init__(self, storage: torch.UntypedStorage, data_ptr: Optional[int] = None, nbytes: Optional[int] = None) -> None:
        self._cdata: Optional[int] = storage._weak_ref()
        self.data_ptr: int = storage.data_ptr() if data_ptr is None else data_ptr
        self.nbytes: int = storage.nbytes() if nbytes is None else nbytes

    def alive(self) -> bool:
        return self._cdata is not None and not _expired(self._cdata)

    def storage(self) -> Optional[torch.UntypedStorage]:
        """A strong reference to the storage if it is still alive."""
        if not self.alive():
            return None
        return _from_weak_ref(self._cdata)

    def release(self) -> None:
        if self._cdata is not None:
            _free_weak_ref(self._cdata)
            self._cdata = None

    def __del__(self) -> None:  # weak refs are C++ objects: free them, or they leak
        try:
            self.release()
        except Exception:  # interpreter shutdown: torch may be half torn down
            pass


def non_owning_storage(data_ptr: int, nbytes: int, device: torch.device) -> torch.UntypedStorage:
    """A storage over graph-owned memory that frees nothing when it dies."""
    return _construct_storage(data_ptr, device, nbytes)


class TensorGeometry:
    """dtype, size, stride and storage offset of a tensor to rebuild over some storage."""

    __slots__ = ("dtype", "size", "stride", "offset", "metadata")

    def __init__(self, dtype: torch.dtype, size, stride, offset: int, device: torch.device) -> None:
        self.dtype, self.size, self.stride, self.offset = dtype, tuple(size), tuple(stride), offset
        # the dict torch's fast CUDA constructor reads (names as torch's tensor metadata)
        self.metadata = {
            "dtype": dtype,
            "size": self.size,
            "stride": self.stride,
            "storage_offset": offset,
            "device": device,
        }

    @classmethod
    def of(cls, tensor: torch.Tensor, offset: Optional[int] = None) -> "TensorGeometry":
        return cls(
            tensor.dtype,
            tensor.shape,
            tensor.stride(),
            tensor.storage_offset() if offset is None else offset,
            tensor.device,
        )


_construct_cuda_tensor = getattr(torch._C, "_construct_CUDA_Tensor_From_Storage_And_Metadata", None)


def tensor_on(storage: torch.UntypedStorage, geometry) -> torch.Tensor:
    """A tensor over ``storage`` with ``geometry``'s dtype, size, stride and offset."""
    if _construct_cuda_tensor is not None and storage.device.type == "cuda":
        # one C++ call instead of an empty tensor plus set_: this runs on every replay
        return _construct_cuda_tensor(geometry.metadata, storage)
    return torch.empty((0,), dtype=geometry.dtype, device=storage.device).set_(
        storage, geometry.offset, geometry.size, geometry.stride
    )


def mark_overwritten(tensor: torch.Tensor, message: str) -> bool:
    """Make later access to this (stale) output tensor raise ``message``.

    The binding replaces the tensor's storage with one that raises, so it acts on the tensor
    object handed out, not on views the caller made of it. False where the build has no
    binding (CPU builds): the caller still counts the overwrite.
    """
    if _set_access_error is None:
        return False
    _set_access_error(tensor, message)
    return True


def free_owned(ref: StorageRef) -> bool:
    """Return an allocator-owned storage's block to the pool now and disarm its deleter.

    Used when outputs are invalidated: their memory is about to be reused by other graphs,
    so the allocator must see it free, and the stale tensor must not free it a second time.
    """
    if _free_and_remove_deleter is None:
        return False
    storage = ref.storage()
    if storage is None:
        return False
    _free_and_remove_deleter(storage._cdata)
    return True
