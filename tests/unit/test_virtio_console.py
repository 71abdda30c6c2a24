"""Tests for virtio-console (nubis.virtio.console) with the mock driver."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nubis.memory import GuestMemory
from nubis.virtio.console import (
    CONFIG,
    MAX_PENDING_INPUT,
    RECEIVEQ,
    TRANSMITQ,
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_SIZE,
    Console,
)
from nubis.virtio.device import DeviceType, InterruptKind
from nubis.virtio.mock import MockDriver
from nubis.virtio.queue import VIRTQ_DESC_F_WRITE


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, 0x80000)])
    yield mem
    mem.close()


class Sink(io.BytesIO):
    """A writer that counts flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def test_config_layout_and_features() -> None:
    assert CONFIG.size == 12
    console = Console(size=(80, 25))
    try:
        assert console.device_type is DeviceType.CONSOLE
        assert console.avail_features >> VIRTIO_CONSOLE_F_SIZE & 1
        assert console.avail_features >> VIRTIO_CONSOLE_F_EMERG_WRITE & 1
        config = bytearray(16)
        console.read_config(0, memoryview(config))
        assert config == CONFIG.pack(80, 25, 1, 0) + bytes(4)
        rows = bytearray(2)
        console.read_config(2, memoryview(rows))
        assert rows == (25).to_bytes(2, "little")
        far = bytearray(b"\xff")
        console.read_config(-5, memoryview(far))
        assert far == b"\0"
    finally:
        console.shutdown()
    assert not Console().avail_features >> VIRTIO_CONSOLE_F_SIZE & 1


def test_emergency_write_goes_to_the_output() -> None:
    sink = Sink()
    console = Console(sink)
    console.write_config(8, memoryview(b"A\0\0\0"))
    console.write_config(0, memoryview(b"B\0"))
    assert sink.getvalue() == b"A"
    console.shutdown()


def test_transmit_reaches_the_writer(memory: GuestMemory) -> None:
    sink = Sink()
    console = Console(sink)
    driver = MockDriver(console, memory)
    driver.activate()
    tx = driver.queues[TRANSMITQ]
    try:
        a = tx.add_chain([b"hello, ", b"world"])
        b = tx.add_chain([b"\n"], indirect=True)
        driver.notify(TRANSMITQ)
        driver.wait_used(TRANSMITQ, 2)
        assert tx.take_used() == [(a.head, 0), (b.head, 0)]
        assert sink.getvalue() == b"hello, world\n"
        assert sink.flushes >= 1
        assert console.counters()["tx_bytes"] == 13
        assert (InterruptKind.QUEUE, TRANSMITQ) in driver.interrupt.events
    finally:
        console.shutdown()
        driver.close()


def test_transmit_without_writer_is_discarded(memory: GuestMemory) -> None:
    console = Console()
    driver = MockDriver(console, memory)
    driver.activate()
    try:
        driver.queues[TRANSMITQ].add_chain([b"lost"])
        driver.notify(TRANSMITQ)
        driver.wait_used(TRANSMITQ, 1)
        assert console.counters()["tx_dropped"] == 4
    finally:
        console.shutdown()
        driver.close()


def test_broken_writer_does_not_break_the_device(memory: GuestMemory) -> None:
    class Broken:
        def write(self, data: bytes) -> int:
            raise BrokenPipeError("gone")

        def flush(self) -> None:
            pass

    console = Console(Broken())
    driver = MockDriver(console, memory)
    driver.activate()
    try:
        driver.queues[TRANSMITQ].add_chain([b"x"])
        driver.queues[TRANSMITQ].add_chain([b"y"])
        driver.notify(TRANSMITQ)
        driver.wait_used(TRANSMITQ, 2)
        assert not console.failed
        assert console.output is None
    finally:
        console.shutdown()
        driver.close()


def test_fed_input_waits_for_receive_buffers(memory: GuestMemory) -> None:
    console = Console()
    driver = MockDriver(console, memory)
    console.feed(b"early")  # before activation: kept
    driver.activate()
    rx = driver.queues[RECEIVEQ]
    try:
        first = rx.add_chain([], [3])
        second = rx.add_chain([], [64])
        driver.notify(RECEIVEQ)
        driver.wait_used(RECEIVEQ, 2)
        assert rx.take_used() == [(first.head, 3), (second.head, 2)]
        assert memory.read(first.writable[0][0], 3) == b"ear"
        assert memory.read(second.writable[0][0], 2) == b"ly"
        console.feed(b"late")  # no buffers: waits
        third = rx.add_chain([], [64])
        driver.notify(RECEIVEQ)
        driver.wait_used(RECEIVEQ, 1)
        assert rx.take_used() == [(third.head, 4)]
        assert memory.read(third.writable[0][0], 4) == b"late"
        assert console.counters()["rx_bytes"] == 9
    finally:
        console.shutdown()
        driver.close()


def test_input_fd_is_read_only_when_buffers_exist(memory: GuestMemory) -> None:
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    console = Console(input_fd=read_end)
    driver = MockDriver(console, memory)
    driver.activate()
    rx = driver.queues[RECEIVEQ]
    try:
        os.write(write_end, b"typed")
        chain = rx.add_chain([], [16])
        driver.notify(RECEIVEQ)
        driver.wait_used(RECEIVEQ, 1)
        assert rx.take_used() == [(chain.head, 5)]
        assert memory.read(chain.writable[0][0], 5) == b"typed"
        # No receive buffers now: input stays in the pipe until the driver posts one.
        os.write(write_end, b"more")
        chain = rx.add_chain([], [16])
        driver.notify(RECEIVEQ)
        driver.wait_used(RECEIVEQ, 1)
        assert rx.take_used() == [(chain.head, 4)]
        os.close(write_end)  # end of file: the input fd is dropped, the device stays up
        rx.add_chain([], [16])
        console.feed(b"!")
        driver.notify(RECEIVEQ)
        driver.wait_used(RECEIVEQ, 1)
        assert not console.failed
    finally:
        console.shutdown()
        driver.close()
        os.close(read_end)


def test_feed_is_bounded() -> None:
    console = Console()
    console.feed(b"x" * (MAX_PENDING_INPUT + 10))
    assert console.counters()["rx_dropped"] == 10
    console.shutdown()


def test_resize_raises_a_config_interrupt(memory: GuestMemory) -> None:
    console = Console(size=(80, 24))
    driver = MockDriver(console, memory)
    driver.activate()
    try:
        console.set_size(132, 43)
        assert driver.interrupt.events[-1] == (InterruptKind.CONFIG, 0)
        config = bytearray(4)
        console.read_config(0, memoryview(config))
        assert config == CONFIG.pack(132, 43, 1, 0)[:4]
        with pytest.raises(ValueError):
            console.set_size(70000, 1)
    finally:
        console.shutdown()
        driver.close()


def test_activation_needs_both_queues(memory: GuestMemory) -> None:
    console = Console()
    driver = MockDriver(console, memory)
    driver.device_queues[TRANSMITQ].ready = False
    with pytest.raises(ValueError, match="queue 1 is not enabled"):
        driver.activate()
    assert not console.active
    console.shutdown()
    driver.close()


@settings(max_examples=60, deadline=None)
@given(
    table=st.lists(
        st.tuples(
            st.integers(0, 0x90000),
            st.integers(0, 0x10000),
            st.sampled_from([0, 1, 2, 3, 4, 7]),
            st.integers(0, 9),
        ),
        min_size=8,
        max_size=8,
    ),
    heads=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    queue=st.sampled_from([RECEIVEQ, TRANSMITQ]),
)
def test_hostile_tables_touch_only_writable_buffers(
    table: list[tuple[int, int, int, int]], heads: list[int], queue: int
) -> None:
    with GuestMemory([(0, 0x80000)]) as memory:
        console = Console(Sink())
        console.feed(b"z" * 5000)
        driver = MockDriver(console, memory, sizes=[8, 8])
        mock = driver.queues[queue]
        for index, desc in enumerate(table):
            mock.write_descriptor(index, *desc)
        for head in heads:
            mock.publish(head)
        before = bytes(memory.regions[0].view)
        driver.activate()
        console.reset()  # waits for the worker, which processed everything published
        after = bytes(memory.regions[0].view)
        allowed = [(m.used_ring, m.used_ring + 6 + 8 * 8) for m in driver.queues] + [
            (addr, addr + length) for addr, length, flags, _ in table if flags & VIRTQ_DESC_F_WRITE
        ]
        changed = [i for i in range(len(before)) if before[i] != after[i]]
        for offset in changed:
            assert any(lo <= offset < hi for lo, hi in allowed), hex(offset)
        assert not console.active
        console.shutdown()
        driver.close()
