"""Output descriptors -> tensors, and how long those tensors stay valid (``OutputBuffers``).

A submit reply describes each output: a CPU copy (in a data frame), a number, ``None``, or a view
of the graph's output buffer in the daemon (CUDA IPC). ``OutputBuffers`` opens each such buffer
once (``OutputMapping``), builds the views on it, and marks the views of the previous submit of
the same graph overwritten.

Invariants:
- An output is valid until the same graph's next submit in this session, or until released.
  CPU outputs are copies the client owns and never change. CUDA outputs are views of a
  daemon-owned buffer, built on fresh non-owning storages over the cached mapping, so marking
  one submit's views overwritten (``mark_overwritten``: touching them raises where the torch
  build can, ``CAN_RAISE_ON_OVERWRITTEN_OUTPUT``) touches no other submit's.
- A view never reaches outside its buffer (``_output_slot`` checks every descriptor).
- Closing a mapping (release, reset, a new daemon) drops the IPC storage, and the daemon's block
  leaves limbo; ``invalidate_all`` also forgets the prepared submits (each names a buffer).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from cgtree.client.errors import ClientError
from cgtree.client.registration import GraphHandle
from cgtree.daemon.tensors import (
    parse_geometry,
    parse_ipc,
    tensor_from_cpu_desc,
)
from cgtree.liveness import CAN_RAISE_ON_OVERWRITTEN_ACCESS, mark_overwritten, non_owning_storage, tensor_on
from cgtree.liveness import TensorGeometry as TensorLayout

CAN_RAISE_ON_OVERWRITTEN_OUTPUT = CAN_RAISE_ON_OVERWRITTEN_ACCESS
OVERWRITTEN_MESSAGE = (
    "cgtree: this output of graph {graph} was overwritten by a later submit of the same graph "
    "(or released, or its session ended). Outputs stay valid until the graph's next submit; "
    "clone() an output you want to keep."
)


@dataclass
class OutputMapping:
    """One daemon output buffer opened in this process (CUDA IPC), and what was built on it."""

    buffer_id: int
    device: torch.device
    storage: Any  # the owning IPC storage: keeps the mapping open
    base_ptr: int
    nbytes: int
    generation: int = 0
    handed_out: list = field(default_factory=list)  # weakrefs to the current generation's tensors


class OutputBuffers:
    """The daemon output buffers this client mapped, per graph, and the tensors built on them."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.mappings: dict[int, OutputMapping] = {}
        self.graph_buffer: dict[tuple[str, str], int] = {}

    def containing(self, ptr: int, device: torch.device) -> Optional[OutputMapping]:
        for mapping in self.mappings.values():
            if mapping.device == device and mapping.base_ptr <= ptr < mapping.base_ptr + mapping.nbytes:
                return mapping
        return None

    def decode(self, handle: GraphHandle, reply: dict, frames: list) -> list:
        key = (handle.device, handle.graph_id)
        buffers = {b["id"]: b for b in reply.get("buffers", [])}
        self.drop_graph_outputs(key, close_mapping=False)  # the previous submit's outputs are stale now
        previous = self.graph_buffer.get(key)
        current = next(iter(buffers), None)
        if previous is not None and previous != current:
            self.close_mapping(previous)
            self.graph_buffer.pop(key, None)
        mapping = None
        if current is not None:
            mapping = self.mappings.get(current) or self.open_mapping(buffers[current], handle.device)
            self.graph_buffer[key] = current
        outputs = []
        for index, desc in enumerate(reply.get("outputs", [])):
            kind = desc.get("kind")
            label = f"output {index}"
            if kind == "cpu":
                outputs.append(tensor_from_cpu_desc(desc, frames, label))
            elif kind == "output" and mapping is not None and desc.get("buffer") == mapping.buffer_id:
                mapping.generation = desc["generation"]
                tensor = self.view_of(mapping, desc, label)
                mapping.handed_out.append(weakref.ref(tensor))
                outputs.append(tensor)
            elif kind == "none":
                outputs.append(None)
            elif kind == "scalar":
                outputs.append(desc.get("value"))
            else:
                raise ClientError(f"{label}: the daemon sent an unexpected descriptor {desc!r}")
        return outputs

    def open_mapping(self, wire: dict, device: str) -> OutputMapping:
        torch.cuda._lazy_init()  # a graph with no CUDA inputs may be this process's first CUDA use
        args = parse_ipc(wire.get("storage"), f"output buffer {wire.get('id')}", None)
        local = torch.device(device)
        args = (local.index,) + args[1:]  # the daemon's index for this GPU may not be ours
        storage = torch.UntypedStorage._new_shared_cuda(*args)
        mapping = OutputMapping(int(wire["id"]), torch.device(device), storage, storage.data_ptr(), int(wire["nbytes"]))
        self.mappings[mapping.buffer_id] = mapping
        return mapping

    def view_of(self, mapping: OutputMapping, desc: dict, label: str) -> torch.Tensor:
        return self.view_at(mapping, _output_slot(desc, mapping, label))

    @staticmethod
    def view_at(mapping: OutputMapping, slot: tuple) -> torch.Tensor:
        layout, byte_offset, nbytes = slot
        # A fresh non-owning storage per submit: marking it stale later touches only these
        # tensors. One C++ call builds the tensor on CUDA (an empty tensor + set_ costs ~13 us).
        return tensor_on(non_owning_storage(mapping.base_ptr + byte_offset, max(nbytes, 1), mapping.device), layout)

    def drop_graph_outputs(self, key: tuple[str, str], *, close_mapping: bool) -> None:
        buffer_id = self.graph_buffer.get(key)
        mapping = self.mappings.get(buffer_id) if buffer_id is not None else None
        if mapping is None:
            return
        _mark_stale(mapping, OVERWRITTEN_MESSAGE.format(graph="g" + key[1][:12]))
        if close_mapping:
            self.close_mapping(buffer_id)
            self.graph_buffer.pop(key, None)

    def close_mapping(self, buffer_id: int) -> None:
        mapping = self.mappings.pop(buffer_id, None)
        if mapping is not None:
            mapping.storage = None  # closes the IPC mapping; the daemon's block leaves limbo

    def invalidate_all(self) -> None:
        self.client.plans.known.clear()  # each names an output buffer
        self.client.plans.hot.clear()
        for key in list(self.graph_buffer):
            self.drop_graph_outputs(key, close_mapping=True)
        self.mappings.clear()
        self.graph_buffer.clear()


def _mark_stale(mapping: "OutputMapping", message: str) -> None:
    """The tensors handed out over ``mapping`` were overwritten: touching one raises ``message``."""
    for ref in mapping.handed_out:
        tensor = ref()
        if tensor is not None:
            mark_overwritten(tensor, message)
    mapping.handed_out = []


def _output_slot(desc: dict, mapping: OutputMapping, label: str) -> tuple:
    """(layout, byte offset, bytes) of an ``output`` descriptor, checked against its buffer."""
    geometry = parse_geometry(desc, label, need_stride=True)
    nbytes = geometry.extent_bytes()
    byte_offset = desc.get("byte_offset")
    if not isinstance(byte_offset, int) or byte_offset < 0 or byte_offset + nbytes > mapping.nbytes:
        raise ClientError(f"{label}: outside its output buffer")
    layout = TensorLayout(geometry.dtype, geometry.shape, geometry.stride, geometry.offset, mapping.device)
    return layout, byte_offset, nbytes
