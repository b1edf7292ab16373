"""Shared tail of every benchmark script: reset graph state between models, format table
cells, write the JSON and markdown reports, and turn failures and missed targets into the
documented exit status (0 ok, 2 a path failed or disagreed with eager, 3 a target missed
under ``--fail-on-target``)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch


def fmt(value: float | None, digits: int = 1) -> str:
    """A table cell: thousands separators, ``-`` for a missing value."""
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def reset_torch_graph_state() -> None:
    """Drop compiled code and PyTorch's own trees between models, so pools do not pile up."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    with contextlib.suppress(Exception):
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def write_reports(report: dict, markdown: str, json_path: Path, md_path: Path) -> None:
    """Write both reports (creating their folders) and print the markdown."""
    for path in (json_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


def exit_status(failed: list[str], missed: list, fail_on_target: bool) -> int:
    if failed:
        print(f"FAILED paths: {', '.join(failed)}", file=sys.stderr)
        return 2
    if missed and fail_on_target:
        print(f"missed {len(missed)} target(s)", file=sys.stderr)
        return 3
    return 0
