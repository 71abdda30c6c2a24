"""The PCI root: bus 0 with a host bridge, and the two configuration access mechanisms.

nubis has one flat PCI segment with one bus. Slot 0 holds the host bridge, slots 1 to 31 hold
single-function devices. A driver reaches configuration space two ways:

* the configuration mechanism #1 ports (PCI Local Bus 3.0, section 3.2.2.3.2): a dword
  address register at 0xCF8 (enable bit 31, bus 23:16, device 15:11, function 10:8, register
  7:2) and a data window at 0xCFC-0xCFF that takes byte, word and dword accesses;
* ECAM (PCIe base spec, section 7.2.2): a memory window where offset
  ``bus << 20 | device << 15 | function << 12 | register`` reaches the 4 KiB of each function.

Both are :class:`~nubis.devices.bus.BusDevice`\\ s. A read from a function that does not exist
returns all ones, which is how a driver sees an empty slot; writes there are dropped.

When a configuration write reprograms a BAR, the bus hands the move to an injected
:class:`BarRelocator` (in a VM, :class:`nubis.pci.mapping.PciMmioMapper`), which moves the MMIO
range and commits the move on the device.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from nubis._log import getLogger
from nubis._typing import Protocol
from nubis.arch.x86_64.layout import PCI_MMCONFIG_SIZE
from nubis.pci.configuration import (
    LEGACY_CONFIG_SPACE_SIZE,
    BarReprogramming,
    PciBar,
    PciConfiguration,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "HOST_BRIDGE_CLASS",
    "HOST_BRIDGE_DEVICE_ID",
    "HOST_BRIDGE_VENDOR_ID",
    "NUM_SLOTS",
    "BarRelocator",
    "PciBus",
    "PciConfigIo",
    "PciConfigMmio",
    "PciDevice",
    "PciHostBridge",
]

_log = getLogger(__name__)

NUM_SLOTS: Final = 32
HOST_BRIDGE_VENDOR_ID: Final = 0x8086
# nubis's own choice of device id for its host bridge; it only has to be an id no driver binds.
HOST_BRIDGE_DEVICE_ID: Final = 0xFFF0
HOST_BRIDGE_CLASS: Final = 0x06_00_00  # bridge device, host bridge

# Configuration mechanism #1 address register (section 3.2.2.3.2).
CONFIG_ADDRESS_ENABLE: Final = 1 << 31
_CONFIG_ADDRESS_MASK: Final = 0x80FF_FFFC
CONFIG_IO_DATA_OFFSET: Final = 4
CONFIG_IO_SIZE: Final = 8

# ECAM offset fields (PCIe base spec, section 7.2.2, table 7-1).
ECAM_BUS_SHIFT: Final = 20
ECAM_DEVICE_SHIFT: Final = 15
ECAM_FUNCTION_SHIFT: Final = 12
ECAM_REGISTER_MASK: Final = 0xFFF


class PciDevice(Protocol):
    """A PCI function as the root bus and the VMM see it.

    Configuration accesses arrive with an offset into the function's configuration space; BAR
    accesses arrive through the MMIO bus as a :class:`~nubis.devices.bus.BusDevice`, with
    ``base`` the address of the BAR that was hit.
    """

    def read_config(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` from configuration space at ``offset``."""
        ...

    def write_config(self, offset: int, data: memoryview) -> BarReprogramming | None:
        """Apply a configuration write; return the BAR move it asks for, if any."""
        ...

    def bars(self) -> Sequence[PciBar]:
        """The function's BARs with their current addresses."""
        ...

    def assign_bar(self, index: int, address: int) -> None:
        """Place BAR ``index`` at ``address`` before the guest runs."""
        ...

    def move_bar(self, old_address: int, new_address: int) -> None:
        """Commit a guest relocation: the BAR at ``old_address`` now decodes at ``new_address``."""
        ...

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """A read from the BAR at ``base``."""
        ...

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """A write to the BAR at ``base``."""
        ...


class BarRelocator(Protocol):
    """Moves a BAR's MMIO range when the guest reprograms the BAR."""

    def relocate_bar(self, device: PciDevice, move: BarReprogramming) -> bool:
        """Move the range and commit it with ``device.move_bar``; False if the move is refused."""
        ...


class PciHostBridge:
    """The host bridge at 00:00.0: ids and class only, no BARs, no capabilities."""

    def __init__(self) -> None:
        self.config = PciConfiguration(
            vendor_id=HOST_BRIDGE_VENDOR_ID,
            device_id=HOST_BRIDGE_DEVICE_ID,
            class_code=HOST_BRIDGE_CLASS,
        )

    def read_config(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` from configuration space at ``offset``."""
        self.config.read(offset, data)

    def write_config(self, offset: int, data: memoryview) -> BarReprogramming | None:
        """Apply a configuration write (only the command and scratch registers change)."""
        return self.config.write(offset, data)

    def bars(self) -> Sequence[PciBar]:
        """The host bridge has no BARs."""
        return ()

    def assign_bar(self, index: int, address: int) -> None:
        """The host bridge has no BARs to place."""
        raise ValueError("the PCI host bridge has no BARs")

    def move_bar(self, old_address: int, new_address: int) -> None:
        """The host bridge has no BARs to move."""
        raise ValueError("the PCI host bridge has no BARs")

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """No BAR is ever mapped; reads return all ones."""
        data[:] = b"\xff" * len(data)

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """No BAR is ever mapped; writes are dropped."""


class PciBus:
    """Bus 0 of the single PCI segment: the host bridge in slot 0, devices in slots 1 to 31."""

    def __init__(self, relocator: BarRelocator | None = None) -> None:
        self._slots: list[PciDevice | None] = [None] * NUM_SLOTS
        self._slots[0] = PciHostBridge()
        self._relocator = relocator
        self._lock = threading.Lock()

    def set_relocator(self, relocator: BarRelocator) -> None:
        """Install the object that moves BAR ranges when the guest reprograms a BAR."""
        self._relocator = relocator

    def add_device(self, device: PciDevice, slot: int | None = None) -> int:
        """Plug ``device`` into ``slot`` (the lowest free one if None) and return the slot."""
        with self._lock:
            if slot is None:
                free = [s for s in range(1, NUM_SLOTS) if self._slots[s] is None]
                if not free:
                    raise ValueError("cannot add a PCI device: all 31 slots of bus 0 are in use")
                slot = free[0]
            elif not 1 <= slot < NUM_SLOTS:
                raise ValueError(f"PCI slot {slot} is not between 1 and 31")
            elif self._slots[slot] is not None:
                raise ValueError(f"PCI slot {slot} is already in use")
            self._slots[slot] = device
            return slot

    def remove_device(self, slot: int) -> PciDevice:
        """Unplug and return the device in ``slot``."""
        with self._lock:
            device = self._slots[slot] if 1 <= slot < NUM_SLOTS else None
            if device is None:
                raise ValueError(f"PCI slot {slot} holds no device")
            self._slots[slot] = None
            return device

    def device(self, slot: int) -> PciDevice | None:
        """The device in ``slot`` (slot 0 is the host bridge), or None."""
        return self._slots[slot] if 0 <= slot < NUM_SLOTS else None

    def _function(self, bus: int, slot: int, function: int) -> PciDevice | None:
        if bus != 0 or function != 0 or not 0 <= slot < NUM_SLOTS:
            return None
        return self._slots[slot]

    def read_config(
        self, bus: int, slot: int, function: int, offset: int, data: memoryview
    ) -> None:
        """Read configuration space of ``bus:slot.function``; absent functions read all ones."""
        with self._lock:
            device = self._function(bus, slot, function)
            if device is None:
                data[:] = b"\xff" * len(data)
                return
            device.read_config(offset, data)

    def write_config(
        self, bus: int, slot: int, function: int, offset: int, data: memoryview
    ) -> None:
        """Write configuration space of ``bus:slot.function`` and carry out any BAR move."""
        with self._lock:
            device = self._function(bus, slot, function)
            if device is None:
                return
            move = device.write_config(offset, data)
            if move is None:
                return
            if self._relocator is None:
                _log.warning(
                    "PCI %02x:%02x.%x BAR %d: no relocator, the move to %#x is ignored",
                    bus,
                    slot,
                    function,
                    move.index,
                    move.new_address,
                )
                return
            self._relocator.relocate_bar(device, move)


class PciConfigIo:
    """Configuration mechanism #1 at ports 0xCF8-0xCFF, as a bus device of 8 ports."""

    def __init__(self, pci_bus: PciBus) -> None:
        self._pci_bus = pci_bus
        self._address = 0
        self._lock = threading.Lock()

    @property
    def config_address(self) -> int:
        """The current value of the address register."""
        return self._address

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """Read the address register (0xCF8) or the selected configuration data (0xCFC-0xCFF)."""
        size = len(data)
        with self._lock:
            address = self._address
            if offset < CONFIG_IO_DATA_OFFSET:
                if offset >= 0 and offset + size <= CONFIG_IO_DATA_OFFSET:
                    data[:] = address.to_bytes(4, "little")[offset : offset + size]
                else:
                    data[:] = b"\xff" * size
                return
            target = self._target(address, offset, size)
            if target is None:
                data[:] = b"\xff" * size
                return
            self._pci_bus.read_config(*target, data)

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """Set the address register (dword writes only) or write the selected configuration data."""
        size = len(data)
        with self._lock:
            if offset < CONFIG_IO_DATA_OFFSET:
                if offset == 0 and size == 4:
                    self._address = int.from_bytes(data, "little") & _CONFIG_ADDRESS_MASK
                return
            target = self._target(self._address, offset, size)
            if target is not None:
                self._pci_bus.write_config(*target, data)

    @staticmethod
    def _target(address: int, offset: int, size: int) -> tuple[int, int, int, int] | None:
        """Decode (bus, slot, function, register offset) for a data window access."""
        byte = offset - CONFIG_IO_DATA_OFFSET
        if not address & CONFIG_ADDRESS_ENABLE or size not in (1, 2, 4) or byte + size > 4:
            return None
        if byte % size:
            return None
        register = (address & 0xFC) + byte
        if register + size > LEGACY_CONFIG_SPACE_SIZE:
            return None
        return (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7, register


class PciConfigMmio:
    """The ECAM window (PCIe base spec, section 7.2.2) as a bus device of ``size`` bytes."""

    def __init__(self, pci_bus: PciBus, size: int = PCI_MMCONFIG_SIZE) -> None:
        self._pci_bus = pci_bus
        self.size = size

    @staticmethod
    def decode(offset: int) -> tuple[int, int, int, int]:
        """Split an ECAM offset into (bus, slot, function, register offset)."""
        return (
            (offset >> ECAM_BUS_SHIFT) & 0xFF,
            (offset >> ECAM_DEVICE_SHIFT) & 0x1F,
            (offset >> ECAM_FUNCTION_SHIFT) & 0x7,
            offset & ECAM_REGISTER_MASK,
        )

    @staticmethod
    def _valid(offset: int, size: int) -> bool:
        return size in (1, 2, 4) and offset % size == 0 and offset >= 0

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """Read the configuration space of the function the offset selects."""
        if not self._valid(offset, len(data)):
            data[:] = b"\xff" * len(data)
            return
        self._pci_bus.read_config(*self.decode(offset), data)

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """Write the configuration space of the function the offset selects."""
        if self._valid(offset, len(data)):
            self._pci_bus.write_config(*self.decode(offset), data)
