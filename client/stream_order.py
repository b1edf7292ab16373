"""Stream-ordered outputs (opt-in): a doorbell run's outputs are handed back at the daemon's
answer, and the caller's CUDA stream, not its thread, waits for the device's done word.

Why: with the host wait (the default) a doorbell run returns only once the device wrote its done
word (``cgtree.daemon.doorbell``), so everything the caller does after the call (AOT's and
dynamo's epilogue, its own synchronize: ~30 us a call on the H200 host, docs/PERFORMANCE.md
15.6) waits for the device, where in process it overlaps the device's work. Here the client
enqueues ``cuStreamWaitValue32(stream, DONE[k], seq, EQ)`` on the caller's current stream and
returns: the outputs are ready on that stream, as any CUDA op's outputs are.

What it changes (hence opt-in: ``Client(stream_ordered_outputs=True)`` or
``CGTREE_STREAM_ORDERED_OUTPUTS=1``): a daemon that dies between its answer and the done word
leaves kernels queued behind a wait that will never pass. Releasing them would run them on
unfinished outputs (silently wrong values); keeping them hangs the stream for good. So this
process **aborts**, with a message on stderr, as soon as it sees the daemon gone while such a
wait is unresolved (the watcher thread here, or the next submit), as PyTorch's NCCL watchdog does
when a peer fails. With the host wait, the same crash costs one retried call instead.

Invariants:
- A wait is enqueued only on a page registered with this process's CUDA context
  (``cudaHostRegister``) and only after a check, once per device and process, that the driver's
  wait blocks until a host write and then passes; anything else keeps the host wait.
- Before any submit (``settle``, called by ``InputEncoder.settle``) every pending wait is
  resolved: its done word seen on the host, its stream synchronized (the caller's reads of the
  outputs the next run overwrites are done). So one run's wait is never pending when the
  daemon writes the next run's done word, which an ``EQ`` wait would miss.
- A page is unregistered and unmapped only after every stream that waited on it passed its wait
  (``keep``: a lane closed meanwhile hands its page over; the watcher releases it).
- Aborting needs both: the daemon observed gone (``cgtree.client.watch``) and the done word,
  read again after that, still unwritten. A daemon that stops gracefully synchronizes its
  devices first, so its words are written.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from cgtree.client.watch import Bound, observe_gone
from cgtree.daemon.doorbell import PAGE_BYTES, done_word
from cgtree.daemon.stream_write import driver_function

log = logging.getLogger("cgtree.client.stream_order")

ENV = "CGTREE_STREAM_ORDERED_OUTPUTS"
WAIT_VALUE_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
HOST_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped
WATCH_EVERY_S = 0.02  # how often the watcher looks while waits are pending
WATCH_AFTER_S = 0.005  # a wait younger than this is not looked into yet (most resolve sooner)
SPIN_S = 200e-6  # settle's spin on an unwritten done word before it sleeps between looks
SLEEP_S = 50e-6
GONE_CHECK_EVERY_S = 0.002


def stream_order_policy(option: Optional[bool], environ: Mapping[str, str]) -> tuple[bool, str]:
    """Whether a client hands doorbell outputs back stream-ordered, and why."""
    if option is not None:
        return bool(option), f"Client(stream_ordered_outputs={bool(option)})"
    value = environ.get(ENV, "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True, f"{ENV}={value}"
    if value in ("", "0", "off", "false", "no"):
        return False, "the default: outputs are returned once the device finished them"
    raise ValueError(f"{ENV}={value!r}: expected 1/on/true or 0/off/false")


# ------------------------------------------------------------------------------ the driver


@dataclass
class Driver:
    """The driver calls a stream-ordered run needs (``libcuda.so.1``, through ctypes)."""

    wait_value32: Callable  # (CUstream, CUdeviceptr, value, flags) -> CUresult
    stream_synchronize: Callable  # (CUstream) -> CUresult
    host_register: Callable[[int, int], int]  # (address, bytes) -> error
    host_unregister: Callable[[int], int]  # (address) -> error
    current_stream: Callable[[int], int]  # device index -> raw stream handle


_driver: Optional[Driver] = None
_driver_looked_up = False
_checked: dict[int, bool] = {}  # device index -> whether the driver's wait behaved (once per process)


def cuda_driver() -> Optional[Driver]:
    """The driver's calls, or None (no libcuda, no symbol: the host wait stays)."""
    global _driver, _driver_looked_up
    if _driver_looked_up:
        return _driver
    _driver_looked_up = True
    try:
        import torch

        wait = driver_function("cuStreamWaitValue32", [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint])
        synchronize = driver_function("cuStreamSynchronize", [ctypes.c_void_p])
        runtime = torch.cuda.cudart()
        _driver = Driver(wait, synchronize,
                         lambda address, size: int(runtime.cudaHostRegister(address, size, HOST_REGISTER_PORTABLE_MAPPED)),
                         lambda address: int(runtime.cudaHostUnregister(address)),
                         torch._C._cuda_getCurrentRawStream)
    except (OSError, AttributeError, ImportError, RuntimeError) as exc:
        log.info("no stream memory waits (%s): outputs wait on the host", exc)
    return _driver


def _check_waits(driver: Driver, device_index: int) -> bool:
    """On a page of our own: a wait for a value not yet there blocks its stream, and a host
    write of the value releases it. Once per device and process; False on anything else."""
    if device_index in _checked:
        return _checked[device_index]
    import mmap

    import torch

    _checked[device_index] = False
    page = mmap.mmap(-1, PAGE_BYTES)
    words = memoryview(page).cast("I")
    anchor = ctypes.c_char.from_buffer(page)
    address = ctypes.addressof(anchor)
    del anchor
    if driver.host_register(address, PAGE_BYTES) != 0:
        log.info("cuda:%d: cannot register a host page: outputs wait on the host", device_index)
        return False
    released = blocked = False
    try:
        with torch.cuda.device(device_index):
            stream = torch.cuda.Stream(device_index)
            passed = torch.cuda.Event()
            words[0] = 0
            if driver.wait_value32(stream.cuda_stream, address, 1, WAIT_VALUE_EQ) != 0:
                return False
            passed.record(stream)
            time.sleep(0.005)
            blocked = not passed.query()
            words[0] = 1
            deadline = time.monotonic() + 2.0
            while not (released := passed.query()) and time.monotonic() < deadline:
                time.sleep(0.001)
    except Exception as exc:  # noqa: BLE001 - an optimization: any failure keeps the host wait
        log.info("cuda:%d: stream memory waits unusable (%s): outputs wait on the host", device_index, exc)
        return False
    finally:
        words[0] = 1  # whatever happened, nothing may still wait on this page
        if released:
            driver.host_unregister(address)
            words.release()
            page.close()
        # else: a wait that never passed may still read the page; it stays registered and mapped
    _checked[device_index] = ok = blocked and released
    log.info("cuda:%d: %s", device_index, "stream-ordered outputs by cuStreamWaitValue32" if ok
             else "the driver's stream wait did not block and release as it should: outputs wait on the host")
    return ok


# ------------------------------------------------------------------------------ the waits


@dataclass(slots=True)
class PendingWait:
    """A caller's stream waiting on one run's done word."""

    doorbell: Any  # cgtree.client.doorbell.ClientDoorbell
    device_index: int  # the daemon's device, whose done word it is
    seq: int
    stream: int  # the raw stream the wait is on
    cuda_index: int  # that stream's device in this process
    bound: Optional[Bound]  # the daemon as the client's watch saw it
    since: float = field(default_factory=time.monotonic)

    def done(self) -> bool:
        return self.doorbell.done(self.device_index, self.seq)


def _abort(message: str) -> None:
    try:
        os.write(2, (message + "\n").encode("utf-8", "replace"))
    finally:
        os.abort()


class StreamOrder:
    """A client's stream-ordered outputs: the option, the waits now pending, their watcher."""

    def __init__(self, option: Optional[bool], watch_path: Optional[str],
                 environ: Mapping[str, str] = os.environ, abort: Callable[[str], None] = _abort,
                 driver: Callable[[], Optional[Driver]] = cuda_driver,
                 check: Callable[[Driver, int], bool] = _check_waits) -> None:
        self.enabled, self.reason = stream_order_policy(option, environ)
        self.runs = 0  # runs handed back before their done word
        self._watch_path = watch_path
        self._abort = abort
        self._driver_source, self._check = driver, check
        self._driver: Optional[Driver] = None
        self._usable: dict[int, bool] = {}  # CUDA device index -> whether its streams can wait
        self._pending: list[PendingWait] = []
        self._registered: dict[int, Any] = {}  # id(doorbell) -> doorbell registered with CUDA
        self._hangup: dict[int, int] = {}  # id(doorbell) -> a duplicate of its lane's socket
        self._kept: list[Any] = []  # doorbells whose lanes closed while a stream waited on them
        self._lock = threading.Lock()
        self._watcher: Optional[threading.Thread] = None
        self._stopped = threading.Event()

    def describe(self) -> dict:
        return {"enabled": self.enabled, "reason": self.reason, "runs": self.runs}

    def unfinished(self) -> int:
        """How many pending waits' done words are not written yet (the device is still on them)."""
        with self._lock:
            return sum(not wait.done() for wait in self._pending)

    # --------------------------------------------------------------------- the submit's side

    def wait_on_stream(self, doorbell: Any, lane_socket: Any, device_index: int, seq: int, cuda_index: int,
                       bound: Optional[Bound]) -> bool:
        """Make the caller's current stream on ``cuda_index`` wait for run ``seq``'s done word;
        False when it cannot (the caller then waits on the host)."""
        driver = self._usable_driver(cuda_index)
        if driver is None:
            return False
        key = id(doorbell)
        if key not in self._registered and not self._register(doorbell, lane_socket, driver):
            return False
        stream = driver.current_stream(cuda_index)
        address = doorbell.page_address() + 8 * done_word(device_index)
        if driver.wait_value32(stream, address, seq, WAIT_VALUE_EQ) != 0:
            return False
        with self._lock:
            self._pending.append(PendingWait(doorbell, device_index, seq, stream, cuda_index, bound))
        self.runs += 1
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="cgtree-stream-order", daemon=True)
            self._watcher.start()
        return True

    def settle(self) -> None:
        """Before a submit: every pending wait resolved (see the module's invariants). Resolved
        waits leave the list only afterwards: the watcher releases a kept page once none of its
        waits is listed, so not while this is still waiting for one of its streams."""
        if not self._pending:
            return
        with self._lock:
            pending = tuple(self._pending)
        for wait in pending:
            self._resolve(wait, skip_current_stream=True)
        resolved = {id(wait) for wait in pending}
        with self._lock:
            self._pending = [wait for wait in self._pending if id(wait) not in resolved]

    def close(self) -> None:
        """Resolve every wait and release every page (the client is closing)."""
        self.settle()
        self._stopped.set()
        for doorbell in list(self._registered.values()):
            self._release(doorbell)

    def keep(self, doorbell: Any) -> bool:
        """``ClientDoorbell.keeper``: its lane is closing. True when a stream may still wait on the
        page (the watcher releases it later); else it is unregistered here and False."""
        if not self._drop_passed_waits(doorbell):
            with self._lock:
                self._kept.append(doorbell)
            return True
        self._unregister(doorbell)
        return False

    # --------------------------------------------------------------------- mechanism

    def _usable_driver(self, cuda_index: int) -> Optional[Driver]:
        usable = self._usable.get(cuda_index)
        if usable is None:
            if self._driver is None:
                self._driver = self._driver_source()
            usable = self._usable[cuda_index] = self._driver is not None and self._check(self._driver, cuda_index)
            if not usable:
                self.reason += f"; cuda:{cuda_index} cannot wait on the stream: the host waits"
        return self._driver if usable else None

    def _register(self, doorbell: Any, lane_socket: Any, driver: Driver) -> bool:
        error = driver.host_register(doorbell.page_address(), PAGE_BYTES)
        if error != 0:
            log.warning("cudaHostRegister of the doorbell page failed (%s): outputs wait on the host", error)
            return False
        key = id(doorbell)
        self._registered[key] = doorbell
        doorbell.keeper = self.keep
        try:  # the lane's hang-up, seen even once its owner closed its own descriptor
            self._hangup[key] = os.dup(lane_socket.fileno())
        except (OSError, AttributeError, ValueError):
            pass
        return True

    def _unregister(self, doorbell: Any) -> None:
        key = id(doorbell)
        if self._registered.pop(key, None) is None:
            return
        hangup = self._hangup.pop(key, None)
        if hangup is not None:
            os.close(hangup)
        if self._driver is not None:
            error = self._driver.host_unregister(doorbell.page_address())
            if error != 0:
                log.warning("cudaHostUnregister of a doorbell page failed (%s)", error)

    def _release(self, doorbell: Any) -> None:
        self._unregister(doorbell)
        doorbell.keeper = None
        doorbell.release()

    def _gone(self, wait: PendingWait) -> Optional[str]:
        hangup = self._hangup.get(id(wait.doorbell))
        if hangup is not None:
            poller = select.poll()
            poller.register(hangup, select.POLLHUP | select.POLLERR)
            if poller.poll(0):
                return "its submit lane hung up"
        if self._watch_path is None:
            return None
        return observe_gone(self._watch_path, wait.bound)

    def _resolve(self, wait: PendingWait, *, skip_current_stream: bool) -> None:
        """Block until ``wait``'s done word is written (aborting if the daemon is gone first),
        then until its stream passed it."""
        if not wait.done():
            spin_until = time.perf_counter() + SPIN_S
            next_check = 0.0
            while not wait.done():
                now = time.perf_counter()
                if now >= spin_until:
                    time.sleep(SLEEP_S)
                if now >= next_check:
                    next_check = now + GONE_CHECK_EVERY_S
                    self._abort_if_gone(wait)
        driver = self._driver
        if driver is None:
            return
        if skip_current_stream and driver.current_stream(wait.cuda_index) == wait.stream:
            return  # the submit's own settle synchronizes the current stream next
        driver.stream_synchronize(wait.stream)

    def _abort_if_gone(self, wait: PendingWait) -> None:
        reason = self._gone(wait)
        if reason is not None and not wait.done():  # read again: a stopping daemon writes first
            self._abort(f"cgtree: the daemon is gone ({reason}) while a CUDA stream of this process waits for "
                        f"the outputs of a submit it had answered (stream-ordered outputs: {self.reason}). "
                        "Those outputs will never be complete; this process aborts rather than run on them.")

    def _watch(self) -> None:
        while not self._stopped.wait(WATCH_EVERY_S):
            with self._lock:
                pending = list(self._pending)
                kept = list(self._kept)
            now = time.monotonic()
            for wait in pending:
                if now - wait.since >= WATCH_AFTER_S and not wait.done():
                    self._abort_if_gone(wait)
            for doorbell in kept:
                self._release_if_passed(doorbell)

    def _release_if_passed(self, doorbell: Any) -> None:
        if not self._drop_passed_waits(doorbell):
            return
        with self._lock:
            self._kept = [kept for kept in self._kept if kept is not doorbell]
        self._release(doorbell)

    def _drop_passed_waits(self, doorbell: Any) -> bool:
        """When every wait on ``doorbell``'s page has its done word: wait until their streams
        passed them (they read the page no more), forget them, True. Else False, nothing done."""
        with self._lock:
            waits = [wait for wait in self._pending if wait.doorbell is doorbell]
        if any(not wait.done() for wait in waits):
            return False
        for wait in waits:
            self._resolve(wait, skip_current_stream=False)  # the word is written: this waits for the stream only
        with self._lock:
            self._pending = [wait for wait in self._pending if wait.doorbell is not doorbell]
        return True
