#!/usr/bin/env python3
"""Print what a GPU host offers cgtree: Python, torch, the GPU, the private allocator bindings
CUDA graph trees rely on, and the Python packages cgtree needs.

Used by scripts/gpu_check.sh before the tests, so that a failing run shows at once whether
the environment (not the code) is what differs. Exits 1 when torch is missing or sees no GPU,
or when a package cgtree needs at run time cannot be imported; a missing binding is only
reported, since cgtree feature-detects them.
"""

from __future__ import annotations

import importlib
import platform
import sys

# Private torch._C bindings of the CUDA caching allocator that graph trees use (checkpointing
# the pool, freeing dead outputs, poisoning overwritten storages). CUDA builds only; some
# changed between releases: the last two are absent in torch 2.11 (shared/NOTES.md, section 3).
ALLOCATOR_BINDINGS = (
    "_cuda_getCheckpointState",
    "_cuda_setCheckpointPoolState",
    "_set_storage_access_error_msg",
    "_free_And_Remove_DeleterFn",
    "_construct_storage_from_data_pointer",
    "_cuda_cudaCachingAllocator_raw_delete",
    "_cuda_checkPoolLiveAllocations",
    "_cuda_cudaCachingAllocator_is_enabled",
    "_clear_storage_data_ptr_access_error_msg",
)

# Imported by cgtree at run time (pyproject dependencies), then what the tests and metrics use.
REQUIRED_MODULES = ("torch", "zmq", "msgpack", "psutil")
OPTIONAL_MODULES = ("prometheus_client", "pytest", "pytest_timeout", "triton")


def describe_module(name: str) -> tuple[bool, str]:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        return False, f"NOT IMPORTABLE ({exc})"
    version = getattr(module, "__version__", None) or getattr(module, "VERSION", "?")
    return True, f"{version}  ({getattr(module, '__file__', '?')})"


def main() -> int:
    ok = True
    print(f"python {platform.python_version()} ({sys.executable})")
    for name in REQUIRED_MODULES + OPTIONAL_MODULES:
        found, text = describe_module(name)
        print(f"  {name}: {text}")
        ok &= found or name in OPTIONAL_MODULES
    try:
        import torch
    except ImportError:
        return 1

    print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}")
    print(f"  cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(
                f"  cuda:{index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs"
            )
    else:
        ok = False
    print("allocator bindings (torch._C):")
    for name in ALLOCATOR_BINDINGS:
        print(f"  {name}: {'present' if hasattr(torch._C, name) else 'MISSING'}")

    try:
        import cgtree

        print(f"cgtree {getattr(cgtree, '__version__', '?')} from {cgtree.__file__}")
    except ImportError as exc:
        print(f"cgtree: NOT IMPORTABLE ({exc})")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
