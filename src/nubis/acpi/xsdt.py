"""The Extended System Description Table: the list of 64-bit table addresses.

ACPI 6.4 section 5.2.8 ("Extended System Description Table (XSDT)"): an SDT header followed
by one 64-bit physical address per table (the FADT first, by convention; the DSDT is reached
through the FADT, not listed here).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from nubis.acpi.sdt import finish_table, new_header

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["XSDT_REVISION", "build_xsdt"]

XSDT_REVISION: Final = 1
_ENTRY: Final = struct.Struct("<Q")


def build_xsdt(table_addresses: Sequence[int]) -> bytes:
    """The XSDT listing ``table_addresses``."""
    entries = b"".join(_ENTRY.pack(addr) for addr in table_addresses)
    return finish_table(bytes(new_header(b"XSDT", XSDT_REVISION)) + entries)
