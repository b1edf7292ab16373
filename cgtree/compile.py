"""The ``torch.compile`` backend "cgtree": every graph dynamo captures runs through cgtree's trees.

    model = torch.compile(model, backend="cgtree")    # inductor's kernels on CUDA, ATen's on CPU
    model = torch.compile(model, backend="cgtree", options={"compiler": "eager"})     # ATen always
    torch.compiler.cudagraph_mark_step_begin()                           # works as with PyTorch

Pipeline, per graph dynamo hands over:

1. ``aot_autograd`` functionalizes it: parameters, buffers and input mutations become explicit
   inputs and ops, and a training graph is split into a forward and a backward graph.
   Inference graphs keep their input mutations inside the graph (a buffer update such as a
   KV-cache write is captured with the rest); forward/backward graphs get them applied by AOT.
2. Each AOT graph gets a kernel runner: ``compiler="eager"`` runs the graph's own ATen code;
   ``compiler="inductor"`` compiles it with inductor, inductor's own CUDA graphs off (cgtree
   records them); the default ``"auto"`` is inductor for graphs on a CUDA device and eager on
   the CPU (``resolve_compiler`` says why). A graph that mutates a non-static input, or holds an op graphs cannot hold,
   keeps the eager runner even then: the tree manager learns such facts by watching ATen ops
   on the first run, and inductor kernels bypass ATen.
3. The runner goes to the ``TreeManager`` of the graph's device (``get_manager``): CUDA graphs
   to ``cuda:N``'s, CPU graphs to the cpu-replay manager. Static inputs are the ones AOT
   reports (parameters, buffers, ``mark_static_address``), plus state the caller keeps on an
   object that the graph writes (read through an attribute, by dynamo's source: transformers'
   ``StaticCache`` created inside a compiled prefill, which HF cannot mark there); a
   backward's are its saved tensors.
   Kinds: ``inference`` (no backward will come), ``forward``, ``backward``.

Invariants:
- One manager per device, process-wide, created on first use with ``policy()``;
  ``close_managers()`` closes them all, and ``torch._dynamo.reset()`` calls it (as it resets
  PyTorch's own trees). A compiled graph that outlives a reset moves to the new manager.
- Invocations: graphs are ``top_level=False`` pieces. A call of a compiled function is a new
  top-level invocation exactly when dynamo's ``GenerationTracker.generation`` changed since
  the previous graph call on that manager (dynamo bumps it on every entry into a compiled
  function, not at graph breaks inside it); the manager is then told ``begin_invocation()``.
  This is the signal PyTorch's trees use, so graph breaks give the same tree paths.
- Steps: ``torch.compiler.cudagraph_mark_step_begin()`` is wrapped so that it also calls
  ``mark_step_begin()`` on every cgtree manager; once a step was marked (since the last
  reset), managers created later start in that mode too, as PyTorch's do. Should a caller hold the unwrapped function,
  a change of PyTorch's ``MarkStepBox.mark_step_counter`` seen at the next graph call has the
  same effect (a reset of that counter to 0 is not a step).
- Skip messages name the user's source line: mutating and graph-incompatible ops run inside
  frames located at the user's lines (``cgtree.user_frames``), where the manager's inspector
  looks.
- The default policy is ``Policy(support_input_mutation=True)``: like reduce-overhead, a graph
  may update tree-managed inputs (outputs of earlier graphs) in place under graphs. Its own
  buffers (KV caches) are static inputs, which any policy lets it write.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx

from cgtree import graph_facts
from cgtree.config import Policy
from cgtree.manager import TreeManager
from cgtree.user_frames import function_at

__all__ = ["backend", "cgtree_backend", "close_managers", "configure", "get_manager", "managers", "policy", "reset"]

log = logging.getLogger("cgtree.compile")

BACKEND_NAME = "cgtree"
COMPILERS = ("auto", "eager", "inductor")
DEFAULT_POLICY = Policy(support_input_mutation=True)

_UNSET = object()


# ---------------------------------------------------------------------------------------------
# Managers, one per device


class _DeviceTree:
    """A device's manager and what the backend remembers about it between graph calls."""

    __slots__ = ("manager", "generation", "closed")

    def __init__(self, manager: TreeManager) -> None:
        self.manager = manager
        self.generation: Any = _UNSET  # dynamo's generation at this manager's last graph call
        self.closed = False


_trees: dict[torch.device, _DeviceTree] = {}
_policy: Policy = DEFAULT_POLICY


def _normalize(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _tree_for(device: torch.device) -> _DeviceTree:
    tree = _trees.get(device)
    if tree is None:
        _install_step_hook()
        tree = _trees[device] = _DeviceTree(TreeManager(device, policy=_policy))
        if _steps.marked_any:
            # As PyTorch: once the user marks steps, only marked steps start generations, on
            # every device's tree, including trees created after the mark.
            tree.manager.mark_step_begin()
    return tree


def get_manager(device: str | torch.device = "cpu", *, create: bool = False) -> Optional[TreeManager]:
    """The tree manager graphs on ``device`` run under (None if none yet, unless ``create``)."""
    device = _normalize(device)
    if create:
        return _tree_for(device).manager
    tree = _trees.get(device)
    return tree.manager if tree is not None else None


def managers() -> dict[str, TreeManager]:
    """Every live manager of the backend, by device name."""
    return {str(device): tree.manager for device, tree in _trees.items()}


def policy() -> Policy:
    """The policy managers created from now on start with."""
    return _policy


def configure(policy: Optional[Policy] = None, **changes: Any) -> Policy:
    """Set the backend's policy (a ``Policy``, and/or field changes such as
    ``skip_warmup=True``). Existing managers apply it to function variants they have not seen
    yet; ``reset()`` first for a clean slate. Returns the policy now in force."""
    global _policy
    _policy = replace(policy or _policy, **changes)
    for tree in _trees.values():
        tree.manager.set_policy(_policy)
    return _policy


def close_managers() -> None:
    """Close every manager: their graphs and pools are freed, and outputs still held go stale
    (clone what you keep). The policy stays. ``torch._dynamo.reset()`` calls this, as it resets
    PyTorch's own trees; graphs compiled before move to new managers when next called."""
    trees = list(_trees.values())
    _trees.clear()
    _steps.forget()
    for tree in trees:
        tree.closed = True
        try:
            tree.manager.close()
        except Exception:  # one manager failing to close must not keep the others (or itself) alive
            log.exception("cgtree: closing the tree manager on %s failed", tree.manager.device)


def reset(policy: Optional[Policy] = None) -> None:
    """``close_managers()``, and the policy back to ``policy`` or the default (for tests)."""
    global _policy
    close_managers()
    _policy = policy or DEFAULT_POLICY


# ---------------------------------------------------------------------------------------------
# Steps and invocations


class _StepWatcher:
    """Turns ``torch.compiler.cudagraph_mark_step_begin()`` into ``mark_step_begin()`` on every
    manager: through a wrapper of that function, and, for callers holding the original, by
    noticing at the next graph call that PyTorch's step counter moved."""

    def __init__(self) -> None:
        self.installed = False
        self.marked_any = False  # since the last reset()
        self.counter_seen = 0
        self.box: Any = None  # torch._inductor.cudagraph_trees.MarkStepBox once imported

    def mark_all(self) -> None:
        self.marked_any = True
        for tree in _trees.values():
            tree.manager.mark_step_begin()
        self.counter_seen = self._counter()

    def forget(self) -> None:
        self.marked_any = False
        self.counter_seen = self._counter()

    def _counter(self) -> int:
        if self.box is None:
            module = sys.modules.get("torch._inductor.cudagraph_trees")
            if module is None:
                return 0
            self.box = module.MarkStepBox
        return self.box.mark_step_counter

    def poll(self) -> None:
        """At a graph call: a step marked behind the wrapper's back counts too."""
        counter = self._counter()
        if counter != self.counter_seen:
            if counter != 0:  # 0 is PyTorch resetting its trees, not a step
                self.mark_all()
            self.counter_seen = counter


_steps = _StepWatcher()


def _install_step_hook() -> None:
    if _steps.installed:
        return
    _steps.installed = True
    original = torch.compiler.cudagraph_mark_step_begin

    @functools.wraps(original)
    def cudagraph_mark_step_begin() -> None:
        original()
        _steps.mark_all()

    cudagraph_mark_step_begin.__cgtree_wraps__ = original
    torch.compiler.cudagraph_mark_step_begin = cudagraph_mark_step_begin


# ---------------------------------------------------------------------------------------------
# One AOT graph under a tree


class TreeGraph:
    """A boxed AOT callable (``f(args_list)``) that runs one graph through its device's tree.

    At each call: tell the manager about a new top-level invocation (dynamo generation
    changed) or a step marked behind the hook's back, then call the graphed function.
    """

    def __init__(self, runner: Callable, device: torch.device, static_input_idxs: Sequence[int],
                 kind: str, name: str, dynamic: bool, written_input_idxs: Sequence[int] = ()) -> None:
        self.runner = runner
        self.written_input_idxs = tuple(written_input_idxs)  # writes compiled kernels hide
        self.device = device
        self.static_input_idxs = tuple(static_input_idxs)
        self.kind = kind
        self.name = name
        self.dynamic = dynamic
        self.tree: Optional[_DeviceTree] = None
        self.graphed: Any = None
        # An instance attribute: wrappers (torch._dynamo.disable) copy __dict__, not the class.
        self._boxed_call = True
        from torch._dynamo.mutation_guard import GenerationTracker

        self._generation_source = GenerationTracker  # held: one attribute read per call

    def _bind(self, inputs: Sequence[Any]) -> None:
        self.tree = _tree_for(self.device)
        self.graphed = self.tree.manager.cudagraphify(
            self.runner, inputs, self.static_input_idxs, name=self.name, kind=self.kind,
            dynamic=self.dynamic, top_level=False, written_input_idxs=self.written_input_idxs,
            exact_input_layout=True,  # inductor's code asserts its inputs' strides, as PyTorch's trees keep them
        )

    def __call__(self, args: list) -> Any:
        inputs = tuple(args)
        args.clear()  # boxed convention: the callee owns the list, so inputs can die early
        tree = self.tree
        if tree is None or tree.closed:
            self._bind(inputs)
            tree = self.tree
        generation = self._generation_source.generation
        if generation != tree.generation:
            tree.generation = generation
            tree.manager.begin_invocation()
        _steps.poll()
        return self.graphed(*inputs)

    @property
    def manager(self) -> Optional[TreeManager]:
        return None if self.tree is None else self.tree.manager


def _graph_name(gm: torch.fx.GraphModule, kind: str) -> str:
    frame = graph_facts.first_user_frame(gm)
    where = frame[2] if frame else "graph"
    compile_id = None
    try:
        compile_id = torch._guards.CompileContext.current_compile_id()
    except Exception:  # not inside a dynamo compile (tests building graphs by hand)
        pass
    return f"{where}[{compile_id}].{kind}" if compile_id is not None else f"{where}.{kind}"


def _eager_runner(gm: torch.fx.GraphModule) -> Callable:
    """The graph's own code, with skip-worthy ops located at the user's source lines, behind
    one frame at the graph's first user line (the origin cgtree reports for the function)."""
    located = graph_facts.nodes_worth_locating(gm)
    graph_facts.lower_auto_functionalized(gm)
    graph_facts.locate_user_frames(gm, located)
    forward = gm.forward
    frame = graph_facts.first_user_frame(gm)
    return function_at(forward, frame) if frame is not None else forward


def _boxed_runner(compiled: Callable) -> Callable:
    """A boxed compiled callable (``f(list)``) as the plain ``f(*inputs)`` the manager calls."""

    def run(*inputs: Any) -> Any:
        return compiled(list(inputs))

    return run


def tree_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, kind: str,
               static_input_idxs: Sequence[int], name: Optional[str] = None) -> Callable:
    """Put one AOT graph, run by its own ATen code, under its device's tree; returns the boxed
    callable AOT will call. Graphs on devices other than cpu/cuda run outside any tree."""
    device = graph_facts.device_of(gm, example_inputs)
    name = name or _graph_name(gm, kind)
    dynamic = graph_facts.is_dynamic(gm)
    runner = _eager_runner(gm)
    unsupported = graph_facts.higher_order_ops(gm)
    if unsupported:
        # The manager's first-run inspector (a dispatch mode) cannot run higher-order ops yet.
        log.warning("cgtree: %s calls higher-order op(s) %s: it runs without CUDA graphs", name, ", ".join(unsupported))
        return boxed(runner)
    return _under_tree(runner, device, static_input_idxs, kind, name, dynamic)


def _under_tree(runner: Callable, device: Optional[torch.device], static_input_idxs: Sequence[int],
                kind: str, name: str, dynamic: bool, written_input_idxs: Sequence[int] = ()) -> Callable:
    if device is None or device.type not in ("cuda", "cpu"):
        log.info("cgtree: %s has no cpu/cuda tensors (device %s): it runs without a tree", name, device)
        return boxed(runner)
    return TreeGraph(runner, _normalize(device), static_input_idxs, kind, name, dynamic, written_input_idxs)


def needs_eager_runner(gm: torch.fx.GraphModule, static_input_idxs: Sequence[int]) -> bool:
    """Whether the tree manager must watch this graph's ATen ops on its first run: it mutates
    a non-static input (allowed only if that input turns out tree-managed) or holds an op a
    graph cannot hold. Compiled kernels would hide both."""
    return bool(graph_facts.incompatible_nodes(gm)) or bool(graph_facts.mutated_inputs(gm) - set(static_input_idxs))


def boxed(fn: Callable) -> Callable:
    """``fn(*inputs)`` in AOT autograd's boxed calling convention: the callee takes the
    argument list and empties it, so inputs can be freed as early as possible."""

    def run(args: list) -> Any:
        inputs = tuple(args)
        args.clear()
        return fn(*inputs)

    run._boxed_call = True
    return run


# ---------------------------------------------------------------------------------------------
# Static inputs


def forward_static_inputs(num_inputs: int, kept_state: "_KeptState | None" = None) -> list[int]:
    """Static inputs of an inference/forward graph: AOT's ``static_input_indices``
    (parameters, buffers, ``mark_static_address``), plus state the caller keeps on an object
    that the graph writes (``graph_facts.kept_state_positions``); none when AOT has no tracing
    context."""
    context = torch._guards.TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    indices = set(getattr(metadata, "static_input_indices", None) or [])
    if kept_state is not None:
        infos = getattr(metadata, "input_info", None) or []
        written = {i for i, info in enumerate(infos) if getattr(info, "mutates_data", False)}
        indices |= written & kept_state.aot_positions(num_inputs)
    return sorted(i for i in indices if 0 <= i < num_inputs)


class _KeptState:
    """Which dynamo placeholders are state kept on an object, in AOT's input numbering (AOT
    puts the parameters it lifts first, then dynamo's placeholders in order)."""

    def __init__(self, dynamo_gm: torch.fx.GraphModule) -> None:
        self.num_dynamo_inputs = len(graph_facts.placeholders(dynamo_gm))
        self.positions = graph_facts.kept_state_positions(dynamo_gm)

    def aot_positions(self, num_aot_inputs: int) -> set[int]:
        lifted = num_aot_inputs - self.num_dynamo_inputs
        if lifted < 0:  # not the layout this reading assumes: mark nothing
            return set()
        return {lifted + position for position in self.positions}


def backward_static_inputs(bw_gm: torch.fx.GraphModule, forward_static: Optional[set[int]]) -> list[int]:
    """Static inputs of a backward graph: its saved tensors (as PyTorch's trees have it),
    except forward inputs that were not static there (a saved user input is a new tensor each
    step: copying it beats re-recording). AOT names a saved forward input ``primals_<k>``."""
    saved = range(graph_facts.saved_tensor_count(bw_gm))
    if forward_static is None:
        return list(saved)
    names = [node.name for node in graph_facts.placeholders(bw_gm)]
    static = []
    for position in saved:
        name = names[position]
        if name.startswith("primals_") and name[len("primals_"):].isdigit():
            if int(name[len("primals_"):]) - 1 not in forward_static:
                continue
        static.append(position)
    return static


# ---------------------------------------------------------------------------------------------
# The backend


def _parse_options(options: Optional[dict]) -> str:
    options = dict(options or {})
    compiler = options.pop("compiler", "auto")
    if options:
        raise ValueError(f"unknown cgtree backend option(s) {sorted(options)}; known: ['compiler']")
    if compiler not in COMPILERS:
        raise ValueError(f"options['compiler'] = {compiler!r}; expected one of {COMPILERS}")
    return compiler


class _ForwardMemo:
    """What a dynamo graph's forward compile tells its (later, lazy) backward compile."""

    def __init__(self) -> None:
        self.static_input_idxs: Optional[set[int]] = None
        self.name: Optional[str] = None

    def remember(self, static_input_idxs: Sequence[int], name: str) -> None:
        self.static_input_idxs = set(static_input_idxs)
        self.name = name

    def backward_static_inputs(self, bw_gm: torch.fx.GraphModule) -> list[int]:
        return backward_static_inputs(bw_gm, self.static_input_idxs)

    def backward_name(self, bw_gm: torch.fx.GraphModule) -> str:
        if self.name is None:
            return _graph_name(bw_gm, "backward")
        return self.name.rsplit(".", 1)[0] + ".backward"


def _compile_eager(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    from torch._dynamo.backends.common import aot_autograd

    memo = _ForwardMemo()
    kept_state = _KeptState(gm)

    def forward_compiler(kind: str):
        def compile_graph(aot_gm: torch.fx.GraphModule, aot_inputs: Sequence[Any]) -> Callable:
            static = forward_static_inputs(len(aot_inputs), kept_state)
            name = _graph_name(aot_gm, kind)
            memo.remember(static, name)
            return tree_graph(aot_gm, aot_inputs, kind=kind, static_input_idxs=static, name=name)

        return compile_graph

    def backward_compiler(aot_gm: torch.fx.GraphModule, aot_inputs: Sequence[Any]) -> Callable:
        return tree_graph(aot_gm, aot_inputs, kind="backward", static_input_idxs=memo.backward_static_inputs(aot_gm),
                          name=memo.backward_name(aot_gm))

    compiler = aot_autograd(
        fw_compiler=forward_compiler("forward"),
        bw_compiler=backward_compiler,
        inference_compiler=forward_compiler("inference"),
        keep_inference_input_mutations=True,
    )
    return compiler(gm, example_inputs)


def _compile_inductor(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Inductor's own pipeline (decompositions, partitioner, kernels) with its CUDA graphs off;
    each compiled graph then goes under cgtree's tree through ``inner_compile``."""
    import torch._functorch.config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    memo = _ForwardMemo()
    kept_state = _KeptState(gm)

    def inner_compile(aot_gm: torch.fx.GraphModule, aot_inputs: Sequence[Any], **kwargs: Any) -> Any:
        kind = "backward" if kwargs.get("is_backward") else ("inference" if kwargs.get("is_inference") else "forward")
        if kind == "backward":
            static, name = memo.backward_static_inputs(aot_gm), memo.backward_name(aot_gm)
        else:
            static = sorted(set(kwargs.get("static_input_idxs") or ()) | set(forward_static_inputs(len(aot_inputs), kept_state)))
            name = _graph_name(aot_gm, kind)
            memo.remember(static, name)
        if needs_eager_runner(aot_gm, static):
            log.info("cgtree: %s runs its ATen code instead of inductor's: it mutates an input or holds "
                     "an op graphs cannot hold, which cgtree must see op by op", name)
            return tree_graph(aot_gm, aot_inputs, kind=kind, static_input_idxs=static, name=name)
        device = graph_facts.device_of(aot_gm, aot_inputs)  # read before inductor rewrites the graph
        written = sorted(graph_facts.mutated_inputs(aot_gm))  # inductor's kernels hide these writes
        frame = graph_facts.first_user_frame(aot_gm)
        compiled = compile_fx_inner(aot_gm, aot_inputs, **{**kwargs, "cudagraphs": _boxed_false()})
        runner = _boxed_runner(_as_boxed_callable(compiled))
        if frame is not None:  # skip messages name the user's function, as for the ATen runner
            runner = function_at(runner, frame)
        graphed = _under_tree(runner, device, static, kind, name, graph_facts.is_dynamic(aot_gm), written)
        if hasattr(compiled, "current_callable"):  # CompiledFxGraph: keep inductor's wrapper object
            compiled.current_callable = graphed
            return compiled
        return graphed

    # AOTAutogradCache would hand back cached code without calling inner_compile, i.e. without
    # the tree: it stays off for these compiles.
    with inductor_config.patch({"triton.cudagraphs": False}), functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner_compile)


def _boxed_false() -> Any:
    from torch._inductor.utils import BoxedBool

    return BoxedBool(False)


def _as_boxed_callable(compiled: Any) -> Callable:
    current = getattr(compiled, "current_callable", None)
    return current if current is not None else compiled


def cgtree_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                   options: Optional[dict] = None, mode: Optional[str] = None) -> Callable:
    """The dynamo backend (``torch.compile(backend="cgtree", options={"compiler": ...})``).

    ``mode`` is accepted and ignored: the tree policy comes from ``configure()``.
    """
    compiler = resolve_compiler(_parse_options(options), graph_facts.device_of(gm, example_inputs))
    if compiler == "inductor":
        return _compile_inductor(gm, example_inputs)
    return _compile_eager(gm, example_inputs)


def resolve_compiler(compiler: str, device: Optional[torch.device]) -> str:
    """``"auto"`` -> inductor for a graph on a CUDA device (what reduce-overhead runs), ATen
    kernels otherwise. Why not inductor on the CPU replay backend too, measured on the 2-core
    development machine (torch 2.13, ``.probe``-style loop of 50 calls, docs/PERFORMANCE.md
    section 11): inductor's CPU kernels run 2-14x faster per call (llama 2 layers: 1.5 ms
    against 22 ms), but its first call costs 10-20 s of C++ compilation against 2-3 s, so it
    pays off only after about a thousand calls; the CPU backend is where cgtree is tried and
    tested (CI compiles hundreds of graphs), so it keeps the quick ATen path. Pass
    ``compiler="inductor"`` for a long-running CPU job."""
    if compiler != "auto":
        return compiler
    return "inductor" if device is not None and device.type == "cuda" else "eager"


cgtree_backend.reset = close_managers  # torch._dynamo.reset() calls a cached backend's reset()


def backend(compiler: str = "auto") -> Callable:
    """A backend callable for ``torch.compile(backend=...)`` with the compiler fixed."""
    _parse_options({"compiler": compiler})

    def cgtree(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        return cgtree_backend(gm, example_inputs, options={"compiler": compiler})

    cgtree.reset = close_managers
    return cgtree


def _install_dynamo_reset_hook() -> None:
    """``torch._dynamo.reset()`` closes cgtree's managers even when dynamo no longer lists the
    backend among its cached ones (it forgets them at each reset; PyTorch resets its own trees
    unconditionally there)."""
    import torch._dynamo

    original = torch._dynamo.reset
    if getattr(original, "__cgtree_wraps__", None) is not None:
        return

    @functools.wraps(original)
    def reset_dynamo() -> None:
        original()
        close_managers()

    reset_dynamo.__cgtree_wraps__ = original
    torch._dynamo.reset = reset_dynamo


def _register() -> None:
    """Register "cgtree" with dynamo unless the package's entry point will (registering twice
    makes dynamo's lookup fail with "duplicate name")."""
    from torch._dynamo.backends import registry

    compiler_fns = getattr(registry, "_COMPILER_FNS", None)
    known = getattr(registry, "_BACKENDS", None)
    if compiler_fns is not None and BACKEND_NAME in compiler_fns:
        return
    if known is not None and known.get(BACKEND_NAME) is not None:
        return  # an entry point: dynamo's lookup loads this module and registers it itself
    try:
        registry.register_backend(compiler_fn=cgtree_backend, name=BACKEND_NAME)
    except AssertionError:  # registered concurrently under the same name
        pass


_register()
_install_dynamo_reset_hook()
