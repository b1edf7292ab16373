"""Stream-ordered outputs (``cgtree.client.stream_order``) without a GPU: the option, the waits'
bookkeeping, when the watcher aborts and when it must not, and the page kept past its lane.

The driver is a fake that records what would have been enqueued; the doorbell page is a real
one (``ClientDoorbell`` over a memfd), its done words written by the test as the device would.
The CUDA side (a real stream waiting, a real daemon killed mid-run) is in
``tests/gpu/test_stream_order_gpu.py``.
"""

import os
import socket
import threading
import time

import pytest

from cgtree.client.doorbell import ClientDoorbell
from cgtree.client.stream_order import ENV, WAIT_VALUE_EQ, Driver, StreamOrder, stream_order_policy
from cgtree.client.watch import Bound, file_identity
from cgtree.daemon.doorbell import PAGE_BYTES, done_word, map_page, unmap_page


def test_stream_ordered_outputs_are_opt_in():
    assert stream_order_policy(None, {})[0] is False
    assert stream_order_policy(None, {ENV: "1"}) == (True, f"{ENV}=1")
    assert stream_order_policy(None, {ENV: "off"})[0] is False
    assert stream_order_policy(False, {ENV: "1"})[0] is False  # the argument wins over the environment
    assert stream_order_policy(True, {})[0] is True
    with pytest.raises(ValueError, match=ENV):
        stream_order_policy(None, {ENV: "sometimes"})


class FakeDriver:
    """Records the driver calls; streams are numbers, the current one settable."""

    def __init__(self, wait_result: int = 0) -> None:
        self.waits, self.synchronized, self.registered, self.unregistered = [], [], [], []
        self.current = 7
        self.wait_result = wait_result

    def driver(self) -> Driver:
        return Driver(wait_value32=lambda stream, address, value, flags: self.waits.append((stream, address, value, flags))
                      or self.wait_result,
                      stream_synchronize=lambda stream: self.synchronized.append(stream) or 0,
                      host_register=lambda address, size: self.registered.append((address, size)) or 0,
                      host_unregister=lambda address: self.unregistered.append(address) or 0,
                      current_stream=lambda index: self.current)


class Page:
    """A doorbell page as both ends see it: the client's ``ClientDoorbell`` and the daemon's words."""

    def __init__(self) -> None:
        fd = os.memfd_create("test-doorbell")
        os.ftruncate(fd, PAGE_BYTES)
        self.daemon_page, self.daemon_words = map_page(os.dup(fd))
        self.doorbell = ClientDoorbell(fd)

    def write_done(self, device_index: int, seq: int) -> None:
        self.daemon_words[done_word(device_index)] = seq

    def close(self) -> None:
        self.doorbell.release()
        unmap_page(self.daemon_page, self.daemon_words)


class Aborted(Exception):
    pass


@pytest.fixture
def setup(tmp_path):
    socket_file = tmp_path / "cgtreed.sock"
    socket_file.write_text("")
    aborts: list[str] = []
    aborted = threading.Event()

    def abort(message: str) -> None:
        aborts.append(message)
        aborted.set()
        if threading.current_thread() is threading.main_thread():
            raise Aborted(message)  # the real one never returns: leave settle's wait

    fake = FakeDriver()
    order = StreamOrder(True, str(socket_file), abort=abort, driver=fake.driver, check=lambda driver, index: True)
    page = Page()
    lane_end, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bound = Bound(identity=file_identity(str(socket_file)))
    yield order, fake, page, (lane_end, daemon_end), bound, socket_file, aborts, aborted
    order._stopped.set()
    lane_end.close()
    daemon_end.close()
    if page.doorbell._words is not None:
        page.close()


def test_a_wait_is_enqueued_on_the_callers_stream_for_the_runs_done_word(setup):
    order, fake, page, (lane_end, _), bound, *_ = setup
    assert order.wait_on_stream(page.doorbell, lane_end, 0, 41, 0, bound)
    assert order.wait_on_stream(page.doorbell, lane_end, 1, 42, 0, bound)  # another device's word on the same page
    address = page.doorbell.page_address()
    assert fake.registered == [(address, PAGE_BYTES)], "the page is registered once"
    assert fake.waits[0] == (7, address + 8 * done_word(0), 41, WAIT_VALUE_EQ)
    assert fake.waits[1] == (7, address + 8 * done_word(1), 42, WAIT_VALUE_EQ)
    assert order.runs == 2 and order.unfinished() == 2
    page.write_done(0, 41)
    assert order.unfinished() == 1


def test_settle_waits_for_the_done_word_then_for_a_stream_other_than_the_current_one(setup):
    order, fake, page, (lane_end, _), bound, *_ = setup
    fake.current = 9
    order.wait_on_stream(page.doorbell, lane_end, 0, 5, 0, bound)  # on stream 9
    fake.current = 7  # the caller moved to another stream before the next submit
    writer = threading.Timer(0.05, page.write_done, (0, 5))
    started = time.monotonic()
    writer.start()
    order.settle()
    assert time.monotonic() - started >= 0.04, "settle returned before the device wrote the done word"
    assert fake.synchronized == [9], "the stream that waited is synchronized: its reads of the outputs are done"
    assert order.unfinished() == 0 and order._pending == []
    order.wait_on_stream(page.doorbell, lane_end, 0, 6, 0, bound)  # on the current stream 7
    page.write_done(0, 6)
    order.settle()
    assert fake.synchronized == [9], "the current stream is left to the submit's own synchronize"


def test_the_watcher_aborts_when_the_daemon_is_gone_before_the_done_word(setup):
    order, fake, page, (lane_end, _), bound, socket_file, aborts, aborted = setup
    order.wait_on_stream(page.doorbell, lane_end, 0, 11, 0, bound)
    time.sleep(0.1)
    assert not aborts, "a wait on a live daemon is left alone, however long"
    socket_file.unlink()  # the daemon went away (its socket file with it)
    assert aborted.wait(5.0), "the watcher never noticed"
    assert "the daemon is gone" in aborts[0] and "stream-ordered" in aborts[0]


def test_the_watcher_aborts_when_the_lane_hangs_up(setup):
    order, fake, page, (lane_end, daemon_end), bound, socket_file, aborts, aborted = setup
    order.wait_on_stream(page.doorbell, lane_end, 0, 12, 0, Bound(identity=None))
    daemon_end.close()  # a daemon whose process is not visible here: only its lane says it went
    assert aborted.wait(5.0)
    assert "hung up" in aborts[0]


def test_no_abort_when_the_done_word_came_before_the_daemon_left(setup):
    order, fake, page, (lane_end, daemon_end), bound, socket_file, aborts, aborted = setup
    order.wait_on_stream(page.doorbell, lane_end, 0, 13, 0, bound)
    page.write_done(0, 13)  # a daemon that stops synchronizes its devices first
    socket_file.unlink()
    daemon_end.close()
    time.sleep(0.2)
    order.settle()
    assert not aborts


def test_settle_aborts_rather_than_wait_forever_on_a_dead_daemon(setup):
    order, fake, page, (lane_end, _), bound, socket_file, aborts, aborted = setup
    order._stopped.set()  # the watcher out of the way: settle must find it itself
    order.wait_on_stream(page.doorbell, lane_end, 0, 14, 0, bound)
    socket_file.unlink()
    with pytest.raises(Aborted):
        order.settle()


def test_a_closed_lanes_page_stays_mapped_until_its_stream_passed_the_wait(setup):
    order, fake, page, (lane_end, _), bound, *_ = setup
    doorbell = page.doorbell
    order.wait_on_stream(doorbell, lane_end, 0, 21, 0, bound)
    doorbell.close()  # the lane closes (a timeout) while the caller's stream still waits
    assert doorbell._words is not None and fake.unregistered == [], "unmapped under a pending wait"
    page.write_done(0, 21)
    deadline = time.monotonic() + 5.0
    while doorbell._words is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert doorbell._words is None, "the watcher never released the page"
    assert fake.synchronized == [7] and fake.unregistered == [doorbell._address]
    unmap_page(page.daemon_page, page.daemon_words)


def test_a_lane_closed_with_no_pending_wait_unregisters_its_page_at_once(setup):
    order, fake, page, (lane_end, _), bound, *_ = setup
    order.wait_on_stream(page.doorbell, lane_end, 0, 31, 0, bound)
    page.write_done(0, 31)
    order.settle()
    page.doorbell.close()
    assert page.doorbell._words is None and fake.unregistered == [page.doorbell._address]
    unmap_page(page.daemon_page, page.daemon_words)


def test_without_a_working_wait_the_host_waits(tmp_path):
    fake = FakeDriver(wait_result=1)  # CUDA_ERROR_INVALID_VALUE
    order = StreamOrder(True, None, driver=fake.driver, check=lambda driver, index: True)
    page = Page()
    try:
        assert order.wait_on_stream(page.doorbell, None, 0, 3, 0, None) is False
        assert order.runs == 0 and order._pending == []
        refused = StreamOrder(True, None, driver=fake.driver, check=lambda driver, index: False)
        assert refused.wait_on_stream(page.doorbell, None, 0, 3, 0, None) is False
        assert "host waits" in refused.describe()["reason"]
        assert StreamOrder(True, None, driver=lambda: None).wait_on_stream(page.doorbell, None, 0, 3, 0, None) is False
    finally:
        order.close()
        page.close()
