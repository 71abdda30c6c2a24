"""The virtio PCI transport driving a real device model (virtio-rng) end to end.

A driver stand-in brings the device up through BAR 0 only, lays the queue out with the mock
driver, rings the doorbell through the bus (the path without an ioeventfd) and waits for the
MSI-X vector the device's worker raises. Waits are bounded only to keep a broken build from
hanging; no assertion depends on timing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from nubis.devices.bus import Bus
from nubis.memory import GuestMemory
from nubis.virtio.device import VIRTIO_F_VERSION_1, DeviceStatus
from nubis.virtio.mock import MockSplitQueue
from nubis.virtio.pci import COMMON_CFG_FIELDS, VirtioPciDevice
from nubis.virtio.rng import Rng

BAR0 = 0x1_0000_0000
OFFSETS = {f.name: (f.offset, f.size) for f in COMMON_CFG_FIELDS}
STATUS_UP = (
    DeviceStatus.ACKNOWLEDGE
    | DeviceStatus.DRIVER
    | DeviceStatus.FEATURES_OK
    | DeviceStatus.DRIVER_OK
)


class WaitingRouter:
    """Records delivered vectors and lets the test wait for one."""

    def __init__(self) -> None:
        self.delivered: list[int] = []
        self._changed = threading.Condition()

    def update(self, vector: int, address: int, data: int, masked: bool) -> None:
        pass

    def trigger(self, vector: int) -> None:
        with self._changed:
            self.delivered.append(vector)
            self._changed.notify_all()

    def wait_for(self, vector: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: vector in self.delivered, timeout=30):
                raise AssertionError(f"MSI-X vector {vector} never fired")


class NoIoEvents:
    def register(self, fd: int, address: int) -> None:
        pass

    def unregister(self, fd: int, address: int) -> None:
        pass


class Setup:
    def __init__(self) -> None:
        self.memory = GuestMemory([(0, 1 << 20)])
        self.rng = Rng(queue_size=16)
        self.router = WaitingRouter()
        self.transport = VirtioPciDevice(self.rng, self.memory, self.router, NoIoEvents())
        self.mmio = Bus("mmio")
        self.transport.assign_bar(0, BAR0)
        self.mmio.insert(self.transport, BAR0, self.transport.bars()[0].size)

    def write(self, offset: int, value: int, size: int) -> None:
        self.mmio.write(BAR0 + offset, memoryview(bytearray(value.to_bytes(size, "little"))))

    def read(self, offset: int, size: int) -> int:
        buf = bytearray(size)
        self.mmio.read(BAR0 + offset, memoryview(buf))
        return int.from_bytes(buf, "little")

    def common(self, name: str, value: int) -> None:
        offset, size = OFFSETS[name]
        if size == 8:
            self.write(offset, value & 0xFFFF_FFFF, 4)
            self.write(offset + 4, value >> 32, 4)
        else:
            self.write(offset, value, size)

    def close(self) -> None:
        self.common("device_status", 0)
        self.rng.shutdown()
        self.transport.close()
        self.memory.close()


def find_capability(transport: VirtioPciDevice, cap_id: int) -> int:
    """Walk the capability list for ``cap_id`` the way a driver does."""
    buf = memoryview(bytearray(1))
    transport.read_config(0x34, buf)
    pos = buf[0]
    while pos:
        transport.read_config(pos, buf)
        if buf[0] == cap_id:
            return pos
        transport.read_config(pos + 1, buf)
        pos = buf[0]
    raise AssertionError(f"no capability {cap_id:#x}")


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = Setup()
    yield s
    s.close()


def test_entropy_request_through_pci(setup: Setup) -> None:
    s = setup
    s.common("device_status", 0)
    s.common("device_status", DeviceStatus.ACKNOWLEDGE)
    s.common("device_status", DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    s.common("driver_feature_select", 1)
    s.common("driver_feature", 1 << (VIRTIO_F_VERSION_1 - 32))
    s.common(
        "device_status", DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
    )
    assert s.read(OFFSETS["device_status"][0], 1) & DeviceStatus.FEATURES_OK
    # MSI-X: enable through config space, vector 1 unmasked for the queue.
    msix_control = find_capability(s.transport, 0x11) + 2
    s.transport.write_config(msix_control, memoryview(bytearray((0x8000).to_bytes(2, "little"))))
    s.write(0x4000 + 16 + 0, 0xFEE0_0000, 4)
    s.write(0x4000 + 16 + 8, 0x41, 4)
    s.write(0x4000 + 16 + 12, 0, 4)
    mock = MockSplitQueue(s.memory, 16, 0x10000)
    s.common("queue_select", 0)
    s.common("queue_size", 16)
    s.common("queue_msix_vector", 1)
    s.common("queue_desc", mock.desc_table)
    s.common("queue_driver", mock.avail_ring)
    s.common("queue_device", mock.used_ring)
    s.common("queue_enable", 1)
    s.common("device_status", STATUS_UP)
    assert s.read(OFFSETS["device_status"][0], 1) == STATUS_UP

    chain = mock.add_chain(writable=[64])
    s.write(0x3000, 0, 2)  # doorbell of queue 0 through the bus
    s.router.wait_for(1)
    assert mock.take_used() == [(chain.head, 64)]
    assert s.rng.counters()["bytes"] == 64

    s.common("device_status", 0)
    assert s.read(OFFSETS["device_status"][0], 1) == 0
    assert not s.transport.activated
