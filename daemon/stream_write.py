"""A 64-bit word written by a CUDA stream when it reaches the write: the driver's stream memory
operation ``cuStreamWriteValue64``, called directly (ctypes, ``libcuda.so.1``).

Why: the doorbell's done word (``cgtree.daemon.doorbell``) is written behind every replayed
plan run. As a one-element ``fill_`` it is a kernel launched through the dispatcher: ~15-20 us
of the daemon's CPU time per run on the H200 host (``benchmarks/submit_stages.py``,
``signal_start -> signalled``). The memop is one driver call, and by default it fences the
stream's earlier writes before its own, which is the ordering the done word needs.

Invariants:
- ``StreamWriter.for_device`` returns a writer only after a write through the driver reached a
  mapped host page (checked once per device and process, with a device synchronize); anything else (no driver library, the
  symbol missing, memops unsupported, an error, the value not arriving) returns None and the
  caller keeps its ``fill_``.
- ``write`` returns False on a driver error (the caller then writes its way); it never raises.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Callable, Optional

import torch

log = logging.getLogger("cgtree.daemon.stream_write")

_DEFAULT_FLAGS = 0  # CU_STREAM_WRITE_VALUE_DEFAULT: a memory fence before the write
_driver_function: Optional[Callable] = None
_driver_looked_up = False
_verified: dict[int, bool] = {}  # device index -> whether a checked write arrived (checked once per process)


def driver_function(name: str, argtypes: list) -> Callable:
    """The CUDA driver's ``name`` (its ``_v2`` where the library has one), returning a CUresult.
    Raises OSError (no driver library) or AttributeError (no such symbol)."""
    library = ctypes.CDLL("libcuda.so.1")
    function = getattr(library, f"{name}_v2", None) or getattr(library, name)
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def _driver_write() -> Optional[Callable]:
    global _driver_function, _driver_looked_up
    if not _driver_looked_up:
        _driver_looked_up = True
        try:
            _driver_function = driver_function("cuStreamWriteValue64",
                                               [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint])
        except (OSError, AttributeError) as exc:
            log.info("no cuStreamWriteValue64 (%s): done words are written by a fill kernel", exc)
    return _driver_function


class StreamWriter:
    """Writes ``value`` at a fixed device-visible address behind the current stream of one device."""

    def __init__(self, function: Callable, device_index: int, address: int) -> None:
        self._function = function
        self._index = device_index
        self._address = address
        self._raw_stream = torch._C._cuda_getCurrentRawStream

    def write(self, value: int) -> bool:
        return self._function(self._raw_stream(self._index), self._address, value, _DEFAULT_FLAGS) == 0

    @classmethod
    def for_device(cls, device_index: int, address: int, read_back: Callable[[], int]) -> Optional["StreamWriter"]:
        """A checked writer for ``address`` (mapped host memory) on ``device_index``, or None."""
        function = _driver_write()
        if function is None or _verified.get(device_index) is False:
            return None
        writer = cls(function, device_index, address)
        if _verified.get(device_index):
            return writer
        _verified[device_index] = False
        marker = 0x5EED_F00D
        try:
            with torch.cuda.device(device_index):
                ok = writer.write(marker)
                torch.cuda.synchronize(device_index)
                arrived = ok and read_back() == marker
                ok = writer.write(0)
                torch.cuda.synchronize(device_index)
        except Exception as exc:  # noqa: BLE001 - an optimization: any failure keeps the fill kernel
            log.info("cuda:%d: stream memory operations unusable (%s): done words by a fill kernel", device_index, exc)
            return None
        if not (arrived and ok and read_back() == 0):
            log.info("cuda:%d: a stream memory write did not reach the page: done words by a fill kernel", device_index)
            return None
        _verified[device_index] = True
        log.info("cuda:%d: done words by stream memory writes (cuStreamWriteValue64)", device_index)
        return writer
