"""Small named types shared by the tree manager, its backends and the daemon.

Invariants:
- ``GraphId`` numbers recorded nodes of one manager in recording order, from 0, never reused.
- ``FunctionId`` numbers function variants (one per distinct input shape key) of one manager.
- ``Execution`` describes exactly one call: what ran (warmup, recorded, replayed or skipped),
  on which node, and why it was skipped. It is plain data and JSON-friendly via ``as_dict``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType, Optional

GraphId = NewType("GraphId", int)
FunctionId = NewType("FunctionId", int)


class ExecutionMode(str, enum.Enum):
    """What one call did."""

    WARMUP = "warmup"  # ran eagerly inside the pool (first call of a function, or on a warmup path)
    RECORDED = "recorded"  # captured a new graph, then replayed it once for this call's result
    REPLAYED = "replayed"  # replayed an existing graph
    SKIPPED = "skipped"  # ran eagerly outside graphs because of a skip reason


class FunctionKind(str, enum.Enum):
    """How a function takes part in generations (PyTorch: CompilationMode)."""

    INFERENCE = "inference"
    FORWARD = "forward"  # its backward is still to come: the generation may not end before it
    BACKWARD = "backward"  # completes the pending forward


class PathState(str, enum.Enum):
    """What the current path of the tree is doing (PyTorch: ExecutionState)."""

    NONE = "none"  # no current path: the next call starts from the roots
    WARMUP = "warmup"  # the path holds warmup runs; everything after them on the path warms up too
    RECORDING = "recording"  # the last step of the path was a new recording
    EXECUTION = "execution"  # the path so far was replayed


@dataclass(frozen=True)
class Execution:
    """The outcome of one call through a graphed function."""

    mode: ExecutionMode
    function: str
    node_id: Optional[int] = None
    skip_reason: Optional[str] = None

    def as_dict(self) -> dict:
        return {
            "mode": self.mode.value,
            "function": self.function,
            "node_id": self.node_id,
            "skip_reason": self.skip_reason,
        }
