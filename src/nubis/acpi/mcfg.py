"""The MCFG table: where the PCI Express enhanced configuration space (ECAM) is.

Defined by the PCI Firmware Specification 3.2, section 4.1.2 ("MCFG Table Description"), and
listed in ACPI 6.4 table 5.6: an SDT header, 8 reserved bytes, then one 16-byte allocation
per PCI segment group. nubis has one segment (0) whose ECAM window starts at
``layout.PCI_MMCONFIG_START`` and covers bus 0 only.
"""

from __future__ import annotations

import ctypes

from nubis.acpi.sdt import finish_table, new_header
from nubis.arch.x86_64 import layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["MCFG_REVISION", "McfgAllocation", "build_mcfg"]

MCFG_REVISION: Final = 1
_RESERVED: Final = bytes(8)


class McfgAllocation(ctypes.LittleEndianStructure):
    """One configuration space base address allocation structure (PCI Firmware 4.1.2)."""

    _pack_ = 1
    _fields_ = (
        ("base_address", ctypes.c_uint64),
        ("segment_group", ctypes.c_uint16),
        ("start_bus", ctypes.c_uint8),
        ("end_bus", ctypes.c_uint8),
        ("reserved", ctypes.c_uint32),
    )


def build_mcfg(
    base: int = layout.PCI_MMCONFIG_START, segment: int = 0, start_bus: int = 0, end_bus: int = 0
) -> bytes:
    """The MCFG with one allocation for ``segment``'s buses ``start_bus..end_bus`` at ``base``."""
    allocation = McfgAllocation(
        base_address=base, segment_group=segment, start_bus=start_bus, end_bus=end_bus
    )
    return finish_table(bytes(new_header(b"MCFG", MCFG_REVISION)) + _RESERVED + bytes(allocation))
