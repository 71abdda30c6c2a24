"""Identity-mapped boot page tables for the Linux 64-bit boot protocol.

Long mode requires paging (Intel SDM Vol. 3A §4.1 and §10.8.5 "Initializing IA-32e Mode"; AMD
APM Vol. 2 §14.6), and the Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit
Boot Protocol") requires the kernel, the zero page and the command line to be identity mapped.
nubis maps the first 4 GiB with 2 MiB pages using 4-level paging (SDM Vol. 3A §4.5, tables 4-15,
4-17 and 4-18): one PML4 entry points at one PDPT, whose first four entries point at four page
directories of 512 large-page entries each::

    PML4_START   PML4[0]  -> PDPTE_START
    PDPTE_START  PDPT[i]  -> PDE_START + i * 4 KiB        (i = 0..3)
    PDE_START    PD[j]    -> j * 2 MiB, PS = 1            (j = 0..2047, four tables back to back)

The tables sit at the fixed addresses of ``layout``; ``identity_map_tables`` returns the bytes
of each so the caller writes them into guest memory.
"""

from __future__ import annotations

import struct

from nubis.arch.x86_64.layout import PDE_START, PDPTE_START, PML4_START, GiB, MiB

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

PAGE_TABLE_SIZE: Final = 0x1000
ENTRIES_PER_TABLE: Final = 512

PTE_PRESENT: Final = 1 << 0
PTE_WRITABLE: Final = 1 << 1
PTE_PAGE_SIZE: Final = 1 << 7  # in a PDE: maps a 2 MiB page instead of pointing at a page table

LARGE_PAGE_SIZE: Final = 2 * MiB
IDENTITY_MAP_SIZE: Final = 4 * GiB
PAGE_DIRECTORY_COUNT: Final = IDENTITY_MAP_SIZE // GiB  # each page directory maps 1 GiB

_TABLE: Final = struct.Struct(f"<{ENTRIES_PER_TABLE}Q")
_ENTRY: Final = struct.Struct("<Q")


def identity_map_tables() -> list[tuple[int, bytes]]:
    """The (guest address, bytes) of the PML4, the PDPT and the page directories.

    Together they identity map ``[0, 4 GiB)`` with present, writable 2 MiB pages.
    """
    pml4 = [0] * ENTRIES_PER_TABLE
    pml4[0] = PDPTE_START | PTE_PRESENT | PTE_WRITABLE
    pdpt = [0] * ENTRIES_PER_TABLE
    for i in range(PAGE_DIRECTORY_COUNT):
        pdpt[i] = (PDE_START + i * PAGE_TABLE_SIZE) | PTE_PRESENT | PTE_WRITABLE
    tables = [(PML4_START, _TABLE.pack(*pml4)), (PDPTE_START, _TABLE.pack(*pdpt))]
    flags = PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE
    for i in range(PAGE_DIRECTORY_COUNT):
        first = i * ENTRIES_PER_TABLE
        pd = [((first + j) * LARGE_PAGE_SIZE) | flags for j in range(ENTRIES_PER_TABLE)]
        tables.append((PDE_START + i * PAGE_TABLE_SIZE, _TABLE.pack(*pd)))
    return tables


def translate(tables: dict[int, bytes], cr3: int, virtual: int) -> int | None:
    """Walk 4-level tables held in ``tables`` (page address -> bytes); None if not mapped.

    A model of the processor's walk (SDM Vol. 3A §4.5.4) for 4 KiB, 2 MiB and 1 GiB pages,
    used to check the tables nubis builds.
    """
    address = cr3 & ~0xFFF
    for level, shift in enumerate((39, 30, 21, 12)):
        table = tables.get(address)
        if table is None:
            return None
        index = (virtual >> shift) & (ENTRIES_PER_TABLE - 1)
        entry: int = _ENTRY.unpack_from(table, index * 8)[0]
        if not entry & PTE_PRESENT:
            return None
        frame = entry & 0x000F_FFFF_FFFF_F000
        if level in (1, 2) and entry & PTE_PAGE_SIZE:
            size = 1 << shift
            return (frame & ~(size - 1)) | (virtual & (size - 1))
        address = frame
    return address | (virtual & 0xFFF)
