"""Run a registered graph on the caller's inputs through this session's tree: warm up,
record or replay, and return the outputs.

Request: ``{"device": str, "graph": str, "inputs": [descriptor] | bin, "outputs"?: "device" |
"host"}``, CPU input bytes in the data frames. ``inputs`` may also be the msgpack encoding of
the descriptor list, as bytes: when the same bytes come again for the same graph (a loop over
the same CUDA buffers), the daemon reuses the inputs it decoded and checked the first time
(``cgtree.daemon.input_memo``). CPU inputs to a graph on a CUDA device are
uploaded by the daemon. ``outputs`` says where CUDA outputs go: ``device`` (an IPC-shared
buffer, below) or ``host`` (CPU copies in reply frames). Left out, it is ``host`` when no
input came as ``cuda`` or ``output`` (such a client may have no CUDA context at all: it
never has to create one, and costs no GPU memory) and ``device`` otherwise. Descriptors (see ``cgtree.daemon.tensors``): ``cpu`` (contiguous bytes in a
frame), ``cuda`` (a CUDA IPC export of the client's storage), ``output`` (an earlier output of
this session passed back in), ``scalar``. The client synchronizes its CUDA stream before
sending: the daemon reads CUDA inputs without waiting on any event.

The daemon copies non-static inputs into the recording's buffers (the tree manager does:
weights are the static inputs), runs the call, copies CUDA outputs into this (session, graph)'s
output buffer (normal memory outside the graph pool, exported once), host-synchronizes its
stream, then replies.

Reply: ``{"execution": {"mode": "warmup" | "recorded" | "replayed" | "skipped", "node_id":
int | None, "function": str, "skip_reason": str | None, "daemon_us": float}, "outputs": [descriptor],
"written_inputs"?: [{"input": int, ...cpu descriptor}], "plan"?: int,
"buffers": [{"id": int, "nbytes": int, "storage": IPC}]}``. ``daemon_us`` is the time
the command took in the daemon, synchronization included (the rest of a round trip is the
transport and the client). CPU outputs are ``cpu``
descriptors over reply frames (copies: the client owns them). CUDA outputs are ``output``
descriptors into a buffer listed in ``buffers``; they stay valid until this graph's next
submit in this session (which overwrites the buffer and bumps its ``generation``) or until
released. A buffer id that replaces an earlier one for the same graph means the old one is
freed: close its mapping.

``plan`` (offered when the inputs came packed and were remembered, and every output went to
the output buffer) names a prepared submit: ``PLAN_REQUEST(request id, plan)`` on the lane runs
this same submit again without an envelope (``cgtree.daemon.plans``; error ``plan_expired``
when it no longer applies).

Inputs the graph writes (``mutated_inputs`` at register) are written where the client sees
them, as the graph would in the client's own process: ``cuda`` and ``output`` inputs in place
(they are then static inputs of the recording: the graph writes the client's memory directly,
and a different buffer at that position later is a re-recording); ``cpu`` inputs are copies,
so their new contents come back in ``written_inputs`` (CPU descriptors over reply frames,
``input`` naming the position) and the client copies them in.

Errors: ``no_session``, ``unknown_device``, ``unknown_graph`` (not registered in this session
on that device), ``graph_compiling`` (registered but still being compiled: register it again
until it is registered), ``bad_tensor`` (naming the input index: wrong dtype, shape, strides, size,
device, stale handle, overwritten output, count), ``cuda_error``.
"""

from __future__ import annotations

import time

import torch

from cgtree.daemon.compiling import in_compiled_layout
from cgtree.daemon.graphs import check_graph_id
from cgtree.daemon.input_memo import memoizable
from cgtree.daemon.protocol import ProtocolError, Reply, field_of, unpack
from cgtree.daemon.tensors import (
    DTYPE_NAMES,
    OutputBuffer,
    cpu_frame_of,
    describe_cpu,
    layout_outputs,
    tensor_from_cpu_desc,
    tensor_from_cuda_desc,
    tensor_from_output_desc,
)

NAME = "submit"
NEEDS_SESSION = True

MAX_INPUTS = 4096


def execute(ctx, session, body, frames) -> Reply:
    received = time.perf_counter()
    runtime = ctx.device(field_of(body, "device", str))
    graph_id = check_graph_id(field_of(body, "graph", str))
    entry = session.graphs.get((runtime.name, graph_id))
    if entry is None:
        raise ProtocolError("unknown_graph", f"graph {graph_id} is not registered in this session on {runtime.name}: register it first")
    if entry.compiling is not None:
        raise ProtocolError("graph_compiling", f"graph {entry.display_name} is still being compiled on {runtime.name}: "
                                               "register it again until the reply says registered")
    state = ctx.session_device(session, runtime)
    raw = field_of(body, "inputs", (list, bytes))
    remembered = state.input_memo.get(graph_id, raw) if isinstance(raw, bytes) else None
    if remembered is not None:
        inputs, by_reference, in_place, write_back = remembered
    else:
        remembered = None
        descs = _descriptor_list(raw)
        # CUDA inputs may sit on any device this daemon serves: the tree manager of the graph's
        # device then decides (inputs on two devices run without graphs: "multiple devices").
        served_cuda = [rt.device.index for rt in ctx.devices.values() if rt.is_cuda]
        inputs = [decode_input(desc, i, frames, state, runtime, served_cuda) for i, desc in enumerate(descs)]
        check_inputs(entry, inputs)
        by_reference = any(isinstance(d, dict) and d.get("kind") in ("cuda", "output") for d in descs)
        in_place, write_back = mutation_plan(entry.mutated_inputs, [d.get("kind") for d in descs])
        if isinstance(raw, bytes) and memoizable(descs):
            remembered = (inputs, by_reference, in_place, write_back)
            state.input_memo.put(graph_id, raw, remembered)
    outputs_to = body.get("outputs")
    if outputs_to is None:
        outputs_to = "device" if by_reference else "host"
    elif outputs_to not in ("device", "host"):
        raise ProtocolError("bad_request", f"\"outputs\" must be \"device\" or \"host\", got {outputs_to!r}")

    function_key = (graph_id, in_place)
    fn = state.functions.get(function_key)
    if fn is None:
        # Weights are static; so are the inputs the graph writes that live in the client's (or
        # an output buffer's) memory: the graph writes them there, in place, as it would in
        # the client's own process. Another buffer at that position later is a re-recording.
        weights = len(entry.weights)
        # A graph that writes a CPU input writes the daemon's copy, which goes back to the client:
        # its ATen code runs then, so the tree sees those writes (compiled kernels would hide them).
        function = entry.decoded.module if write_back else entry.fn
        if function is not entry.decoded.module:  # inductor's code: contiguous inputs only
            function = in_compiled_layout(function, entry.decoded.module, weights, in_place)
        fn = state.manager.cudagraphify(
            function, [*entry.weights, *inputs], static_input_idxs=[*range(weights), *(weights + i for i in in_place)],
            name=entry.display_name, kind="inference", dynamic=entry.dynamic,
        )
        state.functions[function_key] = fn
    # A warmup (maybe an inductor compile) or a capture can take long: feed systemd's watchdog
    # on both sides of the call. Rate-limited, so replays send nothing.
    ctx.keepalive()
    outputs = fn(*entry.weights, *inputs)
    ctx.keepalive()
    written = [(i, inputs[i]) for i in write_back]
    reply = finish(ctx, session, state, runtime, graph_id, outputs, received, to_host=outputs_to == "host", written=written)
    del outputs
    # A plan stands for this submit only when its inputs are the memo's (packed, remembered).
    if remembered is not None and not written and plannable(reply, state, graph_id):
        plan = state.plans.offer(graph_id, raw, function_key, fn, entry.weights, inputs, state.output_buffers[graph_id])
        reply.body["plan"] = plan.plan_id
    return reply


def finish(ctx, session, state, runtime, graph_id, outputs, received: float, *, to_host: bool, written=()) -> Reply:
    """The end of every submit: outputs to the output buffer (or host copies), inputs written
    back, a host synchronize, the counters, the execution report."""
    execution = execution_dict(state.manager.last_execution)
    reply = encode_outputs(outputs, state, runtime, graph_id, ctx, to_host=to_host)
    if written:
        reply.body["written_inputs"] = encode_written_inputs(written, reply.frames)
    del outputs  # the tree must see replay outputs dead: nothing of the pool is kept here
    runtime.synchronize()  # the client reads the outputs as soon as it has the reply
    session.counters["submits"] += 1
    elapsed = time.perf_counter() - received
    ctx.metrics.observe_submit(elapsed, execution["mode"], execution["skip_reason"])
    execution["daemon_us"] = round(elapsed * 1e6, 1)
    reply.body["execution"] = execution
    return reply


def plannable(reply: Reply, state, graph_id: str) -> bool:
    """Whether a later identical submit can be a plan run (``cgtree.daemon.plans``): every
    output went to this graph's output buffer, nothing else travels in the reply."""
    buffer = state.output_buffers.get(graph_id)
    descs = reply.body.get("outputs") or []
    return (buffer is not None and not reply.frames and bool(descs)
            and all(d.get("kind") == "output" and d.get("buffer") == buffer.buffer_id for d in descs))


def mutation_plan(mutated_inputs, kinds) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where a graph's writes to its inputs go, by how each input travelled (a pure decision):
    ``in_place`` inputs are memory the client sees (``cuda``: its own, by IPC; ``output``: an
    output buffer it maps), written directly; ``write_back`` inputs (``cpu``) are copies the
    daemon made, whose new contents go back in the reply for the client to copy in."""
    in_place = tuple(i for i in mutated_inputs if i < len(kinds) and kinds[i] in ("cuda", "output"))
    write_back = tuple(i for i in mutated_inputs if i < len(kinds) and kinds[i] == "cpu")
    return in_place, write_back


def encode_written_inputs(written, frames: list) -> list:
    """CPU copies of the inputs the graph wrote (``write_back``), appended to ``frames``."""
    descs = []
    for index, tensor in written:
        copy = tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        descs.append({"input": index, **describe_cpu(copy, len(frames))})
        frames.append(cpu_frame_of(copy))
    return descs


def _descriptor_list(raw) -> list:
    if isinstance(raw, bytes):
        try:
            raw = unpack(raw)
        except Exception as exc:
            raise ProtocolError("bad_request", f"\"inputs\" bytes are not a msgpack descriptor list ({type(exc).__name__})") from None
        if not isinstance(raw, list):
            raise ProtocolError("bad_request", f"\"inputs\" bytes must encode a list, got {type(raw).__name__}")
    if len(raw) > MAX_INPUTS:
        raise ProtocolError("bad_request", f"{len(raw)} inputs (at most {MAX_INPUTS})")
    return raw


def decode_input(desc, index, frames, state, runtime, served_cuda=None):
    label = f"input {index}"
    if not isinstance(desc, dict):
        raise ProtocolError("bad_tensor", f"{label}: descriptor must be a map")
    kind = desc.get("kind")
    if kind == "cpu":
        tensor = tensor_from_cpu_desc(desc, frames, label)
        # The graph's buffers live on the device: upload here rather than skip graphs for a
        # "cpu device" input (the client may have no CUDA context at all).
        return tensor.to(runtime.device) if runtime.is_cuda else tensor
    if kind == "cuda":
        if not runtime.is_cuda:
            raise ProtocolError("bad_tensor", f"{label}: a CUDA tensor, but the graph runs on {runtime.name}")
        return tensor_from_cuda_desc(desc, state.ipc_imports, label, served_cuda or [runtime.device.index])
    if kind == "output":
        return tensor_from_output_desc(desc, state.buffers_by_id, label)
    if kind == "scalar":
        value = desc.get("value")
        if isinstance(value, (bool, int, float)):
            return value
        raise ProtocolError("bad_tensor", f"{label}: scalar value must be a bool, int or float")
    raise ProtocolError("bad_tensor", f"{label}: unknown descriptor kind {kind!r} (cpu, cuda, output, scalar)")


def check_inputs(entry, inputs) -> None:
    """Inputs against the graph's declared input specs: count always; dtype and (unless the
    graph is dynamic) shape. A mismatch names the input index."""
    specs = entry.input_specs
    if specs is None:
        return
    if len(inputs) != len(specs):
        raise ProtocolError("bad_tensor", f"graph {entry.short_name} takes {len(specs)} inputs, got {len(inputs)}")
    for index, (value, spec) in enumerate(zip(inputs, specs)):
        dtype = _spec_field(spec, "dtype")
        shape = _spec_field(spec, "shape")
        if not isinstance(value, torch.Tensor):
            if dtype is not None:
                raise ProtocolError("bad_tensor", f"input {index}: the graph expects a tensor, got a scalar")
            continue
        if dtype is not None and _dtype_text(dtype) != _dtype_text(value.dtype):
            raise ProtocolError("bad_tensor", f"input {index}: dtype {_dtype_text(value.dtype)}, the graph expects {_dtype_text(dtype)}")
        if shape is not None and not entry.dynamic:
            expected = [int(s) if isinstance(s, int) else None for s in shape]
            if len(expected) != value.dim() or any(e is not None and e != got for e, got in zip(expected, value.shape)):
                raise ProtocolError("bad_tensor", f"input {index}: shape {list(value.shape)}, the graph expects {list(shape)}")


def _spec_field(spec, name):
    if isinstance(spec, dict):
        return spec.get(name)
    return getattr(spec, name, None)


def _dtype_text(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    return str(dtype).replace("torch.", "")


def execution_dict(execution) -> dict:
    if execution is None:
        return {"mode": "skipped", "node_id": None, "function": "", "skip_reason": "no execution reported"}
    mode = getattr(execution, "mode", "")
    return {
        "mode": getattr(mode, "value", str(mode)),
        "node_id": getattr(execution, "node_id", None),
        "function": str(getattr(execution, "function", "")),
        "skip_reason": None if getattr(execution, "skip_reason", None) is None else str(execution.skip_reason),
    }


def encode_outputs(outputs, state, runtime, graph_id, ctx, *, to_host: bool = False) -> Reply:
    flat = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    descs: list = [None] * len(flat)
    frames: list = []
    on_device = []
    for i, value in enumerate(flat):
        if isinstance(value, torch.Tensor):
            if runtime.is_cuda and value.device == runtime.device and not to_host:
                on_device.append(i)
                continue
            # A copy the client owns: the tree's buffers are overwritten by the next call.
            copy = value.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
            descs[i] = describe_cpu(copy, len(frames))
            frames.append(cpu_frame_of(copy))
        elif value is None:
            descs[i] = {"kind": "none"}
        elif isinstance(value, (bool, int, float)):
            descs[i] = {"kind": "scalar", "value": value}
        else:
            raise TypeError(f"graph output {i} is a {type(value).__name__}; only tensors, None and numbers travel")
    buffers = []
    if on_device:
        tensors = [flat[i] for i in on_device]
        buffer = state.output_buffers.get(graph_id)
        if buffer is None or not buffer.fits(tensors):
            buffer = OutputBuffer(ctx.next_buffer_id(), runtime.device, *layout_outputs(tensors))
            state.replace_output_buffer(graph_id, buffer)
        for i, desc in zip(on_device, buffer.fill(tensors)):
            descs[i] = desc
        buffers.append(buffer.wire())
    return Reply({"outputs": descs, "buffers": buffers}, frames)
