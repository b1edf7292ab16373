"""Run an operator call inside Python frames that sit at the user's own source lines.

Skip messages ("skipping cudagraphs due to mutated inputs (1 instances). Found from ...") must
point at the line the user wrote (``x.add_(2)``), not at generated graph code. cgtree's
inspector finds that line by walking the Python stack for the innermost frame outside torch
and cgtree. A graph traced by dynamo has no such frame at run time, but each of its nodes
remembers the user's stack in ``node.meta["stack_trace"]``. ``located_call`` rebuilds that
stack: it returns a function that calls the operator through one tiny frame per remembered
user frame, each frame's code object reporting the user's file, line and function name. The
stack then reads exactly as it did when the user's code issued the op.

Invariants:
- Only code objects compiled here from a fixed template are relocated (``code.replace``); no
  user text is ever compiled or executed.
- A located call computes exactly what the wrapped callable computes, with the same arguments.
- The template's call spans the whole line (columns 0 to far beyond any real line), so
  tracebacks print the user's line without misleading caret markers under part of it.
- Stack traces that cannot be parsed give no frames: the operator is then called directly.
"""

from __future__ import annotations

import re
import types
from typing import Any, Callable, Optional, Sequence

# "  File "<path>", line <n>, in <name>" as traceback.format_list writes it.
_FRAME_LINE = re.compile(r'^\s*File "(?P<file>.+)", line (?P<line>\d+), in (?P<name>.+?)\s*$')

# One call on one line, padded inside the parentheses so that its column range covers any
# source line it is relocated onto. The lambda's first line is line 2 of this source.
_TEMPLATE_SOURCE = (
    "def _make(call):\n"
    "    return lambda *args, **kwargs: (\n"
    "call(*args, **kwargs" + " " * 400 + "))\n"
)
_CALL_LINE_OFFSET = 1  # the call sits one line below the lambda's first line


def _template_code() -> types.CodeType:
    module = compile(_TEMPLATE_SOURCE, "<cgtree.user_frames>", "exec")
    make = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    return next(c for c in make.co_consts if isinstance(c, types.CodeType))


_TEMPLATE = _template_code()


def parse_stack_trace(stack_trace: Optional[str]) -> list[tuple[str, int, str]]:
    """(file, line, function) of each frame in a ``node.meta["stack_trace"]`` text, outermost first."""
    frames = []
    for text in (stack_trace or "").splitlines():
        match = _FRAME_LINE.match(text)
        if match:
            frames.append((match["file"], int(match["line"]), match["name"]))
    return frames


def _frame_function(call: Callable, file: str, line: int, name: str) -> Callable:
    """A function whose one frame reports (file, line, name) and which calls ``call``."""
    fields = {"co_filename": file, "co_name": name, "co_firstlineno": max(line - _CALL_LINE_OFFSET, 1)}
    if hasattr(_TEMPLATE, "co_qualname"):  # Python 3.11+
        fields["co_qualname"] = name
    code = _TEMPLATE.replace(**fields)
    # The globals' __name__ is what module-aware tools (fx codegen, logging) read.
    function = types.FunctionType(code, {"__name__": __name__}, name, None, (types.CellType(call),))
    function.__qualname__ = name
    return function


def located_call(fn: Callable, frames: Sequence[tuple[str, int, str]]) -> Callable:
    """``fn`` called through frames at ``frames`` (outermost first); ``fn`` itself without frames."""
    call = fn
    for file, line, name in reversed(list(frames)):
        call = _frame_function(call, file, line, name)
    if call is not fn:
        call.__name__ = getattr(fn, "__name__", "call").replace(".", "_")
        call.__wrapped_op__ = fn  # what it calls, for readers of the graph
    return call


def function_at(fn: Callable[..., Any], frame: tuple[str, int, str]) -> Callable[..., Any]:
    """``fn`` behind one frame at ``frame``: a plain function whose ``__code__`` names the
    user's file, line and function (what cgtree reports as a graphed function's origin)."""
    file, line, name = frame
    return _frame_function(fn, file, line, name)
