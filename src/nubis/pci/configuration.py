"""The configuration space of one PCI function: type 0 header, BARs and the capability list.

A conventional PCI function has 256 bytes of configuration space (PCI Local Bus 3.0, section
6.1); PCI Express extends it to 4 KiB, reachable only through ECAM (PCIe base spec, section
7.2.2). nubis models the full 4 KiB; the port I/O mechanism sees the first 256 bytes, and the
extended part reads as zero, which tells the driver there are no extended capabilities.

Every byte has a writable mask: a driver write changes only the writable bits and read-only
fields (ids, class code, capability pointers) keep their values. A memory BAR (section 6.2.5.1)
is sized by writing all ones and reading back: its address bits below the BAR's size are
read-only zero, so the mask alone produces the size encoding. When the driver programs a new
address, :meth:`PciConfiguration.write` returns a :class:`BarReprogramming` event instead of
moving anything itself; whoever owns the MMIO bus moves the range and then commits the move
with :meth:`PciConfiguration.move_bar`. A refused move leaves the BAR decoding at its old place.

The model does no I/O and holds no lock; the owner of the function serialises accesses.
"""

from __future__ import annotations

import struct

from nubis._enum import Enum, IntEnum
from nubis._frozen import Frozen, replace
from nubis._log import DEBUG, getLogger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "BAR_COUNT",
    "CAPABILITIES_START",
    "CONFIG_SPACE_SIZE",
    "LEGACY_CONFIG_SPACE_SIZE",
    "TYPE0_HEADER",
    "BarKind",
    "BarReprogramming",
    "PciBar",
    "PciConfiguration",
    "PciHeaderOffset",
]

_log = getLogger(__name__)

CONFIG_SPACE_SIZE: Final = 4096
LEGACY_CONFIG_SPACE_SIZE: Final = 256
BAR_COUNT: Final = 6
CAPABILITIES_START: Final = 0x40

# The type 0 configuration header (PCI Local Bus 3.0, section 6.1, figure 6-1): vendor id,
# device id, command, status, revision id, programming interface, subclass, base class, cache
# line size, latency timer, header type, BIST, six BARs, CardBus CIS pointer, subsystem vendor
# id, subsystem id, expansion ROM base, capabilities pointer, 7 reserved bytes, interrupt line,
# interrupt pin, min_gnt, max_lat.
TYPE0_HEADER: Final = struct.Struct("<HHHHBBBBBBBB6IIHHIB7xBBBB")


class PciHeaderOffset(IntEnum):
    """Byte offsets of the type 0 header fields (PCI Local Bus 3.0, section 6.1)."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    PROG_IF = 0x09
    SUBCLASS = 0x0A
    CLASS_CODE = 0x0B
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BAR0 = 0x10
    CARDBUS_CIS = 0x28
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    EXPANSION_ROM = 0x30
    CAPABILITIES_POINTER = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D
    MIN_GNT = 0x3E
    MAX_LAT = 0x3F


# Command register bits a driver may set (section 6.2.2): I/O space, memory space, bus master,
# parity error response, SERR# enable, interrupt disable.
COMMAND_WRITABLE: Final = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400
COMMAND_MEMORY_SPACE: Final = 0x0002
STATUS_CAPABILITIES_LIST: Final = 0x0010

# Low bits of a memory BAR (section 6.2.5.1).
_BAR_TYPE_64BIT: Final = 0b100
_BAR_PREFETCHABLE: Final = 0b1000
_BAR_MEM_ADDRESS_MASK: Final = 0xFFFF_FFF0
_MIN_BAR_SIZE: Final = 16
_U32: Final = 0xFFFF_FFFF


class BarKind(Enum):
    """The address space a memory BAR decodes (PCI Local Bus 3.0, section 6.2.5.1)."""

    MEMORY32 = "memory32"
    MEMORY64 = "memory64"


class PciBar(Frozen):
    """One BAR of a function: its index, size in bytes, kind, prefetchable flag and address.

    ``address`` is where the BAR currently decodes on the MMIO bus (0 until it is assigned).
    """

    __slots__ = ("address", "index", "kind", "prefetchable", "size")

    index: int
    size: int
    kind: BarKind
    prefetchable: bool
    address: int

    def __init__(
        self, index: int, size: int, kind: BarKind, prefetchable: bool = False, address: int = 0
    ) -> None:
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "prefetchable", prefetchable)
        object.__setattr__(self, "address", address)


class BarReprogramming(Frozen):
    """The driver wrote a new address into BAR ``index``: move ``[old, old + size)`` to ``new``."""

    __slots__ = ("index", "kind", "new_address", "old_address", "size")

    index: int
    old_address: int
    new_address: int
    size: int
    kind: BarKind

    def __init__(
        self, index: int, old_address: int, new_address: int, size: int, kind: BarKind
    ) -> None:
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "old_address", old_address)
        object.__setattr__(self, "new_address", new_address)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "kind", kind)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class PciConfiguration:
    """The 4 KiB configuration space of one type 0 PCI function.

    ``class_code`` is the 24-bit base class, subclass and programming interface
    (``0x018000`` is a mass storage controller of subclass "other").
    """

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision_id: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
    ) -> None:
        for name, value, limit in (
            ("vendor id", vendor_id, 0xFFFF),
            ("device id", device_id, 0xFFFF),
            ("class code", class_code, 0xFF_FFFF),
            ("revision id", revision_id, 0xFF),
            ("subsystem vendor id", subsystem_vendor_id, 0xFFFF),
            ("subsystem id", subsystem_id, 0xFFFF),
            ("interrupt pin", interrupt_pin, 4),
        ):
            if not 0 <= value <= limit:
                raise ValueError(f"PCI {name} {value:#x} does not fit its field")
        self._regs = bytearray(CONFIG_SPACE_SIZE)
        self._wmask = bytearray(CONFIG_SPACE_SIZE)
        TYPE0_HEADER.pack_into(
            self._regs,
            0,
            vendor_id,
            device_id,
            0,  # command
            0,  # status
            revision_id,
            class_code & 0xFF,
            (class_code >> 8) & 0xFF,
            class_code >> 16,
            0,  # cache line size
            0,  # latency timer
            0,  # header type 0, single function
            0,  # BIST not supported
            *([0] * BAR_COUNT),
            0,  # CardBus CIS pointer
            subsystem_vendor_id,
            subsystem_id,
            0,  # no expansion ROM
            0,  # capabilities pointer
            0,  # interrupt line
            interrupt_pin,
            0,  # min_gnt
            0,  # max_lat
        )
        self._set_mask(PciHeaderOffset.COMMAND, 2, COMMAND_WRITABLE)
        self._set_mask(PciHeaderOffset.CACHE_LINE_SIZE, 1, 0xFF)
        self._set_mask(PciHeaderOffset.INTERRUPT_LINE, 1, 0xFF)
        self._bars: list[PciBar | None] = [None] * BAR_COUNT
        # Index of the BAR whose upper half lives in each BAR register, for 64-bit BARs.
        self._upper_half_of: list[int | None] = [None] * BAR_COUNT
        self._last_capability: int | None = None
        self._next_capability = CAPABILITIES_START

    # Raw helpers for the owner of the function (they bypass the writable masks).

    def _set_mask(self, offset: int, size: int, mask: int) -> None:
        self._wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def read_u8(self, offset: int) -> int:
        """The byte at ``offset`` (no side effects)."""
        return self._regs[offset]

    def read_u16(self, offset: int) -> int:
        """The little-endian 16-bit value at ``offset`` (no side effects)."""
        return int.from_bytes(self._regs[offset : offset + 2], "little")

    def read_u32(self, offset: int) -> int:
        """The little-endian 32-bit value at ``offset`` (no side effects)."""
        return int.from_bytes(self._regs[offset : offset + 4], "little")

    def set_bytes(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` regardless of the writable mask (device-side update)."""
        if offset < 0 or offset + len(data) > CONFIG_SPACE_SIZE:
            raise ValueError(f"config space range {offset:#x}+{len(data)} is outside 4 KiB")
        self._regs[offset : offset + len(data)] = data

    # Capabilities (section 6.7).

    def add_capability(self, body: bytes, writable_mask: bytes | None = None) -> int:
        """Append a capability and return its offset in configuration space.

        ``body`` starts with the capability id and a placeholder next-pointer byte, which is
        filled in here; ``writable_mask`` (same length) marks the bits a driver may change.
        Capabilities live in the first 256 bytes, dword aligned, linked from offset 0x34.
        """
        if len(body) < 2:
            raise ValueError("a PCI capability needs at least its id and next pointer bytes")
        if writable_mask is not None and len(writable_mask) != len(body):
            raise ValueError("the capability's writable mask must be as long as its body")
        offset = self._next_capability
        end = offset + len(body)
        if end > LEGACY_CONFIG_SPACE_SIZE:
            raise ValueError(
                f"no room for a {len(body)}-byte capability in the 256-byte config space"
            )
        self._regs[offset:end] = body
        self._regs[offset + 1] = 0
        if writable_mask is not None:
            self._wmask[offset:end] = writable_mask
        self._wmask[offset] = self._wmask[offset + 1] = 0
        if self._last_capability is None:
            self._regs[PciHeaderOffset.CAPABILITIES_POINTER] = offset
        else:
            self._regs[self._last_capability + 1] = offset
        status = self.read_u16(PciHeaderOffset.STATUS) | STATUS_CAPABILITIES_LIST
        self._regs[PciHeaderOffset.STATUS : PciHeaderOffset.STATUS + 2] = status.to_bytes(
            2, "little"
        )
        self._last_capability = offset
        self._next_capability = (end + 3) & ~3
        return offset

    # BARs (section 6.2.5.1).

    def add_bar(
        self, index: int, size: int, kind: BarKind, *, prefetchable: bool = False
    ) -> PciBar:
        """Declare memory BAR ``index`` of ``size`` bytes (a power of two, at least 16).

        A 64-bit BAR also takes register ``index + 1`` for its upper half.
        """
        registers = 2 if kind is BarKind.MEMORY64 else 1
        if not 0 <= index <= BAR_COUNT - registers:
            raise ValueError(f"BAR {index} of kind {kind.value} does not fit in the six BAR slots")
        if any(
            self._bars[i] is not None or self._upper_half_of[i] is not None
            for i in range(index, index + registers)
        ):
            raise ValueError(f"BAR register {index} is already in use")
        limit = 1 << 63 if kind is BarKind.MEMORY64 else 1 << 31
        if not _is_power_of_two(size) or not _MIN_BAR_SIZE <= size <= limit:
            raise ValueError(
                f"BAR size {size:#x} must be a power of two between 16 bytes and {limit:#x}"
            )
        bar = PciBar(index, size, kind, prefetchable)
        self._bars[index] = bar
        flags = (_BAR_TYPE_64BIT if kind is BarKind.MEMORY64 else 0) | (
            _BAR_PREFETCHABLE if prefetchable else 0
        )
        offset = PciHeaderOffset.BAR0 + 4 * index
        self.set_bytes(offset, flags.to_bytes(4, "little"))
        address_mask = ~(size - 1)
        self._set_mask(offset, 4, address_mask & _BAR_MEM_ADDRESS_MASK)
        if kind is BarKind.MEMORY64:
            self._upper_half_of[index + 1] = index
            self._set_mask(offset + 4, 4, (address_mask >> 32) & _U32)
        return bar

    def bars(self) -> list[PciBar]:
        """The declared BARs with the addresses they decode at, by index."""
        return [bar for bar in self._bars if bar is not None]

    def bar(self, index: int) -> PciBar:
        """BAR ``index``; raises ``ValueError`` if it is not declared."""
        bar = self._bars[index] if 0 <= index < BAR_COUNT else None
        if bar is None:
            raise ValueError(f"BAR {index} is not declared")
        return bar

    def _bar_register_address(self, bar: PciBar) -> int:
        offset = PciHeaderOffset.BAR0 + 4 * bar.index
        address = self.read_u32(offset) & _BAR_MEM_ADDRESS_MASK
        if bar.kind is BarKind.MEMORY64:
            address |= self.read_u32(offset + 4) << 32
        return address

    def _bar_is_sizing(self, bar: PciBar) -> bool:
        """True while some half of the BAR holds all ones (the driver is sizing it)."""
        offset = PciHeaderOffset.BAR0 + 4 * bar.index
        halves = 2 if bar.kind is BarKind.MEMORY64 else 1
        for half in range(halves):
            mask = int.from_bytes(self._wmask[offset + 4 * half : offset + 4 * half + 4], "little")
            if mask and self.read_u32(offset + 4 * half) & mask == mask:
                return True
        return False

    def assign_bar(self, index: int, address: int) -> PciBar:
        """Place BAR ``index`` at ``address`` (its initial placement, before the guest runs)."""
        bar = self.bar(index)
        limit = 1 << 64 if bar.kind is BarKind.MEMORY64 else 1 << 32
        if address % bar.size or not 0 <= address <= limit - bar.size:
            raise ValueError(
                f"BAR {index} of {bar.size:#x} bytes cannot be placed at {address:#x}: "
                "the address must be size-aligned and inside the BAR's address space"
            )
        offset = PciHeaderOffset.BAR0 + 4 * index
        low = (self.read_u32(offset) & ~_BAR_MEM_ADDRESS_MASK) | (address & _BAR_MEM_ADDRESS_MASK)
        self.set_bytes(offset, low.to_bytes(4, "little"))
        if bar.kind is BarKind.MEMORY64:
            self.set_bytes(offset + 4, (address >> 32).to_bytes(4, "little"))
        placed = replace(bar, address=address)
        self._bars[index] = placed
        return placed

    def move_bar(self, old_address: int, new_address: int) -> PciBar:
        """Commit a move: the BAR decoding at ``old_address`` now decodes at ``new_address``."""
        for index, bar in enumerate(self._bars):
            if bar is not None and bar.address == old_address:
                moved = replace(bar, address=new_address)
                self._bars[index] = moved
                return moved
        raise ValueError(f"no BAR decodes at {old_address:#x}")

    # Driver accesses.

    @staticmethod
    def access_is_valid(offset: int, size: int, limit: int = CONFIG_SPACE_SIZE) -> bool:
        """True for a 1, 2 or 4-byte access inside ``limit`` that does not cross a dword."""
        return (
            size in (1, 2, 4) and offset >= 0 and offset + size <= limit and offset % 4 + size <= 4
        )

    def read(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` from ``offset``; an invalid width or offset reads as all ones."""
        size = len(data)
        if not self.access_is_valid(offset, size):
            data[:] = b"\xff" * size
            return
        data[:] = self._regs[offset : offset + size]

    def write(self, offset: int, data: memoryview) -> BarReprogramming | None:
        """Apply a driver write through the writable masks; invalid accesses are dropped.

        Returns the BAR move the write asks for, if any: a write to either half of a BAR that
        changes its address asks for a move, so a 64-bit BAR written half by half moves twice
        (the intermediate move is checked like any other, and a refused one changes nothing).
        While any half of a BAR holds all ones the driver is sizing it and it never moves.
        """
        size = len(data)
        if not self.access_is_valid(offset, size):
            if _log.isEnabledFor(DEBUG):
                _log.debug("dropped config write of %d bytes at %#x", size, offset)
            return None
        regs, wmask = self._regs, self._wmask
        for i in range(size):
            mask = wmask[offset + i]
            if mask:
                regs[offset + i] = (regs[offset + i] & ~mask) | (data[i] & mask)
        bar_register = (offset - PciHeaderOffset.BAR0) // 4
        if 0 <= bar_register < BAR_COUNT:
            return self._detect_bar_move(bar_register)
        return None

    def _detect_bar_move(self, register: int) -> BarReprogramming | None:
        bar = self._bars[register]
        if bar is None:
            upper_of = self._upper_half_of[register]
            if upper_of is None:
                return None
            bar = self._bars[upper_of]
            assert bar is not None
        if self._bar_is_sizing(bar):
            return None
        new_address = self._bar_register_address(bar)
        if new_address == bar.address:
            return None
        return BarReprogramming(bar.index, bar.address, new_address, bar.size, bar.kind)

    @property
    def memory_decode_enabled(self) -> bool:
        """The command register's memory space bit."""
        return bool(self.read_u16(PciHeaderOffset.COMMAND) & COMMAND_MEMORY_SPACE)
