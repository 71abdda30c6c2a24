"""The code at the real-mode reset vector (0xF000:0xFFF0, physical 0xFFFF0) of a nubis guest.

nubis has no firmware, but Linux still jumps to the reset vector in one case: on a
hardware-reduced ACPI platform its reboot code prefers EFI, and with no EFI runtime it falls
back to ``machine_real_restart``, which switches to real mode and far-jumps to 0xF000:0xFFF0
expecting the BIOS to reset the machine. Without code there the vCPU would run through zeroed
memory for ever. These few bytes do what a BIOS would: they reset the VM, through the same ACPI
reset register the FADT describes, and halt should that ever return.
"""

from __future__ import annotations

import struct

from nubis.arch.x86_64 import layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

RESET_VECTOR: Final = 0xFFFF0
"""Physical address of the real-mode reset vector (CS 0xF000, IP 0xFFF0)."""


def reset_vector_code() -> bytes:
    """16-bit code: ``mov dx, PORT_ACPI_RESET; mov al, ACPI_RESET_VALUE; out dx, al; hlt; jmp $-1``."""
    code = (
        b"\xba" + struct.pack("<H", layout.PORT_ACPI_RESET)  # mov dx, imm16
        + b"\xb0" + bytes([layout.ACPI_RESET_VALUE])  # mov al, imm8
        + b"\xee"  # out dx, al
        + b"\xf4"  # hlt
        + b"\xeb\xfd"  # jmp back to the hlt
    )  # fmt: skip
    assert len(code) <= 16
    return code
