"""Tests for virtio-net (nubis.virtio.net) with the mock driver and sockets standing in for taps."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nubis.memory import GuestMemory
from nubis.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    ActivatedQueue,
    DeviceType,
    InterruptKind,
)
from nubis.virtio.mock import MockDriver
from nubis.virtio.net import (
    CONFIG,
    CTRL_HEADER,
    CTRL_MQ_PAIRS,
    GUEST_OFFLOAD_FEATURES,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_LINK_UP,
    VNET_HDR,
    FdBackend,
    Net,
)
from nubis.virtio.queue import Queue

MAC = "52:54:00:12:34:56"
BASIC = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_INDIRECT_DESC


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, 0x200000)])
    yield mem
    mem.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A frame-preserving socket pair: [0] is the device's 'tap', [1] the host side."""
    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device_end.setblocking(False)
    host_end.settimeout(10)
    yield device_end, host_end
    device_end.close()
    host_end.close()


@pytest.fixture
def two_fds() -> Iterator[list[int]]:
    """Device ends of two socket pairs (their host ends stay open and silent)."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    for device_end, _ in pairs:
        device_end.setblocking(False)
    yield [device_end.fileno() for device_end, _ in pairs]
    for a, b in pairs:
        a.close()
        b.close()


def header(num_buffers: int = 0, flags: int = 0) -> bytes:
    return VNET_HDR.pack(flags, 0, 0, 0, 0, 0, num_buffers)


def activate(driver: MockDriver, features: int) -> None:
    """Activate with exactly ``features`` (the mock driver's own activate takes every feature)."""
    device = driver.device
    device.ack_features(features)
    device.activate(
        driver.memory,
        driver.interrupt,
        [
            ActivatedQueue(i, queue, fd)
            for i, (queue, fd) in enumerate(
                zip(driver.device_queues, driver.notify_fds, strict=True)
            )
        ],
    )


def test_layouts_are_pinned() -> None:
    assert VNET_HDR.size == 12
    assert CONFIG.size == 12
    assert CTRL_HEADER.size == 2
    assert CTRL_MQ_PAIRS.size == 2
    assert header(3)[10:] == b"\x03\x00"


def test_features_and_config(pair: tuple[socket.socket, socket.socket]) -> None:
    net = Net(pair[0].fileno(), mac=MAC, mtu=9000)
    assert net.device_type is DeviceType.NET
    features = net.avail_features
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU):
        assert features >> bit & 1
    assert not features >> VIRTIO_NET_F_MQ & 1
    assert not features >> VIRTIO_NET_F_CTRL_VQ & 1
    assert len(net.queue_max_sizes) == 2
    config = bytearray(16)
    net.read_config(0, memoryview(config))
    assert config == bytes.fromhex(
        "525400123456"
    ) + b"\x01\x00" + b"\x01\x00" + b"\x28\x23" + bytes(4)
    status = bytearray(2)
    net.read_config(6, memoryview(status))
    assert status == b"\x01\x00"
    far = bytearray(b"\xff")
    net.read_config(-1, memoryview(far))
    assert far == b"\0"
    net.write_config(0, memoryview(b"\xff" * 6))
    assert net.config_bytes()[:6] == bytes.fromhex("525400123456")
    assert not Net(pair[0].fileno(), mac=MAC).avail_features >> VIRTIO_NET_F_MTU & 1


def test_multiqueue_offers_mq_and_a_control_queue() -> None:
    net = Net([5, 6], mac=MAC, num_queues=4)
    assert net.avail_features >> VIRTIO_NET_F_MQ & 1
    assert net.avail_features >> VIRTIO_NET_F_CTRL_VQ & 1
    assert len(net.queue_max_sizes) == 5
    assert CONFIG.unpack(net.config_bytes())[2] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_queues": 3}, "queue count 3"),
        ({"num_queues": 4}, "needs 2 backend files"),
        ({"mtu": 20}, "MTU 20"),
        ({"mac": "52:54:00"}, "not six bytes"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"mac": MAC, **kwargs}
    with pytest.raises(ValueError, match=message):
        Net(7, **arguments)  # type: ignore[arg-type]


def test_transmit_writes_header_and_frame(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory)
    driver.activate()
    tx = driver.queues[1]
    try:
        frame = bytes(range(60))
        tx.add_chain([header(flags=1) + frame])
        # Message framing is free: a header split over descriptors, through an indirect table.
        tx.add_chain([header()[:5], header()[5:] + frame[:30], frame[30:]], indirect=True)
        driver.notify(1)
        driver.wait_used(1, 2)
        assert pair[1].recv(4096) == header(flags=1) + frame
        assert pair[1].recv(4096) == header() + frame
        assert tx.take_used() == [(0, 0), (1, 0)]
        counters = net.counters()
        assert counters["tx_frames"] == 2
        assert counters["tx_bytes"] == 120
    finally:
        net.shutdown()
        driver.close()


def test_transmit_drops_runts(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory)
    driver.activate()
    try:
        driver.queues[1].add_chain([header()])
        driver.notify(1)
        driver.wait_used(1, 1)
        assert net.counters()["tx_dropped"] == 1
        assert net.counters()["tx_frames"] == 0
    finally:
        net.shutdown()
        driver.close()


def test_receive_one_chain_per_frame(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory, event_idx=True)
    activate(driver, BASIC | 1 << VIRTIO_F_RING_EVENT_IDX)
    rx = driver.queues[0]
    try:
        chain = rx.add_chain(writable=[12, 2000])
        driver.notify(0)
        frame = bytes(range(256)) * 4
        pair[1].send(header(num_buffers=0x7777) + frame)
        driver.wait_used(0, 1)
        ((head, length),) = rx.take_used()
        assert (head, length) == (chain.head, 12 + len(frame))
        data = rx.read_buffers(chain.writable)
        assert data[:12] == header(num_buffers=1)
        assert data[12 : 12 + len(frame)] == frame
        assert net.counters()["rx_frames"] == 1
        assert net.counters()["rx_bytes"] == len(frame)
    finally:
        net.shutdown()
        driver.close()


def test_mergeable_frame_spans_chains(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory)
    activate(driver, BASIC | 1 << VIRTIO_NET_F_MRG_RXBUF)
    rx = driver.queues[0]
    try:
        chains = [rx.add_chain(writable=[512]) for _ in range(4)]
        driver.notify(0)
        frame = bytes(i % 251 for i in range(1200))
        pair[1].send(header() + frame)
        driver.wait_used(0, 3)
        assert rx.take_used() == [
            (chains[0].head, 512),
            (chains[1].head, 512),
            (chains[2].head, 188),
        ]
        data = rx.read_buffers([b for c in chains[:3] for b in c.writable])
        assert data[:12] == header(num_buffers=3)
        assert data[12 : 12 + len(frame)] == frame
        # The fourth chain waits for the next frame, together with new ones.
        for _ in range(3):
            rx.add_chain(writable=[512])
        driver.notify(0)
        pair[1].send(header() + b"x" * 100)
        driver.wait_used(0, 1)
        ((head, length),) = rx.take_used()
        assert (head, length) == (chains[3].head, 112)
        assert rx.read_buffers(chains[3].writable)[:12] == header(num_buffers=1)
    finally:
        net.shutdown()
        driver.close()


def test_mergeable_with_tso_waits_for_a_whole_ring_or_64k(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    net = Net(pair[0].fileno(), mac=MAC, queue_size=8)
    driver = MockDriver(net, memory)
    features = BASIC | 1 << VIRTIO_NET_F_MRG_RXBUF | GUEST_OFFLOAD_FEATURES
    activate(driver, features & net.avail_features)
    rx = driver.queues[0]
    try:
        pair[1].send(header() + b"y" * 3000)
        for _ in range(7):
            rx.add_chain(writable=[1024])
        driver.notify(0)
        time.sleep(0.2)
        assert rx.used_idx() == 0, "a 64 KiB frame could still come: the device must wait"
        rx.add_chain(writable=[1024])
        driver.notify(0)
        driver.wait_used(0, 3)
        assert [length for _, length in rx.take_used()] == [1024, 1024, 964]
    finally:
        net.shutdown()
        driver.close()


@pytest.mark.parametrize("mergeable", [False, True], ids=["one-chain-per-frame", "mergeable"])
def test_one_pass_over_the_ring_serves_several_frames(
    memory: GuestMemory,
    pair: tuple[socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    mergeable: bool,
) -> None:
    passes: list[int] = []
    real_pop = Queue.pop_buffers_into

    def counting_pop(self: Queue, *args: Any, **kwargs: Any) -> list[int]:
        heads = args[2]
        before = len(heads)
        rejected = real_pop(self, *args, **kwargs)
        if len(heads) > before:
            passes.append(len(heads) - before)  # a pass that took chains, and how many
        return rejected

    monkeypatch.setattr(Queue, "pop_buffers_into", counting_pop)
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory)
    activate(driver, BASIC | (1 << VIRTIO_NET_F_MRG_RXBUF if mergeable else 0))
    rx = driver.queues[0]
    try:
        chains = [rx.add_chain(writable=[2048]) for _ in range(32)]
        driver.notify(0)
        frames = [bytes([i]) * (100 + i) for i in range(8)]
        for frame in frames:
            pair[1].send(header() + frame)
        driver.wait_used(0, 8)
        used = rx.take_used()
        assert used == [(c.head, 12 + len(f)) for c, f in zip(chains, frames, strict=False)]
        for chain, frame in zip(chains, frames, strict=False):
            assert rx.read_buffers(chain.writable)[12 : 12 + len(frame)] == frame
        # The chains for all eight frames came from one pass, not one (or more) per frame:
        # every chain posted (fewer than a refill asks for).
        assert passes == [32], passes
    finally:
        net.shutdown()
        driver.close()


def test_backpressure_keeps_frames_in_the_backend(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory)
    activate(driver, BASIC)
    rx = driver.queues[0]
    try:
        for i in range(3):
            pair[1].send(header() + bytes([i]) * 64)
        deadline = time.monotonic() + 10
        while net._polling[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not net._polling[0], "without buffers the backend must not be polled"
        assert net.counters()["rx_frames"] == 0
        chains = [rx.add_chain(writable=[2048]) for _ in range(3)]
        driver.notify(0)
        driver.wait_used(0, 3)
        for i, chain in enumerate(chains):
            assert rx.read_buffers(chain.writable)[12:76] == bytes([i]) * 64
        assert net.counters()["rx_dropped"] == 0
        rx.take_used()
        # A fresh buffer resumes polling: the next frame arrives on its own.
        last = rx.add_chain(writable=[2048])
        driver.notify(0)
        pair[1].send(header() + b"late" * 16)
        driver.wait_used(0, 1)
        assert rx.read_buffers(last.writable)[12:16] == b"late"
    finally:
        net.shutdown()
        driver.close()


def test_a_lone_frame_costs_one_read_and_a_burst_reads_until_eagain(
    memory: GuestMemory,
    pair: tuple[socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After its first frame a pass asks poll(2) whether another waits, so a frame that comes
    alone (as paced TCP sends them) costs no readv failing with EAGAIN; frames that wait
    together are read until EAGAIN, with no probe per frame; polling goes on either way.
    """
    reads: list[str] = []
    real_readv = os.readv

    def counting_readv(fd: int, buffers: Any) -> int:
        try:
            count = real_readv(fd, buffers)
        except BlockingIOError:
            reads.append("EAGAIN")
            raise
        reads.append("frame")
        return count

    monkeypatch.setattr(os, "readv", counting_readv)
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory)
    activate(driver, BASIC)
    rx = driver.queues[0]
    try:
        # Three frames wait in the backend before there is anywhere to put them.
        for i in range(3):
            pair[1].send(header() + bytes([i]) * 64)
        deadline = time.monotonic() + 10
        while net._polling[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not net._polling[0]
        reads.clear()
        interrupts = lambda: _queue_interrupts(driver, 0)  # noqa: E731
        # The pass's interrupt comes after its last read: waiting for it sees every read.
        before = interrupts()
        chains = [rx.add_chain(writable=[2048]) for _ in range(8)]
        driver.notify(0)
        driver.interrupt.wait_until(lambda: interrupts() > before)
        assert reads == ["frame", "frame", "frame", "EAGAIN"], reads
        # Then frames one at a time: one readv each, and the backend is still polled.
        for i in range(3, 6):
            reads.clear()
            before = interrupts()
            pair[1].send(header() + bytes([i]) * 64)
            driver.interrupt.wait_until(lambda before=before: interrupts() > before)
            assert reads == ["frame"], reads
            assert net._polling[0]
        for i, chain in enumerate(chains[:6]):
            assert rx.read_buffers(chain.writable)[12:76] == bytes([i]) * 64
        assert net.counters()["rx_frames"] == 6
    finally:
        net.shutdown()
        driver.close()


def test_tiny_receive_buffers_are_returned_unused(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory)
    activate(driver, BASIC)
    rx = driver.queues[0]
    try:
        tiny = rx.add_chain(writable=[8])
        good = rx.add_chain(writable=[256])
        driver.notify(0)
        pair[1].send(header() + b"z" * 50)
        driver.wait_used(0, 2)
        assert rx.take_used() == [(tiny.head, 0), (good.head, 62)]
        assert net.counters()["rx_bad_buffers"] == 1
    finally:
        net.shutdown()
        driver.close()


def test_backend_gone_takes_the_link_down(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory)
    activate(driver, BASIC | 1 << VIRTIO_NET_F_STATUS)
    try:
        driver.queues[0].add_chain(writable=[2048])
        driver.notify(0)
        pair[1].close()
        driver.interrupt.wait_until(lambda: (InterruptKind.CONFIG, 0) in driver.interrupt.events)
        assert not net.link_up
        assert CONFIG.unpack(net.config_bytes())[1] & VIRTIO_NET_S_LINK_UP == 0
        assert not driver.needs_reset.is_set()
        # Transmitting on a down link completes the chain and counts a drop.
        driver.queues[1].add_chain([header() + b"q" * 60])
        driver.notify(1)
        driver.wait_used(1, 1)
        assert net.counters()["tx_dropped"] == 1
    finally:
        net.shutdown()
        driver.close()


def _ctrl(driver: MockDriver, index: int, klass: int, command: int, data: bytes) -> int:
    ctrl = driver.queues[index]
    chain = ctrl.add_chain([CTRL_HEADER.pack(klass, command), data], writable=[1])
    driver.notify(index)
    driver.wait_used(index, 1)
    assert ctrl.take_used() == [(chain.head, 1)]
    return ctrl.read_buffers(chain.writable)[0]


def test_multiqueue_pairs_set(memory: GuestMemory) -> None:
    sockets = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    for device_end, host_end in sockets:
        device_end.setblocking(False)
        host_end.settimeout(10)
    net = Net([s[0].fileno() for s in sockets], mac=MAC, num_queues=4)
    driver = MockDriver(net, memory)
    activate(driver, BASIC | 1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_CTRL_VQ)
    try:
        assert net.active_pairs == 1
        assert _ctrl(
            driver, 4, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x03\x00"
        ) == (VIRTIO_NET_ERR)
        assert _ctrl(driver, 4, 9, 9, b"") == VIRTIO_NET_ERR
        assert _ctrl(
            driver, 4, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x02\x00"
        ) == (VIRTIO_NET_OK)
        assert net.active_pairs == 2
        rx1 = driver.queues[2]
        chain = rx1.add_chain(writable=[2048])
        driver.notify(2)
        sockets[1][1].send(header() + b"second pair" * 6)
        driver.wait_used(2, 1)
        assert rx1.read_buffers(chain.writable)[12:23] == b"second pair"
        driver.queues[3].add_chain([header() + b"out of pair 1" * 5])
        driver.notify(3)
        assert sockets[1][1].recv(4096)[12:25] == b"out of pair 1"
    finally:
        net.shutdown()
        driver.close()
        for a, b in sockets:
            a.close()
            b.close()


def test_multiqueue_device_without_mq_uses_queue_2_as_controlq(
    memory: GuestMemory, two_fds: list[int]
) -> None:
    net = Net(two_fds, mac=MAC, num_queues=4)
    driver = MockDriver(net, memory, sizes=[256, 256, 256])
    features = BASIC | 1 << VIRTIO_NET_F_CTRL_VQ
    try:
        activate(driver, features)
        assert _ctrl(
            driver, 2, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x01\x00"
        ) == (VIRTIO_NET_ERR)
    finally:
        net.shutdown()
        driver.close()


def test_activation_needs_the_queues_the_features_imply(
    memory: GuestMemory, two_fds: list[int]
) -> None:
    net = Net(two_fds, mac=MAC, num_queues=4)
    driver = MockDriver(net, memory, sizes=[256, 256])
    try:
        with pytest.raises(ValueError, match="needs queues 0 to 2"):
            activate(driver, BASIC | 1 << VIRTIO_NET_F_CTRL_VQ)
        net.reset()
        activate(driver, BASIC)
        assert net.active
    finally:
        net.shutdown()
        driver.close()


class RecordingBackend:
    def __init__(self, fds: list[int]) -> None:
        self.fds = fds
        self.offloads: list[int] = []
        self.queues: list[tuple[int, bool]] = []

    def set_guest_offloads(self, features: int) -> None:
        self.offloads.append(features)

    def set_queue_enabled(self, pair: int, enabled: bool) -> None:
        self.queues.append((pair, enabled))


def test_backend_hears_offloads_and_queue_steering(memory: GuestMemory, two_fds: list[int]) -> None:
    backend = RecordingBackend(two_fds)
    net = Net(backend, mac=MAC, num_queues=4)
    driver = MockDriver(net, memory, sizes=[256, 256])
    try:
        activate(driver, BASIC | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4)
        assert backend.offloads == [1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4]
        assert backend.queues == [(0, True), (1, False)]
    finally:
        net.shutdown()
        driver.close()


class SwitchableBackend(FdBackend):
    """A plain-file backend whose host side can be switched down and up, like a tap's IFF_UP."""

    def __init__(self, fds: list[int]) -> None:
        super().__init__(fds)
        self.up = True

    def is_up(self) -> bool:
        return self.up


def test_host_side_down_and_up_follow_the_link(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    backend = SwitchableBackend([pair[0].fileno()])
    net = Net(backend, mac=MAC)
    driver = MockDriver(net, memory)
    activate(driver, BASIC | 1 << VIRTIO_NET_F_STATUS)
    config_events = lambda: driver.interrupt.events.count((InterruptKind.CONFIG, 0))  # noqa: E731
    try:
        driver.queues[0].add_chain(writable=[2048])
        driver.notify(0)
        backend.up = False
        driver.interrupt.wait_until(lambda: config_events() >= 1)
        assert not net.link_up
        backend.up = True
        driver.interrupt.wait_until(lambda: config_events() >= 2)
        assert net.link_up
        assert CONFIG.unpack(net.config_bytes())[1] & VIRTIO_NET_S_LINK_UP
        # Frames flow again once the link is back.
        pair[1].send(header() + b"f" * 60)
        driver.wait_used(0, 1)
        assert net.counters()["rx_frames"] == 1
    finally:
        net.shutdown()
        driver.close()


def test_a_tap_down_before_activation_puts_the_link_down_and_a_reset_keeps_up_with_it(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    backend = SwitchableBackend([pair[0].fileno()])
    backend.up = False
    net = Net(backend, mac=MAC)
    driver = MockDriver(net, memory)
    try:
        activate(driver, BASIC | 1 << VIRTIO_NET_F_STATUS)
        driver.interrupt.wait_until(lambda: not net.link_up)
        assert not CONFIG.unpack(net.config_bytes())[1] & VIRTIO_NET_S_LINK_UP
        # The tap comes up while the driver resets the device: the next activation finds it.
        net.reset()
        backend.up = True
        activate(driver, BASIC | 1 << VIRTIO_NET_F_STATUS)
        driver.interrupt.wait_until(lambda: net.link_up)
        driver.queues[0].add_chain(writable=[2048])
        driver.notify(0)
        pair[1].send(header() + b"f" * 60)
        driver.wait_used(0, 1)
    finally:
        net.shutdown()
        driver.close()


def _queue_interrupts(driver: MockDriver, index: int) -> int:
    return driver.interrupt.events.count((InterruptKind.QUEUE, index))


def test_transmit_batch_is_one_interrupt(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory, event_idx=True)
    tx = driver.queues[1]
    frames = [bytes([i]) * (60 + i) for i in range(20)]
    heads = [tx.add_chain([header(), frame]).head for frame in frames]
    tx.set_used_event(0)
    try:
        # The chains wait before activation: the worker finds all of them at once.
        activate(driver, BASIC | 1 << VIRTIO_F_RING_EVENT_IDX)
        driver.wait_used(1, len(frames))
        assert [pair[1].recv(4096) for _ in frames] == [header() + f for f in frames]
        assert tx.take_used() == [(head, 0) for head in heads]
        driver.interrupt.wait_until(lambda: _queue_interrupts(driver, 1) >= 1)
        time.sleep(0.05)
        assert _queue_interrupts(driver, 1) == 1
        assert net.counters()["tx_frames"] == len(frames)
        assert net.counters()["tx_bytes"] == sum(map(len, frames))
    finally:
        net.shutdown()
        driver.close()


def test_a_long_transmit_drain_interrupts_per_batch(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Completions are reported batch by batch, not held until the whole drain ends."""
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory)
    tx = driver.queues[1]
    count = Net._TX_BATCH + 36
    frames = [bytes([i]) * 60 for i in range(count)]
    for frame in frames:
        tx.add_chain([header(), frame])
    try:
        activate(driver, BASIC)
        driver.wait_used(1, count)
        assert [pair[1].recv(4096) for _ in frames] == [header() + f for f in frames]
        driver.interrupt.wait_until(lambda: _queue_interrupts(driver, 1) >= 2)
        time.sleep(0.05)
        assert _queue_interrupts(driver, 1) == 2
    finally:
        net.shutdown()
        driver.close()


def test_receive_honours_used_event(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    """One interrupt per batch, none the driver did not ask for, none it asked for missed."""
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory, event_idx=True)
    rx = driver.queues[0]
    features = BASIC | 1 << VIRTIO_F_RING_EVENT_IDX | 1 << VIRTIO_NET_F_MRG_RXBUF
    for _ in range(40):
        rx.add_chain(writable=[4096])
    for i in range(8):
        pair[1].send(header() + bytes([i]) * 1000)
    rx.set_used_event(0)
    try:
        activate(driver, features)
        driver.wait_used(0, 8)
        driver.interrupt.wait_until(lambda: _queue_interrupts(driver, 0) >= 1)
        time.sleep(0.05)
        assert _queue_interrupts(driver, 0) == 1, "eight frames read at once: one interrupt"
        assert len(rx.take_used()) == 8
        # used_event far ahead: the driver is polling and wants no interrupt yet.
        rx.set_used_event(8 + 3)
        for i in range(3):
            pair[1].send(header() + b"p" * 100)
            # No interrupt comes to wake a waiter: poll the used index, as the driver would.
            deadline = time.monotonic() + 10
            while (rx.used_idx() - rx.used_seen) & 0xFFFF < i + 1:
                assert time.monotonic() < deadline, "the frame was not received"
                time.sleep(0.005)
        time.sleep(0.05)
        assert _queue_interrupts(driver, 0) == 1
        # The fourth frame moves the used index past used_event: that one must interrupt.
        pair[1].send(header() + b"q" * 100)
        driver.interrupt.wait_until(lambda: _queue_interrupts(driver, 0) == 2)
        assert len(rx.take_used()) == 4
        # Re-armed at the current index (as virtqueue_enable_cb does): every frame interrupts.
        for i in range(3):
            rx.set_used_event(rx.used_seen)
            pair[1].send(header() + b"r" * 100)
            driver.interrupt.wait_until(lambda n=i: _queue_interrupts(driver, 0) == 3 + n)
            rx.take_used()
    finally:
        net.shutdown()
        driver.close()


def test_receive_header_split_over_small_buffers(
    memory: GuestMemory, pair: tuple[socket.socket, socket.socket]
) -> None:
    net = Net(pair[0].fileno(), mac=MAC)
    driver = MockDriver(net, memory)
    activate(driver, BASIC | 1 << VIRTIO_NET_F_MRG_RXBUF)
    rx = driver.queues[0]
    try:
        chain = rx.add_chain(writable=[6, 5, 4000])
        driver.notify(0)
        pair[1].send(header(num_buffers=0x5555) + b"s" * 70)
        driver.wait_used(0, 1)
        assert rx.take_used() == [(chain.head, 82)]
        data = rx.read_buffers(chain.writable)
        assert data[:12] == header(num_buffers=1)
        assert data[12:82] == b"s" * 70
    finally:
        net.shutdown()
        driver.close()
