"""Inspecting a function's first run: which inputs it mutates, which ops graphs cannot hold.

A plain callable has no graph to read ahead of time, so the first run of every function
variant (its warmup, or its recording under ``skip_warmup``) goes through a
``TorchDispatchMode`` that watches each ATen op. Later calls pay nothing for it.

Invariants:
- Findings carry the user's source line that issued the op ("Found from"), so skip messages
  point at code the user wrote, not at cgtree or torch internals.
- In ``abort`` mode (inside a capture) an incompatible op raises ``InspectionAbort`` *before*
  it runs, so the capture is abandoned cleanly instead of failing inside CUDA.
- The mode never changes what an op computes.
- Inspecting never imports ``torch._dynamo`` (over a second in a fresh process: the daemon's
  first warmup used to pay it). PyTorch wraps a mode's ``__torch_dispatch__`` in
  ``torch._disable_dynamo``, which imports dynamo on the first call only to build a wrapper
  that keeps dynamo from tracing the mode; dynamo can only trace once it is imported, so the
  ``Inspector`` opts out of that wrapping and applies the same wrapper itself from then on.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cgtree.capturability import incompatible_call

_TORCH_DIR = os.path.dirname(torch.__file__)
_CGTREE_DIR = os.path.dirname(os.path.abspath(__file__))


class InspectionAbort(RuntimeError):
    """Raised inside a capture when an op the graph cannot hold is about to run."""


@dataclass
class Findings:
    """What one inspected run did."""

    mutated_input_idxs: set[int] = field(default_factory=set)
    mutation_origins: list[str] = field(default_factory=list)
    incompatible_op: Optional[str] = None
    incompatible_origin: str = ""


def user_origin() -> str:
    """The innermost stack frames outside torch and cgtree, formatted like a traceback."""
    frames = [
        frame
        for frame in traceback.extract_stack()
        if not frame.filename.startswith((_TORCH_DIR, _CGTREE_DIR)) and "contextlib" not in frame.filename
    ]
    return "".join(traceback.format_list(frames[-1:]))


class Inspector(TorchDispatchMode):
    """Watches ATen ops of one run for input mutation and graph-incompatible ops.

    ``input_storages`` maps the data pointer of each input tensor's storage to its index.
    ``abort_if`` decides, for a finding kind ("incompatible"/"mutation") and input index,
    whether to abort right away (inside a capture) instead of merely recording it.
    """

    def __init__(
        self,
        input_storages: dict[int, int],
        abort_if: Optional[Callable[[str, Optional[int]], bool]] = None,
    ) -> None:
        super().__init__()
        self.input_storages = input_storages
        self.abort_if = abort_if
        self.findings = Findings()

    def watch_inputs(self, inputs) -> None:
        """Watch these tensors (e.g. a recording's input buffers) as the function's inputs."""
        self.input_storages = input_storage_index(inputs)

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no eager torch._disable_dynamo wrapping: see the module docstring

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "torch._dynamo" in sys.modules:  # dynamo may trace from now on: keep it out, as PyTorch would
            return _inspect_without_dynamo()(self, func, args, kwargs)
        return self._inspect(func, args, kwargs)

    def _inspect(self, func, args, kwargs):
        kwargs = kwargs or {}
        self._check_incompatible(func, args, kwargs)
        self._check_mutation(func, args, kwargs)
        return func(*args, **kwargs)

    def _check_incompatible(self, func, args, kwargs) -> None:
        if incompatible_call(func, args, kwargs) is None:  # the rule: cgtree.capturability
            return
        if self.findings.incompatible_op is None:
            self.findings.incompatible_op = str(func)
            self.findings.incompatible_origin = user_origin()
        if self.abort_if is not None and self.abort_if("incompatible", None):
            raise InspectionAbort(f"incompatible op {func}")

    def _check_mutation(self, func, args, kwargs) -> None:
        if not func._schema.is_mutable:
            return
        for position, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            if argument.kwarg_only or position >= len(args):
                value = kwargs.get(argument.name)
            else:
                value = args[position]
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if not isinstance(tensor, torch.Tensor):
                    continue
                idx = self.input_storages.get(tensor.untyped_storage().data_ptr())
                if idx is None or idx in self.findings.mutated_input_idxs:
                    continue
                self.findings.mutated_input_idxs.add(idx)
                self.findings.mutation_origins.append(user_origin())
                if self.abort_if is not None and self.abort_if("mutation", idx):
                    raise InspectionAbort(f"mutated input {idx}")


_INSPECT_WITHOUT_DYNAMO: Optional[Callable] = None


def _inspect_without_dynamo() -> Callable:
    """``Inspector._inspect`` under ``torch._dynamo.disable`` (built once dynamo is imported)."""
    global _INSPECT_WITHOUT_DYNAMO
    if _INSPECT_WITHOUT_DYNAMO is None:
        _INSPECT_WITHOUT_DYNAMO = torch._disable_dynamo(Inspector._inspect, recursive=True)
    return _INSPECT_WITHOUT_DYNAMO


def input_storage_index(inputs) -> dict[int, int]:
    """Data pointer of each tensor input's storage -> input index (first wins for shared storage)."""
    index: dict[int, int] = {}
    for idx, value in enumerate(inputs):
        if isinstance(value, torch.Tensor):
            index.setdefault(value.untyped_storage().data_ptr(), idx)
    return index
