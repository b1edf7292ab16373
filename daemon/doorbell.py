"""Doorbells: one page of shared memory per submit lane, through which the client rings a plan
run (``cgtree.daemon.plans``) and the daemon answers it, with no socket on the way; on CUDA the
GPU itself writes "done" into the page when the run's outputs are ready.

Why: a plan run over the lane is two datagrams (syscalls and wake-ups, ~15-20 us each on the
H200 host) and a host synchronize in the daemon before its reply, all serialized with the GPU
work: the GPT step spent ~150 us of CPU time around 418 us of GPU time (docs/PERFORMANCE.md
section 8). With a doorbell the spinning daemon sees the request within a microsecond, launches
the replay, enqueues the done-write behind it on the same stream (a driver stream memory
write where it works, ``cgtree.daemon.stream_write``; else a fill kernel) and answers at once; the
client builds its outputs while the GPU runs and spins on the done word. Measured on the H200
host (``benchmarks/doorbell_latency.py``): the other process sees the GPU's write ~1 us *before*
the writing process's own event synchronize returns; the write costs ~8 us of CPU (a fill
kernel), overlapped with the GPU work it follows.

Layout (u64 words, little endian; each writer owns its own 64-byte lines):

- word 0 ``REQUEST`` (client): ``plan id << 32 | seq``, one aligned store. ``seq`` is the
  request's number (1..2**32-1, never 0), also its request id on the lane. Bit 63 set: a
  *gated* request (plan ids below 2**31), launched only once word 1 says so.
- word 1 ``VERDICT`` (client, gated requests): ``verdict << 32 | seq``, ``LAUNCH`` or ``VETO``,
  stored once the client finished the checks the run depends on.
- words 8-11 (daemon): ``generation``, ``node id + 1`` (0: none), the daemon's time in ns,
  the device index whose done word to wait on; then word 12 ``ACK``: ``status << 32 | seq``,
  stored last.
- word 16 ``AWAKE`` (daemon): 1 while its loop looks at this page without being told.
- word 20 ``FEATURES`` (daemon, written before the page is handed over): bit 0, gated requests
  are understood (a page of an older daemon reads 0: the client does not gate).
- word ``24 + 8 k`` ``DONE[k]`` (device k's stream on CUDA, the daemon on CPU): the ``seq`` of
  the last run on device k whose outputs are ready.

Protocol (one request in flight per lane: the client holds its lock):
1. The client stores ``REQUEST``, then reads ``AWAKE``: 0 (the loop sleeps) and it sends one
   ``KICK`` datagram on the lane at once, so that the daemon wakes while the client checks and
   builds. (Sending a sleeping daemon the plan request on the lane instead, as clients once did,
   costs the same wake-up plus a host synchronize in the daemon and a reply datagram, about
   130 us more on the H200 host; a client calling less often than every ``daemon.spin_us``
   paid it on most calls.)
2. It spins on ``ACK``. Should the daemon fall asleep in between (it clears ``AWAKE``, then
   looks at every page once more; a store can still be in flight), the client sees ``AWAKE`` 0
   while waiting and, unless it kicked in step 1, sends one ``KICK``: the daemon wakes up and
   looks at the page. A request is never sent twice.
3. ``ACK`` ``REPLAYED``: the outputs are in the plan's slots once ``DONE[device] == seq``.
   ``ACK`` ``ON_LANE``: the full reply (a recording, a skip, an error) is on the lane, with
   ``seq`` as its request id, sent before the ack was stored.
   ``ACK`` ``ABORTED`` (gated requests only): nothing ran; the client vetoed the launch, or its
   verdict did not come within ``GATE_WAIT_MAX_S`` of the daemon reaching the launch.

Gated requests: why and how. A submit of a graph that writes its inputs (a decoder step writing
its KV caches) must not launch before the client checked that the inputs are the plan's and no
weight changed since upload (``cgtree.client.compile_backend``); those checks cost ~20 us of
Python on the GPT step, and the daemon's own work before the launch (wake, dispatch, the tree's
decisions) about as much. A gated request overlaps them: the client rings first and checks
after; the daemon does everything up to the launch (``TreeManager.launch_gate``: pure decisions,
nothing run or changed), then reads ``VERDICT``, spinning at most ``GATE_WAIT_MAX_S`` for it. A
veto, or no verdict in time, leaves the tree as it was and is acked ``ABORTED``; a verdict stored
after that is never read (the daemon reads ``VERDICT`` only for the request it is gating). So
one slow client costs the loop at most ``GATE_WAIT_MAX_S``, and never makes it run unchecked.

Invariants:
- Only x86-64 (total store order): a reader that sees a word sees every store its writer made
  before it. Elsewhere doorbells are off (``doorbell_policy``); the lane serves instead.
- The daemon reads nothing from the page but ``REQUEST``; a garbled request is a plan id that
  is not the session's (``plan_expired`` on the lane) or a sequence number already answered.
- A CUDA page stays registered (page-locked, mapped for the GPU) until every device that may
  write it is synchronized; only then is it unregistered and unmapped.
- The page is a memfd handed to the client over the lane (SCM_RIGHTS) at the handshake: no
  file name, no other process can open it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
import time
from typing import Any, Optional

import torch

from cgtree.daemon.stream_write import StreamWriter
from cgtree.errors import LaunchVetoed

log = logging.getLogger("cgtree.daemon.doorbell")

PAGE_BYTES = 4096
REQUEST = 0
VERDICT = 1
REPLY = 8  # generation, node id + 1, daemon ns, device index
ACK = 12
AWAKE = 16
FEATURES = 20
DONE = 24
DONE_STRIDE = 8  # one 64-byte line per device
MAX_DEVICES = (PAGE_BYTES // 8 - DONE) // DONE_STRIDE
SEQ_MASK = 0xFFFFFFFF

REPLAYED = 1
ON_LANE = 2
ABORTED = 3

GATED = 1 << 63  # in REQUEST
MAX_GATED_PLAN_ID = (1 << 31) - 1
LAUNCH = 1  # VERDICT values
VETO = 2
FEATURE_GATE = 1
# How long the daemon, having reached a gated run's launch, waits for the client's verdict. The
# client's checks take ~20 us on the H200 host for the GPT step and start before the daemon's
# ~30 us of decisions: a verdict usually waits for the daemon, not the other way round. The bound
# is what one slow (or dead) client may cost everyone else on the loop, per gated request.
GATE_WAIT_MAX_S = 200e-6

KICK_MAGIC = b"\xc1PK1"  # a lane datagram: "look at my doorbell" (no reply)
HANDSHAKE_OFFER = b"doorbell"  # second frame of the lane handshake's "ok" when a memfd comes with it

_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02
_host_mapping_checked: dict[int, bool] = {}  # device index -> the GPU's writes reach the page


def doorbell_policy(mode: str, *, serves_cuda: bool, spins: bool, machine: Optional[str] = None) -> tuple[bool, str]:
    """Whether sessions get doorbells, and why (config ``daemon.doorbell``: auto, on, off)."""
    machine = platform.machine() if machine is None else machine
    if mode == "off":
        return False, "daemon.doorbell = off"
    if machine not in ("x86_64", "AMD64"):
        return False, f"doorbells need x86-64's store order; this is {machine}"
    if mode == "on":
        return True, "daemon.doorbell = on"
    if not serves_cuda:
        return False, "CPU replay backends answer on the lane (daemon.doorbell = on to force)"
    if not spins:
        return False, "daemon.spin_us = 0: a sleeping daemon would need a kick for every request"
    return True, "CUDA daemon that spins"


def pack_request(seq: int, plan_id: int, gated: bool = False) -> int:
    return (GATED if gated else 0) | (plan_id << 32) | seq


def pack_verdict(seq: int, launch: bool) -> int:
    return ((LAUNCH if launch else VETO) << 32) | seq


def pack_ack(status: int, seq: int) -> int:
    return (status << 32) | seq


def next_seq(seq: int) -> int:
    """The sequence number after ``seq``: 1..2**32-1, never 0 (a fresh page's words)."""
    return seq % SEQ_MASK + 1


def is_kick(frames: list) -> bool:
    return len(frames) == 1 and bytes(frames[0]) == KICK_MAGIC


def done_word(device_index: int) -> int:
    if not 0 <= device_index < MAX_DEVICES:
        raise ValueError(f"device index {device_index} has no done word (at most {MAX_DEVICES} devices)")
    return DONE + DONE_STRIDE * device_index


def map_page(fd: int) -> tuple[mmap.mmap, memoryview]:
    """``fd``'s page mapped shared, and its u64 words."""
    page = mmap.mmap(fd, PAGE_BYTES, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return page, memoryview(page).cast("Q")


def unmap_page(page: mmap.mmap, words: memoryview) -> None:
    words.release()
    page.close()


class Doorbell:
    """The daemon's end of one lane's page. ``fd`` is for the handshake (closed once sent)."""

    def __init__(self, cuda_devices: list) -> None:
        self.fd: Optional[int] = os.memfd_create("cgtree-doorbell", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, PAGE_BYTES)
            self._page, self._words = map_page(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self._words[FEATURES] = FEATURE_GATE
        self._served = 0  # the last seq taken (a fresh page's REQUEST is 0: nothing rung)
        self._flags: dict[int, torch.Tensor] = {}  # device index -> the CUDA view of its DONE word
        self._writers: dict[int, Optional[StreamWriter]] = {}  # device index -> its memop writer (None: fill_)
        self._address: Optional[int] = None  # set while registered with CUDA
        self.in_flight: dict[int, int] = {}  # device index -> seq signalled but maybe not yet done
        if cuda_devices:
            try:
                self._register(cuda_devices)
            except BaseException:
                self.close()
                raise

    def _register(self, cuda_devices: list) -> None:
        anchor = ctypes.c_char.from_buffer(self._page)
        address = ctypes.addressof(anchor)
        del anchor  # only the address is kept: the mapping outlives it until close()
        error = torch.cuda.cudart().cudaHostRegister(address, PAGE_BYTES, _CUDA_HOST_REGISTER_PORTABLE_MAPPED)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister of the doorbell page failed ({error})")
        self._address = address
        for device in cuda_devices:
            index = torch.device(device).index
            # Mapped host memory is reached at its host address on 64-bit unified addressing;
            # checked once per device by a write through the GPU (an exception: off).
            storage = torch._C._construct_storage_from_data_pointer(address + 8 * done_word(index), torch.device("cuda", index), 8)
            flag = torch.empty(0, dtype=torch.int64, device=torch.device("cuda", index)).set_(storage, 0, (1,), (1,))
            if not _host_mapping_checked.setdefault(index, _check_host_mapping(flag, self._words, done_word(index))):
                raise RuntimeError(f"the GPU's writes to a mapped page do not reach the host on cuda:{index}")
            self._flags[index] = flag
            self._writers[index] = StreamWriter.for_device(index, address + 8 * done_word(index),
                                                           lambda word=done_word(index): self._words[word])

    @property
    def words(self) -> memoryview:
        return self._words

    def handed_over(self) -> None:
        """The client has the fd (or never will): the mapping alone keeps the page."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def take(self) -> Optional[tuple[int, int, bool]]:
        """The request rung since the last one taken, as (seq, plan id, gated); None when none."""
        word = self._words[REQUEST]
        seq = word & SEQ_MASK
        if seq == self._served or seq == 0:
            return None
        self._served = seq
        return seq, (word >> 32) & ~(GATED >> 32), bool(word & GATED)

    def await_verdict(self, seq: int, within_s: float) -> Optional[bool]:
        """Gated request ``seq``'s verdict: True (launch), False (veto), None (none within
        ``within_s``: the caller does not launch, and no later verdict is read)."""
        words = self._words
        wanted = seq & SEQ_MASK
        deadline = None
        while (word := words[VERDICT]) & SEQ_MASK != wanted:
            now = time.perf_counter()
            if deadline is None:
                deadline = now + within_s
            elif now >= deadline:
                return None
        return word >> 32 == LAUNCH

    def rung(self) -> bool:
        seq = self._words[REQUEST] & SEQ_MASK
        return seq != self._served and seq != 0

    def set_awake(self, awake: bool) -> None:
        self._words[AWAKE] = 1 if awake else 0

    def signal_done(self, runtime: Any, seq: int) -> None:
        """Behind everything enqueued so far on ``runtime``'s current stream: ``DONE = seq``."""
        index = runtime.device.index if runtime.is_cuda else 0
        if runtime.is_cuda:
            writer = self._writers[index]  # raises KeyError for a device the page was not mapped for
            if writer is None or not writer.write(seq):
                self._flags[index].fill_(seq)
            self.in_flight[index] = seq
        else:
            self._words[done_word(index)] = seq  # the CPU backend's run has finished

    def settled(self) -> bool:
        """Whether every done word signalled has been written (no GPU call)."""
        words = self._words
        return all(words[done_word(index)] == seq for index, seq in self.in_flight.items())

    def answer(self, seq: int, status: int, *, generation: int = 0, node_id: Optional[int] = None,
               daemon_us: float = 0.0, device_index: int = 0) -> None:
        words = self._words
        words[REPLY] = generation
        words[REPLY + 1] = 0 if node_id is None else node_id + 1
        words[REPLY + 2] = max(0, int(daemon_us * 1000))
        words[REPLY + 3] = device_index
        words[ACK] = pack_ack(status, seq)  # last: the client reads the reply once it sees this

    def close(self) -> None:
        """Unregister and unmap. The caller has synchronized every device that may write here."""
        self._flags.clear()
        self._writers.clear()
        self.in_flight.clear()
        if self._address is not None:
            error = torch.cuda.cudart().cudaHostUnregister(self._address)
            if int(error) != 0:
                log.warning("cudaHostUnregister of a doorbell page failed (%s)", error)
            self._address = None
        if self._words is not None:
            unmap_page(self._page, self._words)
            self._words = None
        self.handed_over()


class LaunchGate:
    """A gated request's gate, handed to the tree manager (``TreeManager.launch_gate``) for the
    plan run: called where the run would launch, it passes once the client's verdict says launch,
    and raises ``LaunchVetoed`` on a veto or when none came in time (``refusal`` says which).
    Passing is once per request: a second call (the general run after an in-place recording
    refused the outputs) goes through at once; a refused gate stays refused."""

    __slots__ = ("_doorbell", "seq", "passed", "refusal")

    def __init__(self, doorbell: Doorbell, seq: int) -> None:
        self._doorbell, self.seq = doorbell, seq
        self.passed = False
        self.refusal: Optional[str] = None  # "vetoed" or "late"

    def __call__(self) -> None:
        if self.passed:
            return
        if self.refusal is None:
            verdict = self._doorbell.await_verdict(self.seq, GATE_WAIT_MAX_S)
            if verdict:
                self.passed = True
                return
            self.refusal = "late" if verdict is None else "vetoed"
        raise LaunchVetoed(f"gated request {self.seq}: " + (
            "the client vetoed the launch" if self.refusal == "vetoed"
            else f"no verdict within {GATE_WAIT_MAX_S * 1e6:.0f} us of the launch"))


def _check_host_mapping(flag: torch.Tensor, words: memoryview, word: int) -> bool:
    marker = 0x5EED_D00B
    flag.fill_(marker)
    torch.cuda.synchronize(flag.device)
    reached = words[word] == marker
    flag.fill_(0)
    torch.cuda.synchronize(flag.device)
    if not reached:
        log.warning("%s: a GPU write to a registered host page did not reach the host: no doorbells", flag.device)
    return reached


def unpack_reply(words: memoryview) -> tuple[int, Optional[int], float, int]:
    """(generation, node id, daemon_us, device index) of the reply line (read after ``ACK``)."""
    node = words[REPLY + 1]
    return words[REPLY], (node - 1 if node else None), words[REPLY + 2] / 1000.0, words[REPLY + 3]

