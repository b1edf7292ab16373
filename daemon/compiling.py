"""What cgtreed compiles, and how a compiled graph is kept on disk: ``daemon.compile`` =
``"inductor"`` (``"auto"``: on CUDA devices) compiles a decoded graph once, into a callable the
tree manager records like any other.

Why at registration and not lazily (``torch.compile``): the tree manager's first call of a
function runs under its inspection mode (a ``TorchDispatchMode``, ``cgtree.inspection``), and
dynamo does not compile under an active dispatch mode: a lazily compiled graph ran, and was
recorded, as plain ATen kernels (docs/PERFORMANCE.md section 8).

Policy (``eager_reason``, ``resolve_compile_mode``: pure): a graph runs its ATen code instead
when it has symbolic shapes (a compile per shape is inductor's business under dynamo; the
daemon does not guess the ranges) or holds an op a graph cannot hold (inductor's kernels would
hide it from inspection, and the tree must see it to skip the graph with its reason).

Mechanism: inductor's ``standalone_compile`` (its precompilation API) turns the decoded module,
with empty weights and inputs of the graph's specs, into an *artifact*: a file under
``artifact_dir()`` named after the graph id, the device and torch's version. A compile worker
process writes it (``cgtree.daemon.compile_worker``: the serving loop never compiles) and the
daemon loads it (``load_artifact``: tenths of a second); a restarted daemon finds the file and
loads it without compiling (warm restart). ``compile_artifact`` runs in the worker, or in the
daemon itself where no worker is used (``DeviceGraphs`` built without one: direct tests).

Invariants:
- The decoded module is never changed: it stays the ATen function of the graph, which a submit
  whose graph writes a CPU input runs instead (those writes land in a copy the daemon sends
  back; the tree must see them op by op, and compiled kernels would hide them).
- Nothing here executes the graph; compiling traces it with fake tensors.
- Inductor compiles a copy whose views may copy (``views_as_reshapes``): the lowering chose
  ``view`` for the strides eager gives, and inductor's decompositions may give an intermediate
  other strides (its ``cat`` of an empty cache and a transposed key is a clone that keeps the
  transposition), where that ``view`` is refused and the whole graph fell back to ATen code (HF
  bloom, every call). A ``reshape`` is that same view wherever the view is possible.
- Artifacts hold pickled code (inductor's cache format): they are written by the daemon's own
  worker only, into a directory of the daemon user's, mode 0700, and never read from a
  directory another user can write (``artifact_dir`` refuses it).
- A compile or a load that fails is logged and the graph keeps its ATen code: registration
  never fails for it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import operator
import os
import stat
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from cgtree import graph_facts
from cgtree.payload import DTYPES

log = logging.getLogger("cgtree.daemon.compiling")

COMPILE_MODES = ("auto", "eager", "inductor")
# Bumped when what goes into an artifact changes (options, calling convention): old files are
# then simply not found.
ARTIFACT_FORMAT = 1
# Inductor's own CUDA graphs stay off: cgtree records the graphs.
INDUCTOR_OPTIONS = {"config_patches": {"triton.cudagraphs": False}}


def resolve_compile_mode(mode: str, device: torch.device) -> str:
    """``daemon.compile`` for one device: ``"auto"`` is inductor on CUDA devices (what
    reduce-overhead runs) and ATen on the CPU replay backend, where an inductor compile costs
    5-10x an ATen warmup in C++ compilation (``cgtree.compile.resolve_compiler`` has the
    figures)."""
    if mode != "auto":
        return mode
    return "inductor" if device.type == "cuda" else "eager"


def eager_reason(decoded: Any, module: Optional[torch.fx.GraphModule] = None) -> Optional[str]:
    """Why ``decoded`` runs as ATen code rather than compiled; None when it can be compiled.
    ``module``: a copy of its module whose nodes carry fake values (``compile_decision``
    makes one), so that ops are judged by ``cgtree.capturability``'s value rule; without values a
    tagged op (an integer gather too) counts as incompatible."""
    if has_symbolic_shapes(decoded):
        return "it has symbolic shapes"
    if graph_facts.incompatible_nodes(decoded.module if module is None else module):
        return "it holds an op a CUDA graph cannot hold"
    return None


def has_symbolic_shapes(decoded: Any) -> bool:
    specs = getattr(decoded, "input_specs", None)
    return getattr(decoded, "dynamic", False) or specs is None or any(dim is None for spec in specs for dim in spec.shape)


def example_inputs(decoded: Any, device: torch.device) -> list[torch.Tensor]:
    """Uninitialized weights and inputs of ``decoded``'s specs (weights are stored contiguous
    on the device, as ``DeviceGraphs`` materializes them): compiling reads only their metadata."""
    weights = [torch.empty(tuple(spec.shape), dtype=DTYPES[spec.dtype], device=device) for spec in _weight_specs(decoded)]
    return [*weights, *_user_inputs(decoded, device)]


def _user_inputs(decoded: Any, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(spec.shape, dtype=DTYPES[spec.dtype], device=device) for spec in decoded.input_specs]


def _weight_specs(decoded: Any) -> list:
    by_hash = {spec.hash: spec for spec in decoded.weight_specs}
    return [by_hash[h] for h in decoded.weight_hashes]


def compile_decision(decoded: Any, weights: Sequence[torch.Tensor], device: torch.device) -> Optional[str]:
    """``eager_reason`` judged on fake values of the graph's weights and input specs (on a
    copy: the decoded module stays clean for inductor and for the ATen path)."""
    if has_symbolic_shapes(decoded):
        return eager_reason(decoded)
    judged = copy.deepcopy(decoded.module)
    graph_facts.propagate_fake_values(judged, [*weights, *_user_inputs(decoded, device)])
    return eager_reason(decoded, judged)


# ---------------------------------------------------------------------------------------------
# Artifacts


def artifact_dir() -> Path:
    """Where compiled graphs are kept: ``cgtree-graphs`` in inductor's cache directory
    (``TORCHINDUCTOR_CACHE_DIR``, which ``daemon.cache_dir`` and the systemd unit set), so the
    artifacts live and go with the kernels they use. Created mode 0700; refused when another
    user owns it or may write to it (its files are loaded as code)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    path = Path(cache_dir()) / "cgtree-graphs"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path} is not private to this user (owner uid {info.st_uid}, mode {oct(info.st_mode & 0o777)}): "
                              "compiled graphs are not read from or written to it")
    return path


def artifact_name(graph_id: str, device: torch.device) -> str:
    """The file of ``graph_id`` compiled for ``device``: the generated code names the device
    index and the kernels its architecture, and an artifact only loads in the torch that wrote it."""
    where = str(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where += f"-sm{major}{minor}"
    build = hashlib.sha256(f"{torch.__version__}|{torch.version.cuda}|{ARTIFACT_FORMAT}".encode()).hexdigest()[:12]
    return f"{graph_id}.{where.replace(':', '')}.{build}.bin"


def compile_artifact(decoded: Any, device: torch.device, path: Path, examples: Optional[list] = None) -> float:
    """Compile ``decoded`` for ``device`` with inductor and save it at ``path`` (atomically);
    seconds taken. Raises what inductor raises (no C++ compiler, an op it lacks)."""
    from torch._inductor import standalone_compile

    started = time.perf_counter()
    examples = example_inputs(decoded, device) if examples is None else examples
    artifact = standalone_compile(views_as_reshapes(decoded.module), examples, dynamic_shapes="from_example_inputs", options=INDUCTOR_OPTIONS)
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    artifact.save(path=str(partial), format="binary")
    os.replace(partial, path)
    return time.perf_counter() - started


# Ops that check, at trace time, that their input's strides allow the view (the lowering saw
# eager's strides; inductor's trace may see others).
_STRICT_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def views_as_reshapes(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``module`` whose strict views are ``aten.reshape``: the same view wherever the
    strides allow it (then nothing changes), a copy where inductor's layout of the input does not
    (where the view would refuse to compile). Inductor does the same to its own graphs after
    tracing (its post-grad ``view_to_reshape``); this graph is traced again first, so it is done
    before. A view of memory an in-place op writes (``copy_`` into an input, through any chain
    of views) stays a view: a copy would part it from that write (then the compile fails as
    before and the ATen code runs)."""
    copied = copy.deepcopy(module)
    written = {_view_root(node) for node in _written_nodes(copied.graph)}
    for node in copied.graph.nodes:
        if node.op == "call_function" and node.target in _STRICT_VIEWS and _view_root(node) not in written:
            node.target = torch.ops.aten.reshape.default
    copied.recompile()
    return copied


def _is_view(node: torch.fx.Node) -> bool:
    """Whether ``node`` shares its first argument's memory (``_unsafe_view`` does too, though its
    schema does not say so)."""
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and (node.target.is_view or node.target in _STRICT_VIEWS)
            and bool(node.args) and isinstance(node.args[0], torch.fx.Node))


def _view_root(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor whose memory ``node`` is a view of (``node`` itself when it is no view); an
    item of a view op's list (``split``, ``unbind``) is a view of that op's input."""
    while True:
        if _is_view(node):
            node = node.args[0]
        elif (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node)
              and _is_view(node.args[0])):
            node = node.args[0].args[0]
        else:
            return node


def _written_nodes(graph: torch.fx.Graph) -> list:
    """Nodes an in-place op writes into (``copy_``'s destination, an ``out=``)."""
    written = []
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if not schema.is_mutable:
            continue
        bound = dict(zip((a.name for a in schema.arguments), node.args)) | dict(node.kwargs)
        written += [bound[a.name] for a in schema.arguments
                    if a.alias_info is not None and a.alias_info.is_write and isinstance(bound.get(a.name), torch.fx.Node)]
    return written


def load_artifact(path: Path) -> Callable:
    """The compiled function saved at ``path``: ``(*weights, *inputs) -> tuple``. Its kernels
    are loaded in this process, one after the other (``compile_threads = 1``): they are cache
    hits, and a pool of compile subprocesses would cost seconds to start for nothing."""
    from torch._inductor import CompiledArtifact
    from torch._inductor import config as inductor_config

    with inductor_config.patch(compile_threads=1):
        artifact = CompiledArtifact.load(path=str(path), format="binary")

    def compiled(*args: Any) -> tuple:
        return tuple(artifact(*args))

    return compiled


def in_compiled_layout(compiled: Callable, aten: Callable, num_weights: int, in_place: Sequence[int]) -> Callable:
    """``compiled`` (an artifact's function, which asserts the contiguous strides of the specs it
    was compiled for) callable with inputs of any layout, as its ATen code is: a CUDA input
    comes with its client's strides (a transposed or channels-last tensor). Inputs are made
    contiguous first; an input the graph writes in place cannot be (the write must land in the
    client's memory), so a non-contiguous one runs ``aten`` instead. Costs nothing per replay:
    a CUDA graph's replay does not run Python (the copy, if any, is in the recorded graph)."""
    written = {num_weights + i for i in in_place}

    def call(*args: Any) -> Any:
        if any(isinstance(args[i], torch.Tensor) and not args[i].is_contiguous() for i in written if i < len(args)):
            return aten(*args)
        return compiled(*(value.contiguous() if i >= num_weights and isinstance(value, torch.Tensor) else value
                          for i, value in enumerate(args)))

    return call


def prepare_to_load() -> float:
    """Import what ``load_artifact`` needs (inductor: 1-2 s): at start-up, before READY, so
    that a restarted daemon answers its first registers with compiled graphs at once (a client
    recovering from a crash waits for those, not for the daemon's READY). Seconds taken."""
    started = time.perf_counter()
    from torch._inductor import CompiledArtifact  # noqa: F401
    from torch._inductor import config  # noqa: F401

    return time.perf_counter() - started


def describe_failure(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def compile_in_process(decoded: Any, weights: Sequence[torch.Tensor], device: torch.device, name: str) -> Callable:
    """``decoded``'s compiled function, compiled here (or loaded, when an artifact exists), or
    its ATen module when it cannot be compiled (logged). For a daemon without compile worker."""
    reason = compile_decision(decoded, weights, device)
    if reason is not None:
        log.info("graph %s runs its ATen code, not inductor's: %s", name, reason)
        return decoded.module
    try:
        path = artifact_dir() / artifact_name(decoded.graph_id, device)
        if not path.exists():
            seconds = compile_artifact(decoded, device, path)
            log.info("graph %s compiled by inductor in %.1f s", name, seconds)
        return load_artifact(path)
    except Exception as exc:  # noqa: BLE001 - no compiler, an op inductor lacks...: the graph still serves
        log.warning("graph %s runs its ATen code: inductor could not compile it (%s)", name, describe_failure(exc))
        return decoded.module
