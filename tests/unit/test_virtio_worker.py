"""Tests for the device worker thread and the shared queue-device lifecycle (nubis.virtio.worker)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import pytest

from nubis.memory import GuestMemory
from nubis.virtio.device import DeviceType, InterruptKind
from nubis.virtio.mock import MockDriver
from nubis.virtio.queue import DescriptorChain, QueueError
from nubis.virtio.worker import QueueDevice, Worker, clear_eventfd


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, 0x40000)])
    yield mem
    mem.close()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def test_worker_runs_callbacks_and_stops() -> None:
    fd = _eventfd()
    seen = threading.Semaphore(0)
    calls: list[str] = []

    def callback() -> None:
        clear_eventfd(fd)
        calls.append("fd")
        seen.release()

    worker = Worker("test", lambda exc: None)
    worker.add_fd(fd, callback)
    worker.start(lambda: calls.append("start"))
    os.eventfd_write(fd, 1)
    assert seen.acquire(timeout=30)
    worker.stop()
    assert not worker.running
    assert calls == ["start", "fd"]
    worker.stop()  # idempotent
    os.close(fd)


def test_stop_waits_for_the_callback_in_progress() -> None:
    fd = _eventfd()
    entered = threading.Event()
    release = threading.Event()
    finished: list[bool] = []

    def slow() -> None:
        clear_eventfd(fd)
        entered.set()
        release.wait()
        finished.append(True)

    worker = Worker("test", lambda exc: None)
    worker.add_fd(fd, slow)
    worker.start()
    os.eventfd_write(fd, 1)
    assert entered.wait(timeout=30)
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    release.set()
    stopper.join()
    assert finished == [True]
    os.close(fd)


def test_disabled_fd_is_not_polled() -> None:
    fd = _eventfd()
    other = _eventfd()
    calls: list[str] = []
    done = threading.Event()

    def on_fd() -> None:
        calls.append("fd")

    def on_other() -> None:
        clear_eventfd(other)
        calls.append("other")
        done.set()

    worker = Worker("test", lambda exc: None)
    worker.add_fd(fd, on_fd, enabled=False)
    worker.add_fd(other, on_other)
    worker.start()
    os.eventfd_write(fd, 1)  # readable but disabled: a busy loop would call on_fd forever
    os.eventfd_write(other, 1)
    assert done.wait(timeout=30)
    worker.stop()
    assert calls == ["other"]
    os.close(fd)
    os.close(other)


def test_an_edge_watched_eventfd_runs_once_per_write_burst_and_is_never_read() -> None:
    # A queue's notify eventfd is watched edge-triggered: one callback for the writes before
    # it, one more for a write during it, none while the counter merely stays non-zero (a
    # level-triggered watch of an unread eventfd would call back forever), and the same after
    # a pause and resume.
    fd = _eventfd()
    calls: list[int] = []
    entered = threading.Event()
    release = threading.Event()
    called = threading.Semaphore(0)

    def on_fd() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            entered.set()
            assert release.wait(timeout=30)
        called.release()

    worker = Worker("test", lambda exc: None)
    worker.add_fd(fd, on_fd, edge=True)
    worker.start()
    for _ in range(3):
        os.eventfd_write(fd, 1)
    assert entered.wait(timeout=30)
    os.eventfd_write(fd, 1)  # during the callback: reported again afterwards
    release.set()
    assert called.acquire(timeout=30) and called.acquire(timeout=30)
    assert not called.acquire(timeout=0.3)  # the counter is still 4, and nothing calls back
    worker.set_enabled(fd, False)
    worker.set_enabled(fd, True)  # resuming reports the unread counter once, still edge-wise
    assert called.acquire(timeout=30)
    assert not called.acquire(timeout=0.3)
    os.eventfd_write(fd, 1)
    assert called.acquire(timeout=30)
    worker.stop()
    assert os.eventfd_read(fd) == 5  # nobody read it
    assert calls == [0, 1, 2, 3]
    os.close(fd)


def test_callback_error_reaches_on_error_and_ends_the_thread() -> None:
    fd = _eventfd()
    errors: list[BaseException] = []
    reported = threading.Event()

    def boom() -> None:
        raise QueueError("bad ring")

    def on_error(exc: BaseException) -> None:
        errors.append(exc)
        reported.set()

    worker = Worker("test", on_error)
    worker.add_fd(fd, boom)
    worker.start()
    os.eventfd_write(fd, 1)
    assert reported.wait(timeout=30)
    worker.stop()
    assert len(errors) == 1 and isinstance(errors[0], QueueError)
    os.close(fd)


class Echo(QueueDevice):
    """A one-queue device that copies readable bytes into writable buffers."""

    def __init__(self) -> None:
        super().__init__("echo", [8])

    @property
    def device_type(self) -> DeviceType:
        return DeviceType.ENTROPY

    @property
    def avail_features(self) -> int:
        return 1 << 32

    def read_config(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write_config(self, offset: int, data: memoryview) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {}

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        assert self.memory is not None
        data = b"".join(bytes(v) for v in chain.readable_views(self.memory))
        done = 0
        for view in chain.writable_views(self.memory):
            piece = data[done : done + len(view)]
            view[: len(piece)] = piece
            done += len(piece)
        return done


def test_queue_device_processes_and_interrupts(memory: GuestMemory) -> None:
    device = Echo()
    driver = MockDriver(device, memory)
    driver.activate()
    mock = driver.queues[0]
    try:
        chain = mock.add_chain([b"ping"], [8])
        driver.notify(0)
        driver.wait_used(0, 1)
        assert mock.take_used() == [(chain.head, 4)]
        assert memory.read(chain.writable[0][0], 4) == b"ping"
        assert driver.interrupt.events == [(InterruptKind.QUEUE, 0)]
    finally:
        device.shutdown()
        driver.close()


def test_queue_error_logs_once_and_needs_reset(
    memory: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    device = Echo()
    driver = MockDriver(device, memory)
    driver.activate()
    mock = driver.queues[0]
    try:
        with caplog.at_level(logging.ERROR):
            mock.publish(9)  # beyond the queue size
            mock.publish(10)
            driver.notify(0)
            driver.wait_used(0, 1)
            driver.notify(0)
            device.reset()
        assert driver.needs_reset.is_set()
        messages = [r.getMessage() for r in caplog.records if "echo" in r.getMessage()]
        assert len(messages) == 1 and "needs a reset" in messages[0]
        assert not device.active and not device.failed
    finally:
        device.shutdown()
        driver.close()


def test_activation_checks(memory: GuestMemory) -> None:
    device = Echo()
    driver = MockDriver(device, memory)
    driver.device_queues[0].size = 3
    with pytest.raises(ValueError, match="power of two"):
        driver.activate()
    driver.device_queues[0].size = 8
    driver.activate()
    with pytest.raises(ValueError, match="already active"):
        driver.activate()
    device.shutdown()
    driver.close()


def test_notifications_before_activation_are_not_lost(memory: GuestMemory) -> None:
    device = Echo()
    driver = MockDriver(device, memory)
    chain = driver.queues[0].add_chain([b"x"], [1])
    driver.activate()  # no notify: activation processes what is already there
    try:
        driver.wait_used(0, 1)
        assert driver.queues[0].take_used() == [(chain.head, 1)]
    finally:
        device.shutdown()
        driver.close()
