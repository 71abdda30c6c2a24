"""Placing PCI BARs in the guest's MMIO windows and moving them when the guest relocates them.

32-bit memory BARs go in the 32-bit device window below 4 GiB, 64-bit BARs in the 64-bit window
above RAM (``nubis.arch.x86_64.layout``); a BAR of size S is S-aligned (PCI Local Bus 3.0,
section 6.2.5.1). :class:`PciMmioMapper` keeps three things in step: the address allocator, the
MMIO :class:`~nubis.devices.bus.Bus` and the device's own idea of where its BARs are. A guest
move that leaves the windows or overlaps another BAR is refused and logged: the BAR keeps
decoding at its old address, and the guest never gets to shadow RAM or another device.
"""

from __future__ import annotations

from nubis._log import getLogger
from nubis.allocator import AddressAllocator, AllocatorError, AllocPolicy, ExactMatch
from nubis.arch.x86_64 import layout
from nubis.devices.bus import Bus, BusError
from nubis.pci.configuration import BarKind, BarReprogramming, PciBar
from nubis.pci.root import PciDevice

__all__ = ["PciBarAllocator", "PciMmioMapper"]

_log = getLogger(__name__)


class PciBarAllocator:
    """The 32-bit and 64-bit MMIO windows BARs are carved from."""

    def __init__(self, mem32: AddressAllocator, mem64: AddressAllocator) -> None:
        self.mem32 = mem32
        self.mem64 = mem64

    @classmethod
    def for_ram_size(cls, ram_size: int) -> PciBarAllocator:
        """The windows of the x86_64 layout for a guest with ``ram_size`` bytes of RAM."""
        return cls(
            AddressAllocator(layout.MEM_32BIT_DEVICES_START, layout.MEM_32BIT_DEVICES_SIZE),
            AddressAllocator(
                layout.mem_64bit_devices_start(ram_size), layout.MEM_64BIT_DEVICES_SIZE
            ),
        )

    def allocate(self, bar: PciBar) -> int:
        """Reserve a size-aligned range for ``bar`` in the window of its kind."""
        window = self.mem64 if bar.kind is BarKind.MEMORY64 else self.mem32
        return window.allocate(bar.size, bar.size, AllocPolicy.FIRST_MATCH)

    def _window_holding(self, address: int, size: int, kind: BarKind) -> AddressAllocator:
        windows = [self.mem32] if kind is BarKind.MEMORY32 else [self.mem64, self.mem32]
        for window in windows:
            if window.base <= address and address + size <= window.end:
                return window
        raise AllocatorError(f"[{address:#x}, {address + size:#x}) is outside the PCI MMIO windows")

    def allocate_exact(self, address: int, size: int, kind: BarKind) -> None:
        """Reserve ``[address, address + size)`` in whichever window holds it."""
        self._window_holding(address, size, kind).allocate(size, size, ExactMatch(address))

    def free(self, address: int, size: int, kind: BarKind) -> None:
        """Release the range at ``address``."""
        self._window_holding(address, size, kind).free(address)


class PciMmioMapper:
    """Maps devices' BARs on the MMIO bus and carries out guest BAR relocations."""

    def __init__(self, mmio_bus: Bus, allocator: PciBarAllocator) -> None:
        self._bus = mmio_bus
        self._allocator = allocator

    def map_device(self, device: PciDevice) -> list[PciBar]:
        """Allocate, assign and map every BAR of ``device``; return the placed BARs."""
        placed: list[PciBar] = []
        try:
            for bar in device.bars():
                address = self._allocator.allocate(bar)
                try:
                    device.assign_bar(bar.index, address)
                    self._bus.insert(device, address, bar.size)
                except BaseException:
                    self._allocator.free(address, bar.size, bar.kind)
                    raise
                placed.append(PciBar(bar.index, bar.size, bar.kind, bar.prefetchable, address))
        except BaseException:
            for bar in placed:
                self._bus.remove(bar.address)
                self._allocator.free(bar.address, bar.size, bar.kind)
            raise
        return placed

    def unmap_device(self, device: PciDevice) -> None:
        """Remove every BAR of ``device`` from the bus and release its ranges."""
        for bar in device.bars():
            self._bus.remove(bar.address)
            self._allocator.free(bar.address, bar.size, bar.kind)

    def relocate_bar(self, device: PciDevice, move: BarReprogramming) -> bool:
        """Move a BAR the guest reprogrammed; refuse (and log) moves that leave the windows."""
        try:
            self._allocator.allocate_exact(move.new_address, move.size, move.kind)
        except AllocatorError as exc:
            _log.warning("refused to move BAR %d to %#x: %s", move.index, move.new_address, exc)
            return False
        try:
            self._bus.update_range(move.old_address, move.new_address, move.size)
        except BusError as exc:
            self._allocator.free(move.new_address, move.size, move.kind)
            _log.warning("refused to move BAR %d to %#x: %s", move.index, move.new_address, exc)
            return False
        try:
            self._allocator.free(move.old_address, move.size, move.kind)
        except AllocatorError as exc:
            _log.warning("BAR %d left a range the allocator did not hold: %s", move.index, exc)
        device.move_bar(move.old_address, move.new_address)
        return True
