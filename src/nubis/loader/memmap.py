"""The guest's physical memory map, as both boot configurators hand it to the kernel.

The zero page's ``e820_table`` (Linux ``Documentation/arch/x86/zero-page.rst``) and the PVH
``hvm_memmap_table_entry`` array (``xen/include/public/arch-x86/hvm/start_info.h``) both carry
(address, size, type) triples with the E820 type numbers of the ACPI 6.4 specification,
section 15 ("System Address Map Interfaces", table 15.1). nubis builds the map once as a list
of `MemoryMapEntry` and each configurator encodes it in its own layout.
"""

from __future__ import annotations

from collections.abc import Sequence

from nubis._typing import NamedTuple
from nubis.arch.x86_64 import layout
from nubis.loader.errors import LoaderError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "E820_ACPI",
    "E820_RAM",
    "E820_RESERVED",
    "MemoryMapEntry",
    "standard_memory_map",
]

E820_RAM: Final = 1
E820_RESERVED: Final = 2
E820_ACPI: Final = 3


class MemoryMapEntry(NamedTuple):
    """One range of the guest memory map: ``size`` bytes at ``addr`` of E820 ``type``."""

    addr: int
    size: int
    type: int


def standard_memory_map(ram_ranges: Sequence[tuple[int, int]]) -> list[MemoryMapEntry]:
    """The memory map of a nubis guest whose RAM is ``ram_ranges`` (see ``layout.ram_ranges``).

    Low RAM stops at the EBDA; the EBDA-to-1-MiB area (which holds the ACPI tables) is
    reserved; RAM resumes at 1 MiB up to the 32-bit MMIO hole; the PCI ECAM window is reserved
    (Linux wants MMCONFIG areas reserved before it uses them); RAM above 4 GiB follows as is.
    """
    ordered = sorted(ram_ranges)
    if not ordered or ordered[0][0] != 0:
        raise LoaderError("guest RAM must start at address 0 to build the memory map")
    low_start, low_size = ordered[0]
    low_end = min(low_start + low_size, layout.MEM_32BIT_RESERVED_START)
    if low_end <= layout.HIGH_RAM_START:
        raise LoaderError(
            f"guest RAM below the 32-bit hole ends at {low_end:#x}, but nubis needs RAM "
            f"above {layout.HIGH_RAM_START:#x} for the kernel"
        )
    entries = [
        MemoryMapEntry(0, layout.EBDA_START, E820_RAM),
        MemoryMapEntry(layout.EBDA_START, layout.HIGH_RAM_START - layout.EBDA_START, E820_RESERVED),
        MemoryMapEntry(layout.HIGH_RAM_START, low_end - layout.HIGH_RAM_START, E820_RAM),
        MemoryMapEntry(layout.PCI_MMCONFIG_START, layout.PCI_MMCONFIG_SIZE, E820_RESERVED),
    ]
    for start, size in ordered[1:]:
        if start < layout.FIRST_ADDR_PAST_32BITS:
            raise LoaderError(
                f"guest RAM range at {start:#x} lies below 4 GiB outside the first range, "
                "which the nubis memory map does not allow"
            )
        entries.append(MemoryMapEntry(start, size, E820_RAM))
    return entries
