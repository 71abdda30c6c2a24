"""The virtio PCI transport (virtio 1.2, section 4.1): one PCI function per virtio device.

The function has vendor id 0x1AF4, device id 0x1040 plus the virtio device type, revision 1
(a modern, non-transitional device, 4.1.2) and one 64-bit memory BAR, BAR 0, laid out as::

    0x0000  common configuration structure (4.1.4.3)      COMMON_CFG_OFFSET
    0x1000  ISR status byte (4.1.4.5)                      ISR_CFG_OFFSET
    0x2000  device-specific configuration (4.1.4.6)        DEVICE_CFG_OFFSET
    0x3000  notification doorbells, 4 bytes per queue (4.1.4.4)  NOTIFY_CFG_OFFSET
    0x4000  MSI-X table                                     MSIX_TABLE_OFFSET
    0x6000  MSI-X pending bit array                        MSIX_PBA_OFFSET

Vendor capabilities of cfg_type 1 to 4 point the driver at these structures, and a PCI
configuration access capability (cfg_type 5, 4.1.4.9) lets it reach BAR 0 through
configuration space. The MSI-X table and PBA each sit in their own 4 KiB pages (PCI Local Bus
3.0, section 6.8.2).

The transport runs the device status state machine (2.1): feature negotiation with the
FEATURES_OK check (2.2), queue setup, activation of the :class:`~nubis.virtio.device.VirtioDevice`
at DRIVER_OK and reset when the driver writes 0. Each queue has an eventfd; its doorbell address
is handed to an injected :class:`IoEventRegistrar` so the VMM registers it as a KVM ioeventfd and
notifications never leave the kernel. A doorbell write that still reaches the transport through
the MMIO bus signals the same eventfd. The transport is the device's
:class:`~nubis.virtio.device.VirtioInterrupt`: it sets ISR bits and fires the MSI-X vector the
driver chose for the queue or for configuration changes.

Everything the driver writes is checked; a bad value is ignored (logged at debug level) or, when
the device cannot work with the driver's setup, answered with DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Callable, Sequence

from nubis._enum import IntEnum
from nubis._log import DEBUG, getLogger
from nubis._typing import NamedTuple, Protocol
from nubis.pci.configuration import BarKind, BarReprogramming, PciBar, PciConfiguration
from nubis.pci.msix import MSIX_MESSAGE_CONTROL_OFFSET, MsiInterruptRouter, MsixConfig
from nubis.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    ActivatedQueue,
    DeviceStatus,
    DeviceType,
    InterruptKind,
    VirtioDevice,
)
from nubis.virtio.queue import Queue, QueueError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

if TYPE_CHECKING:
    from nubis.memory import GuestMemory

__all__ = [
    "BAR0_SIZE",
    "COMMON_CFG",
    "COMMON_CFG_FIELDS",
    "VIRTIO_MSI_NO_VECTOR",
    "VIRTIO_PCI_CAP",
    "CommonCfgField",
    "IoEventRegistrar",
    "VirtioPciCapType",
    "VirtioPciDevice",
]

_log = getLogger(__name__)

VIRTIO_PCI_VENDOR_ID: Final = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE: Final = 0x1040
VIRTIO_PCI_REVISION: Final = 1
VIRTIO_PCI_SUBSYSTEM_ID: Final = 0x40
VIRTIO_MSI_NO_VECTOR: Final = 0xFFFF
PCI_CAP_ID_VENDOR: Final = 0x09

# PCI class codes (base class, subclass, programming interface) by device type.
_CLASS_CODES: Final = {DeviceType.NET: 0x02_00_00, DeviceType.BLOCK: 0x01_80_00}
_CLASS_CODE_OTHER: Final = 0xFF_00_00

# BAR 0 layout.
BAR0_INDEX: Final = 0
BAR0_SIZE: Final = 0x8000
COMMON_CFG_OFFSET: Final = 0x0000
ISR_CFG_OFFSET: Final = 0x1000
DEVICE_CFG_OFFSET: Final = 0x2000
DEVICE_CFG_SIZE: Final = 0x1000
NOTIFY_CFG_OFFSET: Final = 0x3000
NOTIFY_OFF_MULTIPLIER: Final = 4
MSIX_TABLE_OFFSET: Final = 0x4000
MSIX_PBA_OFFSET: Final = 0x6000
_REGION_SIZE: Final = 0x1000
# The MSI-X table has one vector per queue plus the configuration vector and fits 0x2000 bytes.
MAX_QUEUES: Final = (MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) // 16 - 1

ISR_QUEUE: Final = 0x1
ISR_CONFIG: Final = 0x2


class VirtioPciCapType(IntEnum):
    """The ``cfg_type`` of a virtio vendor capability (4.1.4)."""

    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5


# struct virtio_pci_cap (4.1.4): cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2],
# offset, length. The notify capability appends notify_off_multiplier (4.1.4.4), the PCI
# configuration access capability appends pci_cfg_data[4] (4.1.4.9).
VIRTIO_PCI_CAP: Final = struct.Struct("<BBBBBB2xII")
VIRTIO_PCI_NOTIFY_CAP: Final = struct.Struct("<BBBBBB2xIII")
VIRTIO_PCI_CFG_CAP: Final = struct.Struct("<BBBBBB2xII4s")
_CAP_BAR: Final = 4
_CAP_OFFSET: Final = 8
_CAP_LENGTH: Final = 12
_CFG_CAP_DATA: Final = 16

# struct virtio_pci_common_cfg (4.1.4.3), including the 1.2 fields queue_notify_data and
# queue_reset, which nubis does not offer (their features are never negotiated): they read 0.
COMMON_CFG: Final = struct.Struct("<IIIIHHBBHHHHHQQQHH")


class CommonCfgField(NamedTuple):
    """One field of the common configuration structure."""

    name: str
    offset: int
    size: int


COMMON_CFG_FIELDS: Final = (
    CommonCfgField("device_feature_select", 0x00, 4),
    CommonCfgField("device_feature", 0x04, 4),
    CommonCfgField("driver_feature_select", 0x08, 4),
    CommonCfgField("driver_feature", 0x0C, 4),
    CommonCfgField("config_msix_vector", 0x10, 2),
    CommonCfgField("num_queues", 0x12, 2),
    CommonCfgField("device_status", 0x14, 1),
    CommonCfgField("config_generation", 0x15, 1),
    CommonCfgField("queue_select", 0x16, 2),
    CommonCfgField("queue_size", 0x18, 2),
    CommonCfgField("queue_msix_vector", 0x1A, 2),
    CommonCfgField("queue_enable", 0x1C, 2),
    CommonCfgField("queue_notify_off", 0x1E, 2),
    CommonCfgField("queue_desc", 0x20, 8),
    CommonCfgField("queue_driver", 0x28, 8),
    CommonCfgField("queue_device", 0x30, 8),
    CommonCfgField("queue_notify_data", 0x38, 2),
    CommonCfgField("queue_reset", 0x3A, 2),
)
COMMON_CFG_SIZE: Final = COMMON_CFG.size


def _common_accesses() -> dict[tuple[int, int], tuple[str, int]]:
    """Valid (offset, width) accesses: each field whole, 64-bit fields also as 32-bit halves."""
    accesses: dict[tuple[int, int], tuple[str, int]] = {}
    for field in COMMON_CFG_FIELDS:
        accesses[field.offset, field.size] = (field.name, 0)
        if field.size == 8:
            accesses[field.offset, 4] = (field.name, 0)
            accesses[field.offset + 4, 4] = (field.name, 32)
    return accesses


_COMMON_ACCESSES: Final = _common_accesses()

_PROGRESS_BITS: Final = (
    DeviceStatus.ACKNOWLEDGE
    | DeviceStatus.DRIVER
    | DeviceStatus.FEATURES_OK
    | DeviceStatus.DRIVER_OK
)
# The status values a driver may progress through (2.1, 3.1.1), in order.
_PROGRESS_STEPS: Final = (
    0,
    DeviceStatus.ACKNOWLEDGE,
    DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER,
    DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK,
    _PROGRESS_BITS,
)


class IoEventRegistrar(Protocol):
    """Registers doorbell addresses with the hypervisor (KVM_IOEVENTFD in a VM)."""

    def register(self, fd: int, address: int) -> None:
        """Signal eventfd ``fd`` on every guest write at MMIO ``address``, whatever its width."""
        ...

    def unregister(self, fd: int, address: int) -> None:
        """Undo :meth:`register` for ``fd`` at ``address``."""
        ...


class VirtioPciDevice:
    """A virtio device model behind the virtio PCI transport; a ``PciDevice`` and ``BusDevice``.

    ``memory`` is handed to the device at activation; ``msi_router`` delivers MSI-X vectors
    (vector ``i`` for whatever the driver maps to it, one vector per queue plus one for
    configuration changes); ``ioevents`` registers the queues' doorbells.
    """

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        msi_router: MsiInterruptRouter,
        ioevents: IoEventRegistrar,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        """``on_event`` hears ``"activated"`` and ``"reset"`` (for the VMM's event monitor)."""
        self._on_event = on_event
        max_sizes = list(device.queue_max_sizes)
        if not 1 <= len(max_sizes) <= MAX_QUEUES:
            raise ValueError(
                f"virtio device offers {len(max_sizes)} queues; the PCI transport takes 1 to "
                f"{MAX_QUEUES}"
            )
        features = device.avail_features
        if not features >> VIRTIO_F_VERSION_1 & 1:
            raise ValueError(
                "virtio device does not offer VIRTIO_F_VERSION_1, which the PCI transport needs"
            )
        self.device = device
        self._memory = memory
        self._ioevents = ioevents
        self._avail_features = features & (1 << 64) - 1
        self._queues = [Queue(size) for size in max_sizes]
        self._notify_fds: list[int] = []
        try:
            for _ in max_sizes:
                self._notify_fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except OSError:
            for fd in self._notify_fds:
                os.close(fd)
            raise
        self._registered_base: int | None = None

        self.config = PciConfiguration(
            vendor_id=VIRTIO_PCI_VENDOR_ID,
            device_id=VIRTIO_PCI_DEVICE_ID_BASE + int(device.device_type),
            class_code=_CLASS_CODES.get(device.device_type, _CLASS_CODE_OTHER),
            revision_id=VIRTIO_PCI_REVISION,
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID,
        )
        self.config.add_bar(BAR0_INDEX, BAR0_SIZE, BarKind.MEMORY64)
        self._add_virtio_capabilities()
        self.msix = MsixConfig(
            len(max_sizes) + 1,
            msi_router,
            table_bar=BAR0_INDEX,
            table_offset=MSIX_TABLE_OFFSET,
            pba_bar=BAR0_INDEX,
            pba_offset=MSIX_PBA_OFFSET,
        )
        self._msix_cap = self.config.add_capability(*self.msix.capability())

        # Driver-visible state; driver accesses are serialised by _lock, and the bits the
        # device side changes from worker threads (ISR, DEVICE_NEEDS_RESET, generation) by
        # _irq_lock, which is never held while calling out.
        self._lock = threading.RLock()
        self._irq_lock = threading.Lock()
        self._status = 0
        self._isr = 0
        self._config_generation = 0
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._driver_features = 0
        self._driver_features_unoffered = False
        self._config_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * len(max_sizes)
        self._queue_select = 0
        self._activated = False

    def _add_virtio_capabilities(self) -> None:
        cap_vendor = PCI_CAP_ID_VENDOR
        read_only = bytes(VIRTIO_PCI_CAP.size)
        for cfg_type, offset, length in (
            (VirtioPciCapType.COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_SIZE),
            (VirtioPciCapType.ISR_CFG, ISR_CFG_OFFSET, 1),
            (VirtioPciCapType.DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE),
        ):
            body = VIRTIO_PCI_CAP.pack(
                cap_vendor, 0, VIRTIO_PCI_CAP.size, cfg_type, BAR0_INDEX, 0, offset, length
            )
            self.config.add_capability(body, read_only)
        notify = VIRTIO_PCI_NOTIFY_CAP.pack(
            cap_vendor,
            0,
            VIRTIO_PCI_NOTIFY_CAP.size,
            VirtioPciCapType.NOTIFY_CFG,
            BAR0_INDEX,
            0,
            NOTIFY_CFG_OFFSET,
            len(self._queues) * NOTIFY_OFF_MULTIPLIER,
            NOTIFY_OFF_MULTIPLIER,
        )
        self.config.add_capability(notify, bytes(len(notify)))
        # The driver chooses bar, offset and length, then reads or writes pci_cfg_data.
        pci_cfg = VIRTIO_PCI_CFG_CAP.pack(
            cap_vendor, 0, VIRTIO_PCI_CFG_CAP.size, VirtioPciCapType.PCI_CFG, 0, 0, 0, 0, bytes(4)
        )
        mask = VIRTIO_PCI_CFG_CAP.pack(0, 0, 0, 0, 0xFF, 0, 0xFFFF_FFFF, 0xFFFF_FFFF, b"\xff" * 4)
        self._cfg_cap = self.config.add_capability(pci_cfg, mask)

    # Introspection for the VMM and tests.

    @property
    def status(self) -> int:
        """The device status byte."""
        return self._status

    @property
    def queues(self) -> Sequence[Queue]:
        """The queues, by index."""
        return tuple(self._queues)

    @property
    def notify_fds(self) -> Sequence[int]:
        """The notification eventfd of each queue."""
        return tuple(self._notify_fds)

    @property
    def activated(self) -> bool:
        """True between a successful activation and the next reset."""
        return self._activated

    def close(self) -> None:
        """Unregister the doorbells and close the eventfds; the VM is going away."""
        with self._lock:
            self._unregister_doorbells()
            for fd in self._notify_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._notify_fds = [-1] * len(self._notify_fds)

    # PciDevice: configuration space.

    def read_config(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` from configuration space; reading pci_cfg_data reads BAR 0."""
        data_field = self._cfg_cap + _CFG_CAP_DATA
        if offset < data_field + 4 and data_field < offset + len(data):
            self._pci_cfg_access(write=False)
        self.config.read(offset, data)

    def write_config(self, offset: int, data: memoryview) -> BarReprogramming | None:
        """Apply a configuration write: MSI-X control, pci_cfg_data and BAR moves included."""
        move = self.config.write(offset, data)
        end = offset + len(data)
        control = self._msix_cap + MSIX_MESSAGE_CONTROL_OFFSET
        if offset < control + 2 and control < end:
            self.msix.set_message_control(self.config.read_u16(control))
        data_field = self._cfg_cap + _CFG_CAP_DATA
        if offset < data_field + 4 and data_field < end:
            self._pci_cfg_access(write=True)
        return move

    def _pci_cfg_access(self, *, write: bool) -> None:
        """Carry out a BAR access through the PCI configuration access capability (4.1.4.9)."""
        cap = self._cfg_cap
        bar = self.config.read_u8(cap + _CAP_BAR)
        offset = self.config.read_u32(cap + _CAP_OFFSET)
        length = self.config.read_u32(cap + _CAP_LENGTH)
        if (
            bar != BAR0_INDEX
            or length not in (1, 2, 4)
            or offset % length
            or offset + length > BAR0_SIZE
        ):
            return
        buffer = bytearray(self.config.read_u32(cap + _CFG_CAP_DATA).to_bytes(4, "little"))
        view = memoryview(buffer)[:length]
        if write:
            self._bar_write(offset, view)
        else:
            self._bar_read(offset, view)
            self.config.set_bytes(cap + _CFG_CAP_DATA, bytes(buffer))

    # PciDevice: BARs.

    def bars(self) -> Sequence[PciBar]:
        """BAR 0 with its current address."""
        return self.config.bars()

    def assign_bar(self, index: int, address: int) -> None:
        """Place BAR 0 at ``address`` and register the doorbells there."""
        with self._lock:
            self.config.assign_bar(index, address)
            self._register_doorbells(address)

    def move_bar(self, old_address: int, new_address: int) -> None:
        """Commit a guest relocation of BAR 0 and move the doorbells with it."""
        with self._lock:
            self.config.move_bar(old_address, new_address)
            self._register_doorbells(new_address)

    def _doorbell(self, base: int, queue_index: int) -> int:
        return base + NOTIFY_CFG_OFFSET + queue_index * NOTIFY_OFF_MULTIPLIER

    def _unregister_doorbells(self) -> None:
        base = self._registered_base
        if base is None:
            return
        for index, fd in enumerate(self._notify_fds):
            self._ioevents.unregister(fd, self._doorbell(base, index))
        self._registered_base = None

    def _register_doorbells(self, base: int) -> None:
        self._unregister_doorbells()
        for index, fd in enumerate(self._notify_fds):
            self._ioevents.register(fd, self._doorbell(base, index))
        self._registered_base = base

    # BusDevice: BAR 0 accesses.

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """A driver read from BAR 0; invalid accesses read as zero."""
        self._bar_read(offset, data)

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """A driver write to BAR 0; invalid accesses are dropped."""
        self._bar_write(offset, data)

    @staticmethod
    def _region(offset: int, size: int) -> tuple[int, int] | None:
        """The 4 KiB region and offset inside it, or None if the access does not fit one."""
        if not 1 <= size <= 8 or not 0 <= offset <= BAR0_SIZE - size:
            return None
        start = offset - offset % _REGION_SIZE
        if offset + size > start + _REGION_SIZE:
            return None
        return start, offset - start

    def _bar_read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        located = self._region(offset, size)
        if located is None:
            data[:] = bytes(size)
            return
        region, rel = located
        if region == COMMON_CFG_OFFSET:
            with self._lock:
                value = self._common_read(rel, size)
            data[:] = value.to_bytes(size, "little")
        elif region == ISR_CFG_OFFSET:
            data[:] = bytes(size)
            if rel == 0:
                with self._irq_lock:
                    data[0] = self._isr
                    self._isr = 0
        elif region == DEVICE_CFG_OFFSET:
            self.device.read_config(rel, data)
        elif region in (MSIX_TABLE_OFFSET, MSIX_TABLE_OFFSET + _REGION_SIZE):
            self.msix.read_table(offset - MSIX_TABLE_OFFSET, data)
        elif region == MSIX_PBA_OFFSET:
            self.msix.read_pba(rel, data)
        else:
            data[:] = bytes(size)

    def _bar_write(self, offset: int, data: memoryview) -> None:
        size = len(data)
        located = self._region(offset, size)
        if located is None:
            return
        region, rel = located
        if region == NOTIFY_CFG_OFFSET:
            self._notify(rel, size)
        elif region == COMMON_CFG_OFFSET:
            with self._lock:
                self._common_write(rel, int.from_bytes(data, "little"), size)
        elif region == DEVICE_CFG_OFFSET:
            self.device.write_config(rel, data)
        elif region in (MSIX_TABLE_OFFSET, MSIX_TABLE_OFFSET + _REGION_SIZE):
            self.msix.write_table(offset - MSIX_TABLE_OFFSET, data)
        elif _log.isEnabledFor(DEBUG):
            _log.debug("dropped virtio BAR 0 write of %d bytes at %#x", size, offset)

    def _notify(self, rel: int, size: int) -> None:
        """A doorbell write that did not hit an ioeventfd: signal the queue's eventfd."""
        index = rel // NOTIFY_OFF_MULTIPLIER
        if index >= len(self._notify_fds) or rel % NOTIFY_OFF_MULTIPLIER + size > 4:
            return
        fd = self._notify_fds[index]
        if fd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(fd, 1)

    # The common configuration structure.

    def _selected_queue(self) -> int | None:
        index = self._queue_select
        return index if index < len(self._queues) else None

    def _common_read(self, rel: int, size: int) -> int:
        access = _COMMON_ACCESSES.get((rel, size))
        if access is None:
            return 0
        name, shift = access
        return (self._common_value(name) >> shift) & ((1 << (8 * size)) - 1)

    def _common_value(self, name: str) -> int:
        index = self._selected_queue()
        queue = self._queues[index] if index is not None else None
        match name:
            case "device_feature_select":
                return self._device_feature_select
            case "device_feature":
                select = self._device_feature_select
                return (self._avail_features >> (32 * select)) & 0xFFFF_FFFF if select < 2 else 0
            case "driver_feature_select":
                return self._driver_feature_select
            case "driver_feature":
                select = self._driver_feature_select
                return (self._driver_features >> (32 * select)) & 0xFFFF_FFFF if select < 2 else 0
            case "config_msix_vector":
                return self._config_vector
            case "num_queues":
                return len(self._queues)
            case "device_status":
                return self._status
            case "config_generation":
                return self._config_generation
            case "queue_select":
                return self._queue_select
        if queue is None or index is None:
            return 0
        match name:
            case "queue_size":
                return queue.size
            case "queue_msix_vector":
                return self._queue_vectors[index]
            case "queue_enable":
                return int(queue.ready)
            case "queue_notify_off":
                return index
            case "queue_desc":
                return queue.desc_table
            case "queue_driver":
                return queue.avail_ring
            case "queue_device":
                return queue.used_ring
        return 0

    def _common_write(self, rel: int, value: int, size: int) -> None:
        access = _COMMON_ACCESSES.get((rel, size))
        if access is None:
            if _log.isEnabledFor(DEBUG):
                _log.debug("dropped common config write of %d bytes at %#x", size, rel)
            return
        name, shift = access
        match name:
            case "device_feature_select":
                self._device_feature_select = value
            case "driver_feature_select":
                self._driver_feature_select = value
            case "driver_feature":
                self._write_driver_features(value)
            case "config_msix_vector":
                self._config_vector = self._checked_vector(value)
            case "device_status":
                self._write_status(value)
            case "queue_select":
                self._queue_select = value
            case _:
                self._write_queue_field(name, value, shift, size)

    def _write_driver_features(self, value: int) -> None:
        if self._status & DeviceStatus.FEATURES_OK:
            return  # features are fixed once FEATURES_OK is set (2.2.2)
        select = self._driver_feature_select
        if select < 2:
            shift = 32 * select
            self._driver_features = (self._driver_features & ~(0xFFFF_FFFF << shift)) | (
                value << shift
            )
        elif value:
            self._driver_features_unoffered = True

    def _checked_vector(self, vector: int) -> int:
        """The vector itself if the MSI-X table has it, else NO_VECTOR (4.1.5.1.2)."""
        return vector if vector < self.msix.num_vectors else VIRTIO_MSI_NO_VECTOR

    def _write_queue_field(self, name: str, value: int, shift: int, size: int) -> None:
        index = self._selected_queue()
        if index is None:
            return
        queue = self._queues[index]
        if name == "queue_msix_vector":
            self._queue_vectors[index] = self._checked_vector(value)
            return
        if queue.ready:
            return  # an enabled queue's configuration is fixed until reset (4.1.4.3.2)
        match name:
            case "queue_size":
                if value and value <= queue.max_size and value & (value - 1) == 0:
                    queue.size = value
                elif _log.isEnabledFor(DEBUG):
                    _log.debug(
                        "ignored queue %d size %d: not a power of two up to max", index, value
                    )
            case "queue_enable":
                if value == 1:
                    queue.ready = True
            case "queue_desc":
                queue.desc_table = _merge(queue.desc_table, value, shift, size)
            case "queue_driver":
                queue.avail_ring = _merge(queue.avail_ring, value, shift, size)
            case "queue_device":
                queue.used_ring = _merge(queue.used_ring, value, shift, size)

    # The device status state machine (2.1).

    def _features_acceptable(self) -> bool:
        features = self._driver_features
        return (
            not self._driver_features_unoffered
            and features & ~self._avail_features == 0
            and bool(features >> VIRTIO_F_VERSION_1 & 1)
        )

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        old = self._status
        progress = value & _PROGRESS_BITS
        old_progress = old & _PROGRESS_BITS
        if progress not in _PROGRESS_STEPS or progress & old_progress != old_progress:
            _log.debug("ignored device status %#x after %#x: out of order", value, old)
            return
        new = progress | ((value | old) & DeviceStatus.FAILED)
        newly = new & ~old
        if newly & DeviceStatus.FEATURES_OK:
            if self._features_acceptable():
                self.device.ack_features(self._driver_features)
            else:
                _log.debug(
                    "refused FEATURES_OK: driver features %#x, offered %#x",
                    self._driver_features,
                    self._avail_features,
                )
                new &= ~(DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)
                newly &= ~(DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)
        with self._irq_lock:
            self._status = new | (self._status & DeviceStatus.DEVICE_NEEDS_RESET)
        if newly & DeviceStatus.DRIVER_OK:
            self._activate()

    def _activate(self) -> None:
        event_idx = bool(self._driver_features >> VIRTIO_F_RING_EVENT_IDX & 1)
        activated = []
        for index, queue in enumerate(self._queues):
            if queue.ready:
                queue.event_idx = event_idx
                activated.append(ActivatedQueue(index, queue, self._notify_fds[index]))
        try:
            for item in activated:
                item.queue.validate(self._memory)
            self.device.activate(self._memory, self, activated)
        except (QueueError, ValueError) as exc:
            _log.warning("virtio %s device cannot start: %s", self.device.device_type.name, exc)
            self.set_needs_reset()
            return
        self._activated = True
        if self._on_event is not None:
            self._on_event("activated")

    def _reset(self) -> None:
        if self._status:
            self.device.reset()
            if self._on_event is not None:
                self._on_event("reset")
        self._activated = False
        for queue in self._queues:
            queue.reset()
        for fd in self._notify_fds:
            if fd >= 0:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._driver_features = 0
        self._driver_features_unoffered = False
        self._config_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * len(self._queues)
        self._queue_select = 0
        with self._irq_lock:
            self._isr = 0
            self._status = 0

    def set_needs_reset(self) -> None:
        """Set DEVICE_NEEDS_RESET; after DRIVER_OK, tell the driver with a config interrupt."""
        with self._irq_lock:
            self._status |= DeviceStatus.DEVICE_NEEDS_RESET
            driver_ok = bool(self._status & DeviceStatus.DRIVER_OK)
        if driver_ok:
            self.trigger(InterruptKind.CONFIG)

    # VirtioInterrupt.

    def trigger(self, kind: InterruptKind, queue_index: int = 0) -> None:
        """Raise a used-buffer (queue) or configuration-change interrupt (4.1.4.5, 4.1.5.1.2)."""
        if kind is InterruptKind.QUEUE:
            if not 0 <= queue_index < len(self._queue_vectors):
                return
            with self._irq_lock:
                self._isr |= ISR_QUEUE
            vector = self._queue_vectors[queue_index]
        else:
            with self._irq_lock:
                self._isr |= ISR_CONFIG
                self._config_generation = (self._config_generation + 1) & 0xFF
            vector = self._config_vector
        if vector != VIRTIO_MSI_NO_VECTOR:
            self.msix.trigger(vector)


def _merge(current: int, value: int, shift: int, size: int) -> int:
    """Replace ``size`` bytes of the 64-bit ``current`` at bit ``shift`` with ``value``."""
    mask = ((1 << (8 * size)) - 1) << shift
    return (current & ~mask) | ((value << shift) & mask)
