"""Tiny PVH ELF kernels: a few bytes of 32-bit code that any PVH-capable VMM can boot.

They measure what a VMM costs before the guest does any work (launch time, memory) and test
the boot path on hosts whose KVM cannot run Linux. The ELF has one PT_LOAD segment at 1 MiB and
a PT_NOTE with the Xen ``XEN_ELFNOTE_PHYS32_ENTRY`` note (type 18) naming the entry, as a Linux
vmlinux built with CONFIG_PVH has; the code runs in 32-bit protected mode, paging off.
"""

from __future__ import annotations

import struct
from typing import Final

from nubis.arch.x86_64 import layout

LOAD_ADDRESS: Final = layout.HIGH_RAM_START
_EHDR = struct.Struct("<4sBBBBB7sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
_NOTE_HEADER = struct.Struct("<III")
_PT_LOAD: Final = 1
_PT_NOTE: Final = 4
_XEN_ELFNOTE_PHYS32_ENTRY: Final = 18


def out_byte(port: int, value: int) -> bytes:
    """32-bit code: ``mov dx, port; mov al, value; out dx, al``."""
    return b"\x66\xba" + struct.pack("<H", port) + b"\xb0" + bytes([value]) + b"\xee"


def serial_print(text: bytes) -> bytes:
    """32-bit code writing ``text`` to the COM1 transmit register, one ``out`` per byte."""
    return b"".join(out_byte(layout.PORT_COM1, byte) for byte in text)


def reset_code(message: bytes = b"") -> bytes:
    """Code that prints ``message`` on COM1 and then resets the VM by a triple fault.

    It loads an empty IDT and executes ``ud2``: the #UD cannot be delivered, nor the #GP or
    double fault that follow, so the processor shuts down, which every x86 VMM treats as a
    reset. This needs no device, so it measures every VMM the same way.
    """
    code = bytearray(serial_print(message))
    # lidt [disp32] (0F 01 /3, mod=00 rm=101) pointing at 6 zero bytes after the code.
    lidt_at = len(code)
    code += b"\x0f\x01\x1d" + bytes(4)
    code += b"\x0f\x0b"  # ud2
    code += b"\xf4"  # hlt, never reached
    descriptor = LOAD_ADDRESS + len(code)
    code[lidt_at + 3 : lidt_at + 7] = struct.pack("<I", descriptor)
    code += bytes(6)
    return bytes(code)


def build_pvh_elf(code: bytes) -> bytes:
    """A minimal ELF64 x86-64 kernel image that enters ``code`` at 1 MiB through PVH."""
    note_desc = struct.pack("<I", LOAD_ADDRESS)
    note = _NOTE_HEADER.pack(4, len(note_desc), _XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + note_desc
    phoff = _EHDR.size
    note_offset = phoff + 2 * _PHDR.size
    code_offset = (note_offset + len(note) + 15) & ~15
    header = _EHDR.pack(
        b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),  # ELFCLASS64, little endian, version 1
        2, 62, 1,  # ET_EXEC, EM_X86_64, EV_CURRENT
        LOAD_ADDRESS, phoff, 0, 0, _EHDR.size, _PHDR.size, 2, 0, 0, 0,
    )  # fmt: skip
    load = _PHDR.pack(
        _PT_LOAD, 5, code_offset, LOAD_ADDRESS, LOAD_ADDRESS, len(code), len(code), 0x1000
    )
    note_ph = _PHDR.pack(_PT_NOTE, 4, note_offset, 0, 0, len(note), len(note), 4)
    image = bytearray(header + load + note_ph + note)
    image.extend(bytes(code_offset - len(image)))
    image.extend(code)
    return bytes(image)
