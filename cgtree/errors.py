"""Exceptions raised by cgtree's core, and the message given for overwritten outputs."""

from __future__ import annotations


class CgtreeError(RuntimeError):
    """Base class of cgtree's own errors."""


class ManagerClosedError(CgtreeError):
    """The tree manager was closed; its graphs and pool are gone."""


class LaunchVetoed(CgtreeError):
    """A call's launch gate (``TreeManager.launch_gate``) said no: nothing of the call ran and
    the tree is as it was before it."""


OVERWRITTEN_OUTPUT_MESSAGE = (
    "cgtree: accessing an output of graphed function '{function}' (graph node {node}) that has been "
    "overwritten by a subsequent run of the graph tree. An output stays valid only until the next "
    "step (mark_step_begin() or a new top-level call) reuses its memory. To keep it, clone it "
    "before the next call (out = out.clone()), or mark the step only when you are done with it."
)


def overwritten_message(function: str, node: object) -> str:
    """The error text a stale output raises on access (where the backend can make it raise)."""
    return OVERWRITTEN_OUTPUT_MESSAGE.format(function=function, node=node)
