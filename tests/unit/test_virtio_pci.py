"""Tests for nubis.virtio.pci: the virtio PCI transport, played the way Linux's driver plays it."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nubis.memory import GuestMemory
from nubis.pci.configuration import PciHeaderOffset
from nubis.pci.root import PciBus, PciConfigMmio, PciDevice
from nubis.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    ActivatedQueue,
    DeviceStatus,
    DeviceType,
    InterruptKind,
    VirtioDevice,
    VirtioInterrupt,
)
from nubis.virtio.pci import (
    BAR0_SIZE,
    COMMON_CFG,
    COMMON_CFG_FIELDS,
    VIRTIO_PCI_CAP,
    VirtioPciCapType,
    VirtioPciDevice,
)

BAR0 = 0x2_0000_0000
ACK = DeviceStatus.ACKNOWLEDGE
DRIVER = DeviceStatus.DRIVER
FEATURES_OK = DeviceStatus.FEATURES_OK
DRIVER_OK = DeviceStatus.DRIVER_OK
NEEDS_RESET = DeviceStatus.DEVICE_NEEDS_RESET
VERSION_1 = 1 << VIRTIO_F_VERSION_1
EVENT_IDX = 1 << VIRTIO_F_RING_EVENT_IDX
BLK_F_FLUSH = 1 << 9


class FakeDevice:
    """A VirtioDevice that records what the transport does to it."""

    def __init__(self, device_type: DeviceType = DeviceType.BLOCK) -> None:
        self.device_type = device_type
        self.queue_max_sizes: Sequence[int] = (256, 128)
        self.avail_features = VERSION_1 | EVENT_IDX | BLK_F_FLUSH
        self.acked: list[int] = []
        self.activations: list[list[ActivatedQueue]] = []
        self.interrupt: VirtioInterrupt | None = None
        self.resets = 0
        self.fail_activation = False
        self.config = bytearray(b"\x10\x00\x00\x00\x00\x00\x00\x00nubis-blk")

    def ack_features(self, features: int) -> None:
        self.acked.append(features)

    def read_config(self, offset: int, data: memoryview) -> None:
        chunk = self.config[offset : offset + len(data)] if offset >= 0 else b""
        data[:] = bytes(chunk) + bytes(len(data) - len(chunk))

    def write_config(self, offset: int, data: memoryview) -> None:
        if offset >= 0 and offset + len(data) <= 4:
            self.config[offset : offset + len(data)] = data

    def activate(
        self, memory: GuestMemory, interrupt: VirtioInterrupt, queues: Sequence[ActivatedQueue]
    ) -> None:
        if self.fail_activation:
            raise ValueError("queue 0 was not enabled")
        self.interrupt = interrupt
        self.activations.append(list(queues))

    def reset(self) -> None:
        self.resets += 1
        self.interrupt = None

    def counters(self) -> dict[str, int]:
        return {}

    def shutdown(self) -> None:
        pass


class RecordingRouter:
    def __init__(self) -> None:
        self.updates: dict[int, tuple[int, int, bool]] = {}
        self.delivered: list[int] = []

    def update(self, vector: int, address: int, data: int, masked: bool) -> None:
        self.updates[vector] = (address, data, masked)

    def trigger(self, vector: int) -> None:
        self.delivered.append(vector)


class RecordingIoEvents:
    def __init__(self) -> None:
        self.registered: set[tuple[int, int]] = set()

    def register(self, fd: int, address: int) -> None:
        assert (fd, address) not in self.registered
        self.registered.add((fd, address))

    def unregister(self, fd: int, address: int) -> None:
        self.registered.remove((fd, address))


def _protocol_checks(device: FakeDevice, transport: VirtioPciDevice) -> None:
    """Static checks (mypy) that the fakes and the transport satisfy the Protocols."""
    _virtio: VirtioDevice = device
    _pci: PciDevice = transport
    _irq: VirtioInterrupt = transport


class Harness:
    """The transport plugged into a PCI bus with BAR 0 assigned, and driver-side helpers."""

    def __init__(self, device: FakeDevice | None = None) -> None:
        self.device = device or FakeDevice()
        self.memory = GuestMemory([(0, 1 << 20)])
        self.router = RecordingRouter()
        self.ioevents = RecordingIoEvents()
        self.events: list[str] = []
        self.transport = VirtioPciDevice(
            self.device, self.memory, self.router, self.ioevents, self.events.append
        )
        self.transport.assign_bar(0, BAR0)
        self.pci_bus = PciBus()
        self.slot = self.pci_bus.add_device(self.transport)
        self.ecam = PciConfigMmio(self.pci_bus)

    def close(self) -> None:
        self.transport.close()
        self.memory.close()

    # Configuration space through ECAM.
    def cfg_read(self, offset: int, size: int) -> int:
        buf = bytearray(size)
        self.ecam.read(0, self.slot << 15 | offset, memoryview(buf))
        return int.from_bytes(buf, "little")

    def cfg_write(self, offset: int, value: int, size: int) -> None:
        self.ecam.write(
            0, self.slot << 15 | offset, memoryview(bytearray(value.to_bytes(size, "little")))
        )

    # BAR 0.
    def bar_read(self, offset: int, size: int) -> int:
        buf = bytearray(size)
        self.transport.read(BAR0, offset, memoryview(buf))
        return int.from_bytes(buf, "little")

    def bar_write(self, offset: int, value: int, size: int) -> None:
        self.transport.write(BAR0, offset, memoryview(bytearray(value.to_bytes(size, "little"))))

    def find_caps(self) -> dict[int, tuple[int, int, int, int]]:
        """Walk the capability list like virtio_pci_find_capability: cfg_type -> (pos, bar, offset, length)."""
        caps: dict[int, tuple[int, int, int, int]] = {}
        assert self.cfg_read(PciHeaderOffset.STATUS, 2) & 0x10
        pos = self.cfg_read(0x34, 1)
        seen = 0
        while pos:
            seen += 1
            assert seen < 48, "capability list loops"
            cap_id = self.cfg_read(pos, 1)
            if cap_id == 0x09:
                cfg_type = self.cfg_read(pos + 3, 1)
                caps.setdefault(
                    cfg_type,
                    (
                        pos,
                        self.cfg_read(pos + 4, 1),
                        self.cfg_read(pos + 8, 4),
                        self.cfg_read(pos + 12, 4),
                    ),
                )
            elif cap_id == 0x11:
                caps[0x11] = (pos, 0, 0, 0)
            pos = self.cfg_read(pos + 1, 1)
        return caps


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def field(name: str) -> tuple[int, int]:
    for f in COMMON_CFG_FIELDS:
        if f.name == name:
            return f.offset, f.size
    raise KeyError(name)


def common_read(h: Harness, name: str) -> int:
    return h.bar_read(*field(name))


def common_write(h: Harness, name: str, value: int) -> None:
    offset, size = field(name)
    if size == 8:
        h.bar_write(offset, value & 0xFFFF_FFFF, 4)
        h.bar_write(offset + 4, value >> 32, 4)
    else:
        h.bar_write(offset, value, size)


def features(h: Harness) -> int:
    common_write(h, "device_feature_select", 0)
    low = common_read(h, "device_feature")
    common_write(h, "device_feature_select", 1)
    return low | common_read(h, "device_feature") << 32


def negotiate(h: Harness, wanted: int) -> int:
    common_write(h, "device_status", 0)
    assert common_read(h, "device_status") == 0
    common_write(h, "device_status", ACK)
    common_write(h, "device_status", ACK | DRIVER)
    common_write(h, "driver_feature_select", 0)
    common_write(h, "driver_feature", wanted & 0xFFFF_FFFF)
    common_write(h, "driver_feature_select", 1)
    common_write(h, "driver_feature", wanted >> 32)
    common_write(h, "device_status", ACK | DRIVER | FEATURES_OK)
    return common_read(h, "device_status")


def setup_queue(h: Harness, index: int, size: int, vector: int, base: int) -> None:
    common_write(h, "queue_select", index)
    assert common_read(h, "queue_size") >= size
    common_write(h, "queue_size", size)
    common_write(h, "queue_msix_vector", vector)
    assert common_read(h, "queue_msix_vector") == vector
    common_write(h, "queue_desc", base)
    common_write(h, "queue_driver", base + 16 * size)
    common_write(h, "queue_device", base + 0x4000)
    assert common_read(h, "queue_notify_off") == index
    common_write(h, "queue_enable", 1)


def enable_msix(h: Harness, vectors: int) -> None:
    msix_pos = h.find_caps()[0x11][0]
    control = h.cfg_read(msix_pos + 2, 2)
    assert control & 0x7FF == vectors - 1
    h.cfg_write(msix_pos + 2, control | 0x8000, 2)
    table = h.cfg_read(msix_pos + 4, 4)
    assert table & 7 == 0
    for vector in range(vectors):
        entry = (table & ~7) + 16 * vector
        h.bar_write(entry, 0xFEE0_0000, 4)
        h.bar_write(entry + 4, 0, 4)
        h.bar_write(entry + 8, 0x30 + vector, 4)
        h.bar_write(entry + 12, 0, 4)


def bring_up(h: Harness) -> None:
    assert negotiate(h, VERSION_1 | EVENT_IDX) & FEATURES_OK
    enable_msix(h, 3)
    common_write(h, "config_msix_vector", 0)
    setup_queue(h, 0, 128, 1, 0x10000)
    setup_queue(h, 1, 64, 2, 0x20000)
    common_write(h, "device_status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)


# Layout pins.


def test_common_cfg_layout_matches_the_spec() -> None:
    assert COMMON_CFG.size == 0x3C
    offset = 0
    for f in COMMON_CFG_FIELDS:
        assert f.offset == offset, f.name
        offset += f.size
    assert offset == COMMON_CFG.size
    assert field("queue_desc") == (0x20, 8)
    assert field("device_status") == (0x14, 1)
    assert VIRTIO_PCI_CAP.size == 16


def test_pci_identity(h: Harness) -> None:
    assert h.cfg_read(0, 4) == 0x1042_1AF4
    assert h.cfg_read(PciHeaderOffset.REVISION_ID, 1) == 1
    assert h.cfg_read(PciHeaderOffset.REVISION_ID, 4) >> 8 == 0x018000
    assert h.cfg_read(PciHeaderOffset.SUBSYSTEM_VENDOR_ID, 4) == 0x0040_1AF4
    assert h.cfg_read(PciHeaderOffset.INTERRUPT_PIN, 1) == 0
    assert h.cfg_read(PciHeaderOffset.BAR0, 4) == (BAR0 & 0xFFFF_FFFF) | 0x4
    assert h.cfg_read(PciHeaderOffset.BAR0 + 4, 4) == BAR0 >> 32


@pytest.mark.parametrize(
    ("device_type", "device_id", "class_code"),
    [
        (DeviceType.NET, 0x1041, 0x020000),
        (DeviceType.BLOCK, 0x1042, 0x018000),
        (DeviceType.ENTROPY, 0x1044, 0xFF0000),
        (DeviceType.VSOCK, 0x1053, 0xFF0000),
    ],
)
def test_ids_and_class_per_device_type(
    device_type: DeviceType, device_id: int, class_code: int
) -> None:
    harness = Harness(FakeDevice(device_type))
    try:
        assert harness.cfg_read(2, 2) == device_id
        assert harness.cfg_read(8, 4) >> 8 == class_code
    finally:
        harness.close()


def test_bar0_sizes_as_64bit_memory(h: Harness) -> None:
    h.cfg_write(PciHeaderOffset.BAR0, 0xFFFF_FFFF, 4)
    h.cfg_write(PciHeaderOffset.BAR0 + 4, 0xFFFF_FFFF, 4)
    size = (
        (h.cfg_read(PciHeaderOffset.BAR0 + 4, 4) << 32)
        | (h.cfg_read(PciHeaderOffset.BAR0, 4) & ~0xF)
    ) ^ ((1 << 64) - 1)
    assert size + 1 == BAR0_SIZE


def test_virtio_capabilities_point_into_bar0(h: Harness) -> None:
    caps = h.find_caps()
    assert set(caps) == {1, 2, 3, 4, 5, 0x11}
    for cfg_type in (1, 2, 3, 4):
        _, bar, offset, length = caps[cfg_type]
        assert bar == 0
        assert length > 0 and offset + length <= BAR0_SIZE
    notify_pos = caps[VirtioPciCapType.NOTIFY_CFG][0]
    assert h.cfg_read(notify_pos + 2, 1) == 20
    assert h.cfg_read(notify_pos + 16, 4) == 4  # notify_off_multiplier
    assert caps[VirtioPciCapType.NOTIFY_CFG][3] >= 2 * 4
    assert caps[VirtioPciCapType.COMMON_CFG][3] >= 0x38
    msix_pos = caps[0x11][0]
    assert h.cfg_read(msix_pos + 4, 4) & 7 == 0  # table in BAR 0
    assert h.cfg_read(msix_pos + 8, 4) & 7 == 0  # PBA in BAR 0


def test_capabilities_are_read_only(h: Harness) -> None:
    pos = h.find_caps()[VirtioPciCapType.COMMON_CFG][0]
    before = [h.cfg_read(pos + i, 4) for i in range(0, 16, 4)]
    for i in range(0, 16, 4):
        h.cfg_write(pos + i, 0xFFFF_FFFF, 4)
    assert [h.cfg_read(pos + i, 4) for i in range(0, 16, 4)] == before


# The Linux driver's sequence.


def test_linux_probe_sequence(h: Harness) -> None:
    caps = h.find_caps()
    assert caps[VirtioPciCapType.COMMON_CFG][2] == 0
    offered = features(h)
    assert offered == VERSION_1 | EVENT_IDX | BLK_F_FLUSH
    assert common_read(h, "num_queues") == 2
    bring_up(h)
    status = common_read(h, "device_status")
    assert status == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert h.device.acked == [VERSION_1 | EVENT_IDX]
    [activated] = h.device.activations
    assert [(a.index, a.queue.size, a.notify_fd) for a in activated] == [
        (0, 128, h.transport.notify_fds[0]),
        (1, 64, h.transport.notify_fds[1]),
    ]
    queue = activated[0].queue
    assert (queue.desc_table, queue.avail_ring, queue.used_ring) == (
        0x10000,
        0x10000 + 2048,
        0x14000,
    )
    assert queue.ready and queue.event_idx

    # Notify queue 1 through the bus (no ioeventfd): its eventfd becomes readable.
    notify_offset = caps[VirtioPciCapType.NOTIFY_CFG][2] + 4 * common_read_notify_off(h, 1)
    h.bar_write(notify_offset, 1, 2)
    assert os.eventfd_read(h.transport.notify_fds[1]) == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(h.transport.notify_fds[0])

    # The device completes a request on queue 1: MSI-X vector 2 fires, ISR bit 0 is set.
    assert h.device.interrupt is h.transport
    h.transport.trigger(InterruptKind.QUEUE, 1)
    assert h.router.delivered == [2]
    assert h.router.updates[2] == (0xFEE0_0000, 0x32, False)
    isr_offset = caps[VirtioPciCapType.ISR_CFG][2]
    assert h.bar_read(isr_offset, 1) == 1
    assert h.bar_read(isr_offset, 1) == 0  # read to clear

    # Config change: config vector 0, generation moves.
    generation = common_read(h, "config_generation")
    h.transport.trigger(InterruptKind.CONFIG)
    assert h.router.delivered == [2, 0]
    assert common_read(h, "config_generation") == (generation + 1) & 0xFF
    assert h.bar_read(isr_offset, 1) == 2

    # Device config window.
    device_offset = caps[VirtioPciCapType.DEVICE_CFG][2]
    assert h.bar_read(device_offset, 8) == 0x10
    assert h.bar_read(device_offset + 8, 4) == int.from_bytes(b"nubi", "little")

    # Reset.
    common_write(h, "device_status", 0)
    assert common_read(h, "device_status") == 0
    assert h.device.resets == 1
    assert not queue.ready and queue.size == 256 and queue.desc_table == 0
    common_write(h, "queue_select", 0)
    assert common_read(h, "queue_msix_vector") == 0xFFFF
    assert common_read(h, "config_msix_vector") == 0xFFFF
    assert not h.transport.activated


def common_read_notify_off(h: Harness, index: int) -> int:
    common_write(h, "queue_select", index)
    return common_read(h, "queue_notify_off")


def test_doorbells_are_registered_and_follow_bar_moves(h: Harness) -> None:
    fds = h.transport.notify_fds
    assert h.ioevents.registered == {(fds[0], BAR0 + 0x3000), (fds[1], BAR0 + 0x3004)}
    h.transport.move_bar(BAR0, BAR0 + 0x10000)
    assert h.ioevents.registered == {(fds[0], BAR0 + 0x13000), (fds[1], BAR0 + 0x13004)}
    assert h.transport.bars()[0].address == BAR0 + 0x10000
    h.transport.close()
    assert h.ioevents.registered == set()


def test_guest_bar_move_is_reported_to_the_relocator(h: Harness) -> None:
    moves: list[tuple[int, int]] = []

    class Relocator:
        def relocate_bar(self, device: PciDevice, move: Any) -> bool:
            moves.append((move.old_address, move.new_address))
            device.move_bar(move.old_address, move.new_address)
            return True

    h.pci_bus.set_relocator(Relocator())
    new = 0x3_0000_0000
    h.cfg_write(PciHeaderOffset.BAR0, new & 0xFFFF_FFFF | 4, 4)
    h.cfg_write(PciHeaderOffset.BAR0 + 4, new >> 32, 4)
    assert moves == [(BAR0, new)]
    assert (h.transport.notify_fds[0], new + 0x3000) in h.ioevents.registered


# Feature negotiation and the status state machine.


def test_features_ok_refused_without_version_1(h: Harness) -> None:
    status = negotiate(h, EVENT_IDX)
    assert status == ACK | DRIVER
    assert h.device.acked == []


def test_features_ok_refused_for_unoffered_features(h: Harness) -> None:
    assert negotiate(h, VERSION_1 | 1 << 5) == ACK | DRIVER
    assert negotiate(h, VERSION_1 | 1 << 40) == ACK | DRIVER


def test_features_ok_refused_for_bits_beyond_64(h: Harness) -> None:
    common_write(h, "device_status", ACK | DRIVER)
    common_write(h, "driver_feature_select", 2)
    common_write(h, "driver_feature", 1)
    common_write(h, "driver_feature_select", 1)
    common_write(h, "driver_feature", 1)
    common_write(h, "device_status", ACK | DRIVER | FEATURES_OK)
    assert common_read(h, "device_status") == ACK | DRIVER


def test_features_fixed_after_features_ok(h: Harness) -> None:
    assert negotiate(h, VERSION_1) & FEATURES_OK
    common_write(h, "driver_feature_select", 0)
    common_write(h, "driver_feature", BLK_F_FLUSH)
    assert common_read(h, "driver_feature") == 0


def test_device_feature_select_beyond_one_reads_zero(h: Harness) -> None:
    common_write(h, "device_feature_select", 7)
    assert common_read(h, "device_feature") == 0
    assert common_read(h, "device_feature_select") == 7


@pytest.mark.parametrize(
    "sequence",
    [
        [DRIVER],  # DRIVER before ACKNOWLEDGE
        [ACK, ACK | FEATURES_OK],  # skipping DRIVER
        [ACK, ACK | DRIVER | DRIVER_OK],  # DRIVER_OK without FEATURES_OK
    ],
)
def test_out_of_order_status_is_ignored(h: Harness, sequence: list[int]) -> None:
    for value in sequence[:-1]:
        common_write(h, "device_status", value)
    before = common_read(h, "device_status")
    common_write(h, "device_status", sequence[-1])
    assert common_read(h, "device_status") == before
    assert h.device.activations == []


def test_status_bits_cannot_be_cleared_without_reset(h: Harness) -> None:
    negotiate(h, VERSION_1)
    common_write(h, "device_status", ACK)
    assert common_read(h, "device_status") == ACK | DRIVER | FEATURES_OK


def test_failed_is_sticky_until_reset(h: Harness) -> None:
    common_write(h, "device_status", ACK)
    common_write(h, "device_status", ACK | DeviceStatus.FAILED)
    common_write(h, "device_status", ACK | DRIVER)
    assert common_read(h, "device_status") == ACK | DRIVER | DeviceStatus.FAILED


def test_activation_failure_sets_needs_reset_and_interrupts(h: Harness) -> None:
    h.device.fail_activation = True
    bring_up(h)
    assert common_read(h, "device_status") & NEEDS_RESET
    assert common_read(h, "device_status") & DRIVER_OK
    assert h.router.delivered == [0]  # the config vector
    assert not h.transport.activated
    common_write(h, "device_status", 0)
    assert common_read(h, "device_status") == 0


def test_queue_outside_guest_memory_sets_needs_reset(h: Harness) -> None:
    assert negotiate(h, VERSION_1) & FEATURES_OK
    setup_queue(h, 0, 128, 0xFFFF, 0x4000_0000)
    common_write(h, "device_status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert common_read(h, "device_status") & NEEDS_RESET
    assert h.device.activations == []
    assert h.router.delivered == []  # no config vector assigned


def test_device_side_needs_reset(h: Harness) -> None:
    h.transport.set_needs_reset()
    assert common_read(h, "device_status") == NEEDS_RESET
    assert h.router.delivered == []  # before DRIVER_OK no notification
    common_write(h, "device_status", 0)
    bring_up(h)
    h.transport.set_needs_reset()
    assert common_read(h, "device_status") & NEEDS_RESET
    assert h.router.delivered == [0]
    # The driver cannot clear the device's bit by writing status.
    common_write(h, "device_status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert common_read(h, "device_status") & NEEDS_RESET


# Queue setup checks.


def test_queue_size_must_be_a_power_of_two_up_to_max(h: Harness) -> None:
    common_write(h, "queue_select", 1)
    for bad in (0, 3, 100, 256, 0xFFFF):
        common_write(h, "queue_size", bad)
        assert common_read(h, "queue_size") == 128
    common_write(h, "queue_size", 32)
    assert common_read(h, "queue_size") == 32


def test_queue_select_out_of_range_reads_zero_and_ignores_writes(h: Harness) -> None:
    common_write(h, "queue_select", 2)
    for name in (
        "queue_size",
        "queue_msix_vector",
        "queue_enable",
        "queue_notify_off",
        "queue_desc",
    ):
        assert common_read(h, name) == 0
    common_write(h, "queue_size", 16)
    common_write(h, "queue_enable", 1)
    assert not any(q.ready for q in h.transport.queues)
    assert [q.size for q in h.transport.queues] == [256, 128]


def test_enabled_queue_is_frozen(h: Harness) -> None:
    setup_queue(h, 0, 64, 0xFFFF, 0x10000)
    common_write(h, "queue_size", 32)
    common_write(h, "queue_desc", 0x50000)
    common_write(h, "queue_enable", 0)
    assert common_read(h, "queue_size") == 64
    assert common_read(h, "queue_desc") == 0x10000
    assert common_read(h, "queue_enable") == 1


def test_msix_vector_beyond_table_reads_no_vector(h: Harness) -> None:
    common_write(h, "config_msix_vector", 3)
    assert common_read(h, "config_msix_vector") == 0xFFFF
    common_write(h, "queue_msix_vector", 2)
    assert common_read(h, "queue_msix_vector") == 2
    common_write(h, "queue_msix_vector", 99)
    assert common_read(h, "queue_msix_vector") == 0xFFFF


def test_64bit_fields_take_one_qword_access(h: Harness) -> None:
    h.bar_write(field("queue_device")[0], 0x1234_5678_9ABC_DEF0, 8)
    assert h.bar_read(field("queue_device")[0], 8) == 0x1234_5678_9ABC_DEF0
    assert h.bar_read(field("queue_device")[0] + 4, 4) == 0x1234_5678


def test_wrong_width_common_accesses_are_ignored(h: Harness) -> None:
    h.bar_write(field("device_status")[0], ACK, 2)  # status is a byte
    assert common_read(h, "device_status") == 0
    assert h.bar_read(field("num_queues")[0], 4) == 0
    assert h.bar_read(field("num_queues")[0] + 1, 1) == 0
    assert h.bar_read(0x3C, 2) == 0


def test_masked_queue_vector_is_delivered_when_unmasked(h: Harness) -> None:
    bring_up(h)
    h.bar_write(0x4000 + 16 * 1 + 12, 1, 4)  # mask vector 1
    h.transport.trigger(InterruptKind.QUEUE, 0)
    assert h.router.delivered == []
    assert h.bar_read(0x6000, 8) == 0b10
    h.bar_write(0x4000 + 16 * 1 + 12, 0, 4)
    assert h.router.delivered == [1]
    assert h.bar_read(0x6000, 8) == 0


def test_no_vector_means_no_msi(h: Harness) -> None:
    assert negotiate(h, VERSION_1) & FEATURES_OK
    setup_queue(h, 0, 128, 0xFFFF, 0x10000)
    common_write(h, "device_status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    h.transport.trigger(InterruptKind.QUEUE, 0)
    h.transport.trigger(InterruptKind.QUEUE, 7)  # no such queue: ignored
    assert h.router.delivered == []
    assert h.bar_read(0x1000, 1) == 1


def test_only_enabled_queues_are_activated(h: Harness) -> None:
    assert negotiate(h, VERSION_1) & FEATURES_OK
    setup_queue(h, 1, 64, 0xFFFF, 0x20000)
    common_write(h, "device_status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    [activated] = h.device.activations
    assert [a.index for a in activated] == [1]
    assert not activated[0].queue.event_idx


def test_device_config_writes_reach_the_device(h: Harness) -> None:
    h.bar_write(0x2000, 0xAABB, 2)
    assert h.device.config[:2] == b"\xbb\xaa"


def test_pci_cfg_capability_reaches_bar0(h: Harness) -> None:
    pos = h.find_caps()[VirtioPciCapType.PCI_CFG][0]
    h.cfg_write(pos + 4, 0, 1)  # bar
    h.cfg_write(pos + 8, field("num_queues")[0], 4)  # offset
    h.cfg_write(pos + 12, 2, 4)  # length
    assert h.cfg_read(pos + 16, 2) == 2
    h.cfg_write(pos + 8, field("device_status")[0], 4)
    h.cfg_write(pos + 12, 1, 4)
    h.cfg_write(pos + 16, ACK, 1)
    assert common_read(h, "device_status") == ACK
    # A bad window does nothing.
    h.cfg_write(pos + 4, 3, 1)
    h.cfg_write(pos + 16, 0, 1)
    assert common_read(h, "device_status") == ACK


def test_transport_refuses_devices_it_cannot_serve() -> None:
    memory = GuestMemory([(0, 1 << 16)])
    try:
        legacy = FakeDevice()
        legacy.avail_features = EVENT_IDX
        with pytest.raises(ValueError, match="VIRTIO_F_VERSION_1"):
            VirtioPciDevice(legacy, memory, RecordingRouter(), RecordingIoEvents())
        many = FakeDevice()
        many.queue_max_sizes = [16] * 512
        with pytest.raises(ValueError, match="queues"):
            VirtioPciDevice(many, memory, RecordingRouter(), RecordingIoEvents())
    finally:
        memory.close()


def test_layout_of_bar0_regions(h: Harness) -> None:
    caps = h.find_caps()
    regions = sorted((caps[t][2], caps[t][2] + caps[t][3]) for t in (1, 2, 3, 4))
    msix_pos = caps[0x11][0]
    table = h.cfg_read(msix_pos + 4, 4) & ~7
    pba = h.cfg_read(msix_pos + 8, 4) & ~7
    regions += [(table, table + 16 * 3), (pba, pba + 8)]
    pages = [{p >> 12 for p in range(start, end)} for start, end in sorted(regions)]
    for i, a in enumerate(pages):
        for b in pages[i + 1 :]:
            assert not a & b  # no two structures share a 4 KiB page
    assert struct.calcsize("<I") == 4


# Fuzzing: whatever the guest does, nothing escapes and the state stays coherent.


bar_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("bar"),
            st.booleans(),
            st.one_of(
                st.integers(0, 0x40),
                st.integers(-4, BAR0_SIZE + 8),
                st.sampled_from([0x1000, 0x3000, 0x3004, 0x4000, 0x6000]),
            ),
            st.binary(min_size=0, max_size=9),
        ),
        st.tuples(
            st.just("common"),
            st.just(True),
            st.sampled_from([f.offset for f in COMMON_CFG_FIELDS]),
            st.sampled_from(
                [
                    b"\x00",
                    b"\x01",
                    b"\x03",
                    b"\x0b",
                    b"\x0f",
                    b"\xff\xff",
                    b"\x00\x01",
                    b"\x01\x00\x00\x00",
                    b"\xff\xff\xff\xff",
                    b"\x00\x00\x01\x00",
                ]
            ),
        ),
        st.tuples(
            st.just("config"),
            st.booleans(),
            st.integers(-2, 0x102),
            st.binary(min_size=0, max_size=5),
        ),
        st.tuples(st.just("irq"), st.booleans(), st.integers(-1, 3), st.just(b"")),
    ),
    max_size=60,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.integers(0, 3), bar_ops)
def test_fuzzed_bar0_and_config_accesses(
    h: Harness, driver_steps: int, ops: list[tuple[str, bool, int, bytes]]
) -> None:
    common_write(h, "device_status", 0)
    h.device.activations.clear()
    # Let the driver get some way first so that the fuzzing also hits a negotiated or live device.
    if driver_steps >= 1:
        assert negotiate(h, VERSION_1 | EVENT_IDX) & FEATURES_OK
    if driver_steps >= 2:
        enable_msix(h, 3)
        setup_queue(h, 0, 128, 1, 0x10000)
    if driver_steps >= 3:
        common_write(h, "device_status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        assert h.device.activations
    for kind, is_write, offset, data in ops:
        view = memoryview(bytearray(data))
        if kind in ("bar", "common"):
            if is_write:
                h.transport.write(BAR0, offset, view)
            else:
                h.transport.read(BAR0, offset, view)
        elif kind == "config":
            if is_write:
                h.transport.write_config(offset, view)
            else:
                h.transport.read_config(offset, view)
        else:
            h.transport.trigger(InterruptKind.CONFIG if is_write else InterruptKind.QUEUE, offset)
        status = h.transport.status
        for queue in h.transport.queues:
            assert queue.size & (queue.size - 1) == 0 and 0 < queue.size <= queue.max_size
        if status & FEATURES_OK:
            assert h.device.acked and h.device.acked[-1] & VERSION_1
            assert h.device.acked[-1] & ~h.device.avail_features == 0
        if status & DRIVER_OK:
            assert status & FEATURES_OK
            event("reached DRIVER_OK")
        elif status & FEATURES_OK:
            event("reached FEATURES_OK")
        assert common_read(h, "num_queues") == 2
    assert h.cfg_read(0, 4) == 0x1042_1AF4
    # A reset leaves no stale notification behind.
    common_write(h, "device_status", 0)
    for fd in h.transport.notify_fds:
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)


def test_activation_and_reset_are_reported(h: Harness) -> None:
    assert h.events == []
    bring_up(h)
    assert h.events == ["activated"]
    common_write(h, "device_status", 0)
    assert h.events == ["activated", "reset"]
