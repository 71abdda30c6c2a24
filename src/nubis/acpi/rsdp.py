"""The Root System Description Pointer, revision 2, pointing at the XSDT.

ACPI 6.4 section 5.2.5.3 ("Root System Description Pointer (RSDP) Structure"): 36 bytes, a
checksum over the first 20 bytes (the ACPI 1.0 part) and an extended checksum over all of it.
nubis has no RSDT; the RSDT address stays zero and guests use ``XsdtAddress``.
"""

from __future__ import annotations

import ctypes

from nubis.acpi.sdt import OEM_ID, checksum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["RSDP_REVISION", "RSDP_SIGNATURE", "Rsdp", "build_rsdp"]

RSDP_SIGNATURE: Final = b"RSD PTR "
RSDP_REVISION: Final = 2
_V1_LENGTH: Final = 20


class Rsdp(ctypes.LittleEndianStructure):
    """The RSDP structure (ACPI 6.4 table 5.3)."""

    _pack_ = 1
    _fields_ = (
        ("signature", ctypes.c_char * 8),
        ("checksum", ctypes.c_uint8),
        ("oem_id", ctypes.c_char * 6),
        ("revision", ctypes.c_uint8),
        ("rsdt_address", ctypes.c_uint32),
        ("length", ctypes.c_uint32),
        ("xsdt_address", ctypes.c_uint64),
        ("extended_checksum", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
    )


def build_rsdp(xsdt_address: int) -> bytes:
    """The RSDP bytes for an XSDT at ``xsdt_address``, with both checksums set."""
    rsdp = Rsdp(
        signature=RSDP_SIGNATURE,
        oem_id=OEM_ID,
        revision=RSDP_REVISION,
        length=ctypes.sizeof(Rsdp),
        xsdt_address=xsdt_address,
    )
    rsdp.checksum = checksum(bytes(rsdp)[:_V1_LENGTH])
    rsdp.extended_checksum = checksum(bytes(rsdp))
    return bytes(rsdp)
