"""The system description table header shared by every ACPI table but the RSDP, and checksums.

ACPI 6.4 section 5.2.6 ("System Description Table Header"): a 36-byte header whose ``Length``
covers the whole table and whose ``Checksum`` makes all its bytes sum to zero modulo 256.
Tables in nubis are built as bytes: a fixed part declared as a ctypes structure starting with
`SdtHeader`, followed by variable parts, then `finish_table` fills in length and checksum.
"""

from __future__ import annotations

import ctypes

from nubis.acpi.errors import AcpiError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "CREATOR_ID",
    "CREATOR_REVISION",
    "OEM_ID",
    "OEM_REVISION",
    "OEM_TABLE_ID",
    "SdtHeader",
    "checksum",
    "finish_table",
    "new_header",
]

OEM_ID: Final = b"NUBIS "
OEM_TABLE_ID: Final = b"NUBISVM "
OEM_REVISION: Final = 1
CREATOR_ID: Final = b"NBIS"
CREATOR_REVISION: Final = 1


class SdtHeader(ctypes.LittleEndianStructure):
    """The 36-byte system description table header (ACPI 6.4 section 5.2.6, table 5.4)."""

    _pack_ = 1
    _fields_ = (
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint32),
        ("revision", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem_id", ctypes.c_char * 6),
        ("oem_table_id", ctypes.c_char * 8),
        ("oem_revision", ctypes.c_uint32),
        ("creator_id", ctypes.c_char * 4),
        ("creator_revision", ctypes.c_uint32),
    )


_CHECKSUM_OFFSET: Final = SdtHeader.checksum.offset
_LENGTH_OFFSET: Final = SdtHeader.length.offset


def checksum(data: bytes | bytearray) -> int:
    """The byte that, added to ``data``, makes the sum of all bytes zero modulo 256."""
    return -sum(data) & 0xFF


def new_header(signature: bytes, revision: int, oem_table_id: bytes = OEM_TABLE_ID) -> SdtHeader:
    """A header with nubis's OEM and creator identity; length and checksum come later."""
    if len(signature) != 4:
        raise AcpiError(f"ACPI table signature {signature!r} is not 4 bytes long")
    if len(oem_table_id) != 8:
        raise AcpiError(f"ACPI OEM table id {oem_table_id!r} is not 8 bytes long")
    return SdtHeader(
        signature=signature,
        revision=revision,
        oem_id=OEM_ID,
        oem_table_id=oem_table_id,
        oem_revision=OEM_REVISION,
        creator_id=CREATOR_ID,
        creator_revision=CREATOR_REVISION,
    )


def finish_table(data: bytes | bytearray) -> bytes:
    """Set the length and checksum of the table ``data`` (which starts with an `SdtHeader`)."""
    table = bytearray(data)
    table[_LENGTH_OFFSET : _LENGTH_OFFSET + 4] = len(table).to_bytes(4, "little")
    table[_CHECKSUM_OFFSET] = 0
    table[_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)
