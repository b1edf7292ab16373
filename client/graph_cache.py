"""Lowered graphs kept on disk, so that a new client process registers an nn.Module without
lowering it again (opt-in).

Invariants:
- A hit returns byte for byte the EncodedGraph a fresh lowering of the live module gives
  (within what the key can see, listed below); its weights are always read from the live
  module, never from the entry.
- Entries never hold parameter or buffer data; they are msgpack data only, every blob hash is
  re-checked when read; nothing is unpickled or evaluated.
- The cache never fails a call that lowering alone would not fail: an unusable directory, an
  unreadable entry or a module it cannot describe means lowering as without the cache, and
  lowering's own refusals (weight mutation) are raised as they are.

Why: lowering (``cgtree.client.lowering``) costs 1.3-2 s in a fresh CPU process, more on a GPU
host, nearly all of it imports that torch's tracing pulls in (dynamo, sympy). A client that
arrives when its graph is already recorded in cgtreed would spend its whole cold start there.
With a cache entry, its first result costs the key, reading and hashing its own weights, and
the daemon round trips.

Use (``Client.register`` / ``Client.submit`` go through ``lower_and_encode``)::

    export CGTREE_GRAPH_CACHE=~/.cache/cgtree/graphs     # or graph_cache.enable(path)
    client.submit(model, [x])

Only plain ``nn.Module``s lowered on the make_fx route are cached (not GraphModules, callables,
ExportedPrograms, ``dynamic_shapes``, nor modules that fell back to export).

What an entry holds, what a hit does:
- An entry holds the graph's *structure*: the encoded graph (its weight slots name content
  hashes) with the blobs of the constants the graph owns, never the module's parameters or
  buffers. On a hit, the parameters and buffers are read from the live module, hashed
  (``weight_hash``, as on any register) and bound into their slots (``rebind_weights``): a hit
  sends the module's own weights, byte for byte the payload a fresh lowering gives. A graph
  traced with fake tensors cannot depend on parameter or buffer values (they are never read),
  which is why the key leaves them out and a retrained model still hits.
- The key is the sha256 of a canonical description of everything else the trace depends on
  (``_key``): Python, torch (version, git hash, CUDA/HIP build) and cgtree (version and the
  source of lowering.py, payload/*.py and this file); the switches that change a trace (default
  dtype, grad and inference mode, deterministic algorithms, SDPA backends, the MHA fast path,
  mkldnn, CPU capability, CUDA device name and capability of the devices involved); every
  module of the tree (class and the bodies of its non-torch classes, methods by bytecode,
  training flag, every attribute: numbers, strings, enums, dtypes, devices, containers of
  these, functions by code, defaults and closure, plain objects by class and attributes,
  tensors that are not parameters or buffers by contents; a forward or backward hook anywhere
  makes the module uncacheable); the parameters' and buffers' names, dtypes, shapes, strides,
  devices, requires_grad and storage sharing; the same for the example inputs; and the sha256
  of the source files of every class and function in that description.
- The source files that run during the trace (recorded with ``sys.setprofile`` while a miss
  lowers; torch's, the standard library's and cgtree's are covered by the versions) are stored
  in the entry with their sha256 and hashed again on every hit: editing a helper function in
  another file is a miss. Code without a source file that user code runs during the trace, or
  a tensor the graph captures that is neither a module attribute nor made in ``forward``
  (a global), makes the module uncacheable.

What the key cannot see (keep such state out of ``forward``, or do not enable the cache):
- values read during the trace that are not source text or module attributes: environment
  variables, files, globals computed at import time or rebound at run time (a Python number
  from a global ends up in the graph as a constant), random draws, monkeypatched torch or
  library functions;
- module-level constants or class attributes of a file none of whose code runs during the
  trace and that defines no class of the module tree;
- code generated at run time (exec/eval): in a module's namespace it is keyed by that
  module's file, not by the generated text; torch calling such code for the model outside
  the module tree (a function passed to ``checkpoint``) is not seen;
- changes to installed torch or standard-library files without a version change, and the
  behaviour of C extensions other than torch's;
- torch global switches other than those listed above.

Files: the directory is created with mode 0700; an existing one must belong to this user and
not be writable by group or others, else the cache is not used (logged). Entries are written
to a temporary file (0600) and renamed into place; only regular files owned by this user are
read (no symlinks). An entry that cannot be read, is malformed, has another key, or names a
source file that changed is a miss, and the fresh lowering replaces it. Entries are data only
(msgpack, ``unpack_encoded`` re-checks every blob's hash); nothing is unpickled or evaluated.
"""

from __future__ import annotations

import enum
import functools
import glob
import hashlib
import logging
import marshal
import os
import stat
import sys
import sysconfig
import tempfile
import time
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import msgpack
import torch

import cgtree
from cgtree.payload import (
    EncodedGraph,
    PayloadError,
    pack_encoded,
    rebind_weights,
    tensor_to_weight_blob,
    unpack_encoded,
)

__all__ = ["ENV_VAR", "GraphCache", "LoweringRecord", "active", "disable", "enable", "last_lowering",
           "lower_and_encode"]

log = logging.getLogger("cgtree.client")

ENV_VAR = "CGTREE_GRAPH_CACHE"
ENTRY_FORMAT = "cgtree.graph-cache"
ENTRY_VERSION = 1
ENTRY_SUFFIX = ".cgtg"
MAX_ENTRY_BYTES = 1 << 31
_MAX_DEPTH = 48
_INT64 = (-(1 << 63), (1 << 63) - 1)
_CGTREE_SOURCES = ("lowering.py", "graph_cache.py")  # beside this file; _versions adds cgtree/payload/*.py

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_IGNORED_MODULE_ATTRS = frozenset({
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_is_full_backward_hook",
})
_BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                      types.ClassMethodDescriptorType)
# Class-body entries that are Python's or a decorator's bookkeeping, not behaviour (dataclass
# fields are covered by the generated methods).
_CLASS_BOOKKEEPING = frozenset({
    "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
    "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__", "__slotnames__",
    "__abstractmethods__", "_abc_impl", "__dataclass_fields__", "__dataclass_params__",
})
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


@dataclass(frozen=True)
class LoweringRecord:
    """How one ``lower_and_encode`` call got its graph.

    route: "make_fx" or "export" (how the graph was lowered, now or when the entry was made).
    cache: "hit", "miss" (lowered, entry written), "uncacheable" (lowered, not stored),
        "unusable" (the cache directory cannot be used), or "off" (no cache for this call).
    detail: why, for misses, uncacheable modules and unusable directories.
    seconds: the whole call: key, lookup, lowering and encoding.
    key: the entry's key (sha256 hex), when one was computed.
    """

    route: str
    cache: str
    detail: str
    seconds: float
    key: Optional[str] = None


def _reason(exc: Exception) -> str:
    if isinstance(exc, (_Uncacheable, _Miss)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class _Uncacheable(Exception):
    """The module (or this call) cannot be cached; the message says why."""


class _Miss(Exception):
    """No usable entry; the message says why."""


# ---------------------------------------------------------------------------------------------
# Public API

_UNSET = object()
_configured: Any = _UNSET
_from_env: dict[str, "GraphCache"] = {}
_last: Optional[LoweringRecord] = None


def enable(directory: str | os.PathLike | None = None) -> "GraphCache":
    """Use a graph cache in this process (over ``$CGTREE_GRAPH_CACHE``); default directory:
    ``$XDG_CACHE_HOME/cgtree/graphs`` (``~/.cache/cgtree/graphs``)."""
    global _configured
    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = os.path.join(base, "cgtree", "graphs")
    _configured = GraphCache(directory)
    return _configured


def disable() -> None:
    """No graph cache in this process, whatever ``$CGTREE_GRAPH_CACHE`` says."""
    global _configured
    _configured = None


def active() -> Optional["GraphCache"]:
    """The cache ``lower_and_encode`` uses by default: ``enable``'s, else ``$CGTREE_GRAPH_CACHE``'s."""
    if _configured is not _UNSET:
        return _configured
    directory = os.environ.get(ENV_VAR)
    if not directory:
        return None
    if directory not in _from_env:
        _from_env[directory] = GraphCache(directory)
    return _from_env[directory]


def last_lowering() -> Optional[LoweringRecord]:
    """The record of this process's latest ``lower_and_encode`` call (diagnostics, benchmarks)."""
    return _last


def lower_and_encode(graph: Any, example_inputs: Sequence[Any], *, cache: Any = None) -> EncodedGraph:
    """Lower and encode ``graph`` as ``Client.register`` does, through a graph cache for plain
    nn.Modules. cache: None (``active()``), False (none), a ``GraphCache`` or a directory."""
    global _last
    start = time.perf_counter()
    if cache is None:
        cache = active()
    elif cache is not False and not isinstance(cache, GraphCache):
        cache = GraphCache(cache)
    cacheable = isinstance(graph, torch.nn.Module) and not isinstance(graph, torch.fx.GraphModule)
    if cache and cacheable:
        encoded, record = cache._lower_and_encode(graph, list(example_inputs), start)
    else:
        from cgtree.client import lowering

        lowered = lowering.lower(graph, list(example_inputs))
        encoded = lowering.encode(lowered)
        record = LoweringRecord(lowered.route, "off", "", time.perf_counter() - start)
    _last = record
    return encoded


class GraphCache:
    """One cache directory; see the module docstring. Safe to share between processes."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def __repr__(self) -> str:
        return f"GraphCache({str(self.directory)!r})"

    def entry_path(self, key: str) -> Path:
        return self.directory / f"{key}{ENTRY_SUFFIX}"

    def _lower_and_encode(self, module: torch.nn.Module, inputs: list, start: float) -> tuple[EncodedGraph, LoweringRecord]:
        from cgtree.client import lowering

        def record(route: str, cache: str, detail: str, key: Optional[str]) -> LoweringRecord:
            if cache != "hit":
                log.info("graph cache %s: %s%s", self.directory, cache, f" ({detail})" if detail else "")
            return LoweringRecord(route, cache, detail, time.perf_counter() - start, key)

        try:
            described = _key(module, inputs)
        except Exception as exc:  # _Uncacheable, or anything odd a user object does when read
            lowered = lowering.lower(module, inputs)
            return lowering.encode(lowered), record(lowered.route, "uncacheable", _reason(exc), None)
        key, state = described.key, described.state
        try:
            self._ready_directory()
            return self._load(key, state, inputs), record("make_fx", "hit", "", key)
        except _Unusable as exc:
            lowered = lowering.lower(module, inputs)
            return lowering.encode(lowered), record(lowered.route, "unusable", str(exc), key)
        except Exception as exc:  # _Miss, or an entry that trips something unexpected: lower
            reason = _reason(exc)

        _warm_up_tracing()  # torch's tracing imports run before the recorder: they are not graph code
        recorder = _SourceRecorder()
        with recorder:
            lowered = lowering.lower(module, inputs)
        encoded = lowering.encode(lowered)
        try:
            self._store(described, lowered, encoded, recorder)
        except (OSError, _Unusable) as exc:
            return encoded, record(lowered.route, "unusable", f"cannot write the entry: {exc}", key)
        except Exception as exc:  # _Uncacheable, or anything unexpected: the graph is still good
            return encoded, record(lowered.route, "uncacheable", _reason(exc), key)
        return encoded, record(lowered.route, "miss", reason, key)

    # ------------------------------------------------------------------ entries

    def _ready_directory(self) -> None:
        try:
            os.makedirs(self.directory, mode=0o700)
            os.chmod(self.directory, 0o700)  # makedirs' mode is filtered by the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise _Unusable(f"cannot create {self.directory}: {exc}") from None
        try:
            info = os.stat(self.directory)
        except OSError as exc:
            raise _Unusable(f"cannot stat {self.directory}: {exc}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise _Unusable(f"{self.directory} is not a directory")
        if info.st_uid != os.geteuid():
            raise _Unusable(f"{self.directory} belongs to uid {info.st_uid}, not to this user")
        if info.st_mode & 0o022:
            raise _Unusable(f"{self.directory} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})")

    def _load(self, key: str, state: list[tuple[str, torch.Tensor]], inputs: list) -> EncodedGraph:
        path = self.entry_path(key)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise _Miss("no entry") from None
        except OSError as exc:
            raise _Miss(f"cannot open the entry: {exc}") from None
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise _Miss("the entry is not a regular file of this user")
            if info.st_size > MAX_ENTRY_BYTES:
                raise _Miss(f"the entry is {info.st_size} bytes")
            data = fh.read()
        try:
            return self._read_entry(data, key, state, inputs)
        except PayloadError as exc:
            raise _Miss(f"unreadable entry: {exc}") from None

    def _read_entry(self, data: bytes, key: str, state: list, inputs: list) -> EncodedGraph:
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
        except Exception as exc:
            raise _Miss(f"malformed entry ({type(exc).__name__})") from None
        if not (isinstance(doc, dict) and doc.get("format") == ENTRY_FORMAT and doc.get("version") == ENTRY_VERSION):
            raise _Miss("not a graph cache entry of this version")
        if doc.get("key") != key or doc.get("state") != [name for name, _ in state]:
            raise _Miss("the entry belongs to another key")
        sources = doc.get("sources")
        if type(sources) is not list or type(doc.get("encoded")) is not bytes:
            raise _Miss("malformed entry")
        for entry in sources:
            if not (type(entry) is list and len(entry) == 2 and all(type(v) is str for v in entry)):
                raise _Miss("malformed entry")
            if _file_sha256(entry[0]) != entry[1]:
                raise _Miss(f"source file changed: {entry[0]}")
        template = unpack_encoded(doc["encoded"], where="graph cache entry", allow_missing_weights=True)
        if len(template.weight_hashes) < len(state) or len(template.input_specs) != len(inputs):
            raise _Miss("the entry does not fit the module")
        if not all(spec.accepts(x) for spec, x in zip(template.input_specs, inputs)):
            raise _Miss("the entry's input specs do not accept the inputs")
        blobs = {i: tensor_to_weight_blob(t, name=f"weight {name!r}") for i, (name, t) in enumerate(state)}
        return rebind_weights(template, blobs)

    def _store(self, described: _Key, lowered: Any, encoded: EncodedGraph, recorder: "_SourceRecorder") -> None:
        key, state = described.key, described.state
        if lowered.route != "make_fx":
            raise _Uncacheable(f"lowered by {lowered.route} (only make_fx graphs are cached)")
        if recorder.problem:
            raise _Uncacheable(recorder.problem)
        names = [name for name, _ in state]
        if list(lowered.weight_names[: len(state)]) != names or any(
                w is not t for w, (_, t) in zip(lowered.weights, state)):
            raise _Uncacheable("the lowered weights are not the module's parameters and buffers")
        _check_constants(lowered, len(state), described.keyed_tensors)
        rebound = set(encoded.weight_hashes[: len(state)])
        kept = set(encoded.weight_hashes[len(state):])
        document = {
            "format": ENTRY_FORMAT,
            "version": ENTRY_VERSION,
            "key": key,
            "state": names,
            "sources": [[path, _file_sha256(path)] for path in sorted(recorder.files)],
            "encoded": pack_encoded(encoded, omit_weights=rebound - kept),
        }
        if any(sha is None for _, sha in document["sources"]):
            raise _Uncacheable("a source file that ran during the trace cannot be read")
        data = msgpack.packb(document, use_bin_type=True)
        self._ready_directory()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ENTRY_SUFFIX, dir=self.directory)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.entry_path(key))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


class _Unusable(Exception):
    """The cache directory cannot be used safely."""


# ---------------------------------------------------------------------------------------------
# The key


@dataclass
class _Key:
    """sha256 hex of the description; the module's parameters and buffers in weight order; ids
    of the other tensors the description covers by contents (module attributes, closures)."""

    key: str
    state: list[tuple[str, torch.Tensor]]
    keyed_tensors: set[int]


def _key(module: torch.nn.Module, inputs: list) -> _Key:
    """Describe everything but the parameters' and buffers' values; see the module docstring."""
    for i, value in enumerate(inputs):
        if type(value) is not torch.Tensor:
            raise _Uncacheable(f"example input {i} is a {type(value).__name__}, not a plain tensor")
    hooks = torch.nn.modules.module
    for name in _GLOBAL_HOOKS:
        if getattr(hooks, name, None):
            raise _Uncacheable(f"global module hooks are registered ({name})")
    state = list(module.named_parameters()) + list(module.named_buffers())
    describer = _Describer({id(t): i for i, (_, t) in enumerate(state)})
    tree = [describer.module(module, ""), describer.class_bodies()]
    tensors = [t for _, t in state] + inputs
    storages = _storage_sharing(tensors)
    document = [
        ENTRY_FORMAT, ENTRY_VERSION,
        _versions(),
        _switches(tensors),
        tree,
        [[name, *_tensor_spec(t), storages[i]] for i, (name, t) in enumerate(state)],
        [[*_tensor_spec(t), storages[len(state) + i]] for i, t in enumerate(inputs)],
        [[path, _file_sha256(path)] for path in sorted(describer.files)],
    ]
    key = hashlib.sha256(msgpack.packb(document, use_bin_type=True)).hexdigest()
    return _Key(key, state, describer.keyed_tensors)


def _tensor_spec(t: torch.Tensor) -> list:
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise _Uncacheable(f"a {type(t).__name__} (tensor subclass) among the weights or inputs")
    return [str(t.dtype), list(t.shape), list(t.stride()) if t.layout == torch.strided else None,
            int(t.storage_offset()) if t.layout == torch.strided else None, str(t.device), bool(t.requires_grad),
            str(t.layout), bool(t.is_conj()), bool(t.is_neg())]


def _storage_sharing(tensors: list[torch.Tensor]) -> list[int]:
    """For each tensor, the index of the first earlier tensor on the same storage, or -1."""
    first: dict[tuple, int] = {}
    out = []
    for i, t in enumerate(tensors):
        if t.layout != torch.strided or t.device.type == "meta" or t.untyped_storage().nbytes() == 0:
            out.append(-1)
            continue
        ident = (str(t.device), t.untyped_storage().data_ptr())
        out.append(first.get(ident, -1))
        first.setdefault(ident, i)
    return out


@functools.lru_cache(maxsize=1)
def _versions() -> list:
    here = os.path.dirname(os.path.abspath(__file__))
    import cgtree.payload as payload

    codec = os.path.dirname(os.path.abspath(payload.__file__))  # the package: every module of the codec
    sources = [os.path.join(here, name) for name in _CGTREE_SOURCES] + sorted(glob.glob(os.path.join(codec, "*.py")))
    return [
        sys.implementation.cache_tag, sys.version,
        torch.__version__, torch.version.git_version, torch.version.cuda, torch.version.hip,
        getattr(cgtree, "__version__", None), [_file_sha256(path) for path in sources],
    ]


def _switches(tensors: list[torch.Tensor]) -> list:
    sdp = torch.backends.cuda
    flags = []
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled"):
        fn = getattr(sdp, name, None)
        flags.append(bool(fn()) if fn is not None else None)
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    cuda = [[i, torch.cuda.get_device_name(i), list(torch.cuda.get_device_capability(i))] for i in devices]
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None and hasattr(mha, "get_fastpath_enabled") else None
    return [
        str(torch.get_default_dtype()), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
        torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cpu.get_cpu_capability(), bool(torch.backends.mkldnn.enabled), fastpath, flags, cuda,
    ]


class _Describer:
    """A canonical, msgpack-able description of a module tree (see the module docstring).

    Objects seen twice are described once and referred to by index afterwards (shared
    submodules, cycles); anything it does not know how to describe raises ``_Uncacheable``.
    """

    def __init__(self, state_ids: dict[int, int]) -> None:
        self.state_ids = state_ids
        self.classes: dict[type, Optional[list]] = {}
        self.memo: dict[int, int] = {}
        self.files: set[str] = set()
        self.keyed_tensors: set[int] = set()

    def _seen(self, obj: Any) -> Optional[list]:
        index = self.memo.get(id(obj))
        if index is not None:
            return ["ref", index]
        self.memo[id(obj)] = len(self.memo)
        return None

    def module(self, module: torch.nn.Module, path: str) -> list:
        ref = self._seen(module)
        if ref is not None:
            return ref
        where = path or "the module"
        if isinstance(module, torch.fx.GraphModule):
            raise _Uncacheable(f"{where} is a GraphModule (generated code)")
        attrs = []
        for name, value in vars(module).items():
            if name in _IGNORED_MODULE_ATTRS:
                continue
            if name in _HOOK_DICTS:
                if value:
                    raise _Uncacheable(f"{where} has {name[1:].replace('_', ' ')}")
                continue
            if name in ("_parameters", "_buffers"):
                attrs.append([name, [[k, None if v is None else self._state(v, f"{path}.{k}")] for k, v in value.items()]])
            elif name == "_modules":
                attrs.append([name, [[k, None if v is None else self.module(v, f"{path}.{k}" if path else k)]
                                     for k, v in value.items()]])
            elif name == "_non_persistent_buffers_set":
                attrs.append([name, sorted(value)])
            else:
                attrs.append([name, self.value(value, f"{path}.{name}" if path else name, 0)])
        return ["module", self.cls(type(module)), attrs]

    def _state(self, tensor: torch.Tensor, where: str) -> list:
        index = self.state_ids.get(id(tensor))
        if index is None:
            raise _Uncacheable(f"{where} is not among named_parameters()/named_buffers()")
        return ["state", index]

    def cls(self, cls: type) -> list:
        """A class by name. The files of it and its bases join the key, and the bodies of those
        outside the library (methods by code, class attributes by value) join the description:
        a method replaced or a class attribute changed at run time is another key."""
        for klass in cls.__mro__:
            if klass is object or klass.__module__ == "builtins" or klass in self.classes:
                continue
            filename = getattr(sys.modules.get(klass.__module__), "__file__", None)
            self._add_file(filename, klass.__qualname__)
            self.classes[klass] = None  # described below; a reference back to it stops here
            if _LIBRARY.kind(filename) == "file":
                self.classes[klass] = self._class_body(klass)
        return [cls.__module__, cls.__qualname__]

    def _class_body(self, klass: type) -> list:
        body = []
        for name, value in vars(klass).items():
            if name in _CLASS_BOOKKEEPING:
                continue
            where = f"{klass.__qualname__}.{name}"
            if isinstance(value, (staticmethod, classmethod)):
                body.append([name, type(value).__name__, self.value(value.__func__, where, 1)])
            elif isinstance(value, property):
                body.append([name, "property", [self.value(f, where, 1) for f in (value.fget, value.fset, value.fdel)]])
            else:
                body.append([name, self.value(value, where, 1)])
        return body

    def class_bodies(self) -> list:
        return [[k.__module__, k.__qualname__, body] for k, body in self.classes.items() if body is not None]

    def _add_file(self, filename: Any, what: str) -> None:
        if not isinstance(filename, str) or _LIBRARY.kind(filename) == "pseudo":
            raise _Uncacheable(f"{what} has no source file ({filename})")
        if _LIBRARY.kind(filename) == "file":
            self.files.add(_LIBRARY.real(filename))

    def value(self, value: Any, where: str, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise _Uncacheable(f"{where}: nested deeper than {_MAX_DEPTH}")
        if value is None or type(value) in (bool, str, bytes, float):
            return value
        if type(value) is int:
            return value if _INT64[0] <= value <= _INT64[1] else ["int", str(value)]
        if isinstance(value, torch.Tensor):
            return self._tensor(value, where)
        if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return [type(value).__name__, str(value)]
        if isinstance(value, torch.Size):
            return ["size", list(value)]
        if isinstance(value, enum.Enum):
            return ["enum", self.cls(type(value)), value.name]
        if isinstance(value, torch.nn.Module):
            ref = self.memo.get(id(value))
            if ref is None:
                raise _Uncacheable(f"{where} holds an nn.Module outside the module tree")
            return ["ref", ref]
        if isinstance(value, type):
            return ["class", self.cls(value)]
        if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
            return self._callable(value, where, depth)
        if isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return ["operator", str(value)]
        if isinstance(value, _BUILTIN_CALLABLES):
            bound = getattr(value, "__self__", None)
            if bound is not None and not isinstance(bound, (types.ModuleType, type)):
                raise _Uncacheable(f"{where}: a builtin method bound to a {type(bound).__name__}")
            return ["builtin", getattr(value, "__module__", None), getattr(value, "__qualname__", None)]
        ref = self._seen(value)
        if ref is not None:
            return ref
        kind = type(value)
        if kind in (list, tuple):
            return [kind.__name__, [self.value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]]
        if kind in (dict, OrderedDict):
            return [kind.__name__, [[self.value(k, f"{where} key", depth + 1), self.value(v, f"{where}[{k!r}]", depth + 1)]
                                    for k, v in value.items()]]
        if kind in (set, frozenset):
            items = [msgpack.packb(self.value(v, f"{where} item", depth + 1), use_bin_type=True) for v in value]
            return [kind.__name__, sorted(items)]
        if isinstance(value, tuple) and hasattr(kind, "_fields"):  # a namedtuple
            return ["namedtuple", self.cls(kind), [self.value(v, f"{where}.{f}", depth + 1) for f, v in zip(kind._fields, value)]]
        return self._object(value, where, depth)

    def _tensor(self, tensor: torch.Tensor, where: str) -> list:
        index = self.state_ids.get(id(tensor))
        if index is not None:
            return ["state", index]
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise _Uncacheable(f"{where} is a {type(tensor).__name__} (tensor subclass)")
        try:
            blob = tensor_to_weight_blob(tensor, name=where)
        except PayloadError as exc:
            raise _Uncacheable(str(exc)) from None
        self.keyed_tensors.add(id(tensor))
        return ["tensor", _tensor_spec(tensor), blob.content_hash()]

    def _callable(self, value: Any, where: str, depth: int) -> list:
        if isinstance(value, functools.partial):
            return ["partial", self.value(value.func, where, depth + 1),
                    self.value(list(value.args), where, depth + 1), self.value(dict(value.keywords), where, depth + 1)]
        if isinstance(value, types.MethodType):
            return ["method", self.value(value.__self__, f"{where}.__self__", depth + 1),
                    self.value(value.__func__, where, depth + 1)]
        ref = self._seen(value)
        if ref is not None:
            return ref
        code = value.__code__
        filename = code.co_filename
        if _LIBRARY.kind(filename) == "pseudo":
            # Generated code (dataclass methods) is keyed by its bytecode below; the names it
            # reads live in the module whose namespace it was made in.
            filename = value.__globals__.get("__file__")
        self._add_file(filename, value.__qualname__)
        closure = [self.value(_cell_contents(cell), f"{where} closure", depth + 1) for cell in value.__closure__ or ()]
        return ["function", value.__module__, value.__qualname__, hashlib.sha256(marshal.dumps(code)).hexdigest(),
                self.value(value.__defaults__, f"{where} defaults", depth + 1),
                self.value(value.__kwdefaults__, f"{where} kwdefaults", depth + 1), closure]

    def _object(self, value: Any, where: str, depth: int) -> list:
        kind = type(value)
        attributes = getattr(value, "__dict__", None)
        if type(attributes) is not dict or any("__slots__" in vars(k) for k in kind.__mro__ if k is not object):
            raise _Uncacheable(f"{where}: cannot describe a {kind.__module__}.{kind.__qualname__}")
        if kind.__module__ == "builtins":
            raise _Uncacheable(f"{where}: cannot describe a {kind.__qualname__}")
        return ["object", self.cls(kind),
                [[k, self.value(v, f"{where}.{k}", depth + 1)] for k, v in attributes.items()]]


def _cell_contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return ["empty cell"]


def _check_constants(lowered: Any, num_state: int, keyed: set[int]) -> None:
    """Every constant the graph captured is keyed: described by contents (a module attribute,
    a closure), or made by ``forward`` from literals (its only users are ``lift_fresh_copy``)."""
    placeholders = [n for n in lowered.graph_module.graph.nodes if n.op == "placeholder"]
    for position in range(num_state, len(lowered.weights)):
        if id(lowered.weights[position]) in keyed:
            continue
        users = list(placeholders[position].users)
        if users and all(u.target is torch.ops.aten.lift_fresh_copy.default for u in users):
            continue
        raise _Uncacheable(
            f"the graph captures the tensor {lowered.weight_names[position]!r}, which is neither a module attribute "
            "nor made in forward (a global?)")


# ---------------------------------------------------------------------------------------------
# Source files


class _Library:
    """Which source files the versions in the key cover: torch's, the standard library's (not
    site-packages) and cgtree's. Everything else with a file is hashed; code without a file
    ("<string>", "<eval_with_key>") is "pseudo"."""

    def __init__(self) -> None:
        self._covered = tuple(self._dir(p) for p in (
            os.path.dirname(torch.__file__), os.path.dirname(cgtree.__file__), os.path.dirname(__file__)))
        paths = sysconfig.get_paths()
        self._stdlib = tuple({self._dir(paths[k]) for k in ("stdlib", "platstdlib") if paths.get(k)})
        site_dirs = {paths.get("purelib"), paths.get("platlib")}
        try:
            import site

            site_dirs.update(site.getsitepackages())
            site_dirs.add(site.getusersitepackages())
        except Exception:  # some embedded interpreters lack parts of site
            pass
        self._site = tuple(self._dir(p) for p in site_dirs if p)
        self._kinds: dict[str, str] = {}
        self._real: dict[str, str] = {}

    @staticmethod
    def _dir(path: str) -> str:
        return os.path.join(os.path.realpath(path), "")

    def real(self, filename: str) -> str:
        real = self._real.get(filename)
        if real is None:
            real = self._real[filename] = os.path.realpath(filename)
        return real

    def kind(self, filename: str) -> str:
        kind = self._kinds.get(filename)
        if kind is None:
            if filename.startswith("<"):
                kind = "library" if filename.startswith("<frozen ") else "pseudo"
            else:
                real = self.real(filename)
                if real.startswith(self._covered):
                    kind = "library"
                elif real.startswith(self._stdlib) and not real.startswith(self._site):
                    kind = "library"
                else:
                    kind = "file"
            self._kinds[filename] = kind
        return kind


_LIBRARY = _Library()


@functools.lru_cache(maxsize=1)
def _warm_up_tracing() -> None:
    """Lower a trivial function once, so that the imports make_fx pulls in (dynamo, sympy:
    about a second) and the decomposition table are done before a traced miss is recorded."""
    from cgtree.client import lowering

    lowering.lower(lambda x: x + 1, [torch.zeros(1)])


def _file_sha256(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


class _SourceRecorder:
    """While active (one thread: the one lowering), the source files of Python code that runs,
    less the library's; imports are skipped (module bodies are not graph code). ``problem``
    says why the trace cannot be keyed, if it cannot."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.problem: Optional[str] = None
        self._seen: set[types.CodeType] = set()
        self._import_frame: Optional[types.FrameType] = None
        self._installed: Any = None

    def __enter__(self) -> "_SourceRecorder":
        if sys.getprofile() is not None:
            self.problem = "a profiler is active (the trace's source files cannot be recorded)"
            return self
        self._installed = self._hook  # one bound-method object, to recognise it afterwards
        sys.setprofile(self._installed)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            if sys.getprofile() is not self._installed and self.problem is None:
                self.problem = "something replaced the profile hook during the trace (source files unknown)"
            sys.setprofile(None)
            self._installed = None

    def _hook(self, frame: types.FrameType, event: str, arg: Any) -> None:
        if event != "call":
            if event == "return" and frame is self._import_frame:
                self._import_frame = None
            return
        if self._import_frame is not None:
            return
        code = frame.f_code
        if code in self._seen:
            return
        filename = code.co_filename
        if filename.startswith("<frozen importlib"):
            self._import_frame = frame
            return
        kind = _LIBRARY.kind(filename)
        if kind != "pseudo":
            if kind == "file":
                self.files.add(_LIBRARY.real(filename))
            self._seen.add(code)
            return
        # Code without a source file: generated in a module's namespace (dataclass methods: the
        # defining file covers it), or called by library code (torch's fx code), else unkeyable.
        owner = frame.f_globals.get("__file__")
        if isinstance(owner, str) and not owner.startswith("<"):
            if _LIBRARY.kind(owner) == "file":
                self.files.add(_LIBRARY.real(owner))
            return
        caller = frame.f_back
        if caller is not None and _LIBRARY.kind(caller.f_code.co_filename) == "library":
            return
        if self.problem is None:
            self.problem = f"code without a source file ran during the trace ({filename}, {code.co_name})"
