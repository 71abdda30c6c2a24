"""Load an uncompressed ELF64 ``vmlinux`` into guest memory and find its entry points.

The layouts are those of the System V gABI, chapter "Object Files" (ELF header, program
header, note section), for ELFCLASS64 little-endian x86_64 files. Each ``PT_LOAD`` segment is
copied to its physical address ``p_paddr`` and the ``p_memsz - p_filesz`` tail zero-filled.

Two entry points come out: ``e_entry``, which in a Linux ``vmlinux`` is the physical address of
the 64-bit entry (Linux x86 boot protocol ``Documentation/arch/x86/boot.rst``, "64-bit Boot
Protocol"), and the PVH entry, a 32-bit physical address carried in an ELF note named "Xen" of
type ``XEN_ELFNOTE_PHYS32_ENTRY`` (18) as ``xen/include/public/elfnote.h`` defines it.

Everything in the file is validated before the first byte is written to guest memory.
"""

from __future__ import annotations

import ctypes
import itertools
import struct

from nubis._frozen import Frozen
from nubis.arch.x86_64 import layout
from nubis.loader.errors import LoaderError
from nubis.loader.kernelfile import KernelFile, file_size, read_at, read_into_guest
from nubis.memory import GuestMemory

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "EM_X86_64",
    "PT_LOAD",
    "PT_NOTE",
    "XEN_ELFNOTE_PHYS32_ENTRY",
    "Elf64Header",
    "Elf64ProgramHeader",
    "ElfLoadResult",
    "load_elf",
]

ELF_MAGIC: Final = b"\x7fELF"
ELFCLASS64: Final = 2
ELFDATA2LSB: Final = 1
EV_CURRENT: Final = 1
ET_EXEC: Final = 2
EM_X86_64: Final = 62
PT_LOAD: Final = 1
PT_NOTE: Final = 4
PN_XNUM: Final = 0xFFFF
XEN_ELFNOTE_PHYS32_ENTRY: Final = 18
_XEN_NOTE_NAME: Final = b"Xen\x00"
_MAX_PROGRAM_HEADERS: Final = 256
_ZERO_CHUNK: Final = bytes(1 << 20)


class Elf64Header(ctypes.LittleEndianStructure):
    """``Elf64_Ehdr``, the 64-byte ELF file header (gABI "ELF Header")."""

    _pack_ = 1
    _fields_ = (
        ("e_ident", ctypes.c_uint8 * 16),
        ("e_type", ctypes.c_uint16),
        ("e_machine", ctypes.c_uint16),
        ("e_version", ctypes.c_uint32),
        ("e_entry", ctypes.c_uint64),
        ("e_phoff", ctypes.c_uint64),
        ("e_shoff", ctypes.c_uint64),
        ("e_flags", ctypes.c_uint32),
        ("e_ehsize", ctypes.c_uint16),
        ("e_phentsize", ctypes.c_uint16),
        ("e_phnum", ctypes.c_uint16),
        ("e_shentsize", ctypes.c_uint16),
        ("e_shnum", ctypes.c_uint16),
        ("e_shstrndx", ctypes.c_uint16),
    )


class Elf64ProgramHeader(ctypes.LittleEndianStructure):
    """``Elf64_Phdr``, one 56-byte program header (gABI "Program Header")."""

    _pack_ = 1
    _fields_ = (
        ("p_type", ctypes.c_uint32),
        ("p_flags", ctypes.c_uint32),
        ("p_offset", ctypes.c_uint64),
        ("p_vaddr", ctypes.c_uint64),
        ("p_paddr", ctypes.c_uint64),
        ("p_filesz", ctypes.c_uint64),
        ("p_memsz", ctypes.c_uint64),
        ("p_align", ctypes.c_uint64),
    )


ELF_NOTE_HEADER: Final = struct.Struct("<III")
"""``Elf64_Nhdr``: namesz, descsz, type; name and descriptor follow, each padded to 4 bytes."""


class ElfLoadResult(Frozen):
    """Where an ELF kernel landed: its physical footprint and entry points."""

    __slots__ = ("entry_64", "kernel_end", "kernel_start", "pvh_entry")

    kernel_start: int
    """Lowest guest physical address written."""
    kernel_end: int
    """First guest physical address past the highest segment (including its zero-filled tail)."""
    entry_64: int
    """``e_entry``: the 64-bit boot protocol entry point."""
    pvh_entry: int | None
    """The 32-bit PVH entry from the Xen ELF note, or ``None`` if the kernel has none."""

    def __init__(
        self, kernel_start: int, kernel_end: int, entry_64: int, pvh_entry: int | None
    ) -> None:
        object.__setattr__(self, "kernel_start", kernel_start)
        object.__setattr__(self, "kernel_end", kernel_end)
        object.__setattr__(self, "entry_64", entry_64)
        object.__setattr__(self, "pvh_entry", pvh_entry)


def _align4(value: int) -> int:
    return (value + 3) & ~3


def _find_pvh_entry(notes: bytes) -> int | None:
    """The ``XEN_ELFNOTE_PHYS32_ENTRY`` value among the notes of one PT_NOTE segment."""
    offset = 0
    while offset < len(notes):
        if offset + ELF_NOTE_HEADER.size > len(notes):
            raise LoaderError(f"ELF note header at segment offset {offset:#x} is truncated")
        namesz, descsz, note_type = ELF_NOTE_HEADER.unpack_from(notes, offset)
        name_start = offset + ELF_NOTE_HEADER.size
        desc_start = name_start + _align4(namesz)
        next_note = desc_start + _align4(descsz)
        if next_note > len(notes):
            raise LoaderError(f"ELF note at segment offset {offset:#x} overruns its segment")
        name = notes[name_start : name_start + namesz]
        if name == _XEN_NOTE_NAME and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
            if descsz not in (4, 8):
                raise LoaderError(
                    f"Xen PHYS32_ENTRY note has a {descsz}-byte value, expected 4 or 8 bytes"
                )
            entry = int.from_bytes(notes[desc_start : desc_start + descsz], "little")
            if entry >= 1 << 32:
                raise LoaderError(f"PVH entry point {entry:#x} is not a 32-bit address")
            return entry
        offset = next_note
    return None


def _read_header(kernel: KernelFile, size: int) -> Elf64Header:
    if size < ctypes.sizeof(Elf64Header):
        raise LoaderError("kernel file is too short to be an ELF file")
    header = Elf64Header.from_buffer_copy(
        read_at(kernel, 0, ctypes.sizeof(Elf64Header), "ELF header")
    )
    ident = bytes(header.e_ident)
    if ident[:4] != ELF_MAGIC:
        raise LoaderError("kernel file is not an ELF file (bad magic)")
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or ident[6] != EV_CURRENT:
        raise LoaderError("ELF kernel is not a little-endian 64-bit ELF file")
    if header.e_machine != EM_X86_64:
        raise LoaderError(f"ELF kernel is for machine {header.e_machine}, not x86_64 (62)")
    if header.e_type != ET_EXEC:
        raise LoaderError(f"ELF kernel has type {header.e_type}, not an executable (2)")
    if header.e_phentsize != ctypes.sizeof(Elf64ProgramHeader):
        raise LoaderError(f"ELF program header size is {header.e_phentsize}, expected 56")
    if header.e_phnum == 0 or header.e_phnum == PN_XNUM:
        raise LoaderError("ELF kernel has no program headers")
    if header.e_phnum > _MAX_PROGRAM_HEADERS:
        raise LoaderError(
            f"ELF kernel has {header.e_phnum} program headers, more than {_MAX_PROGRAM_HEADERS}"
        )
    if header.e_phoff + header.e_phnum * header.e_phentsize > size:
        raise LoaderError("ELF program headers lie beyond the end of the kernel file")
    return header


def _check_segment(memory: GuestMemory, index: int, ph: Elf64ProgramHeader, size: int) -> None:
    what = f"ELF segment {index} at {ph.p_paddr:#x}"
    if ph.p_filesz > ph.p_memsz:
        raise LoaderError(f"{what} has a file size larger than its memory size")
    if ph.p_offset + ph.p_filesz > size:
        raise LoaderError(f"{what} lies beyond the end of the kernel file")
    if ph.p_paddr < layout.HIGH_RAM_START:
        raise LoaderError(
            f"{what} lies below {layout.HIGH_RAM_START:#x}, in the area nubis keeps for boot data"
        )
    if not memory.contains(ph.p_paddr, ph.p_memsz):
        raise LoaderError(
            f"{what} with size {ph.p_memsz:#x} does not fit in one range of guest RAM"
        )


def load_elf(memory: GuestMemory, kernel: KernelFile) -> ElfLoadResult:
    """Load the x86_64 ELF ``kernel`` into ``memory`` at its physical addresses.

    Raises `LoaderError` for a file that is not a loadable x86_64 ELF executable or whose
    segments do not fit in guest RAM above 1 MiB; nothing is written in that case.
    """
    size = file_size(kernel)
    header = _read_header(kernel, size)
    table = read_at(
        kernel,
        header.e_phoff,
        header.e_phnum * ctypes.sizeof(Elf64ProgramHeader),
        "ELF program header table",
    )
    program_headers = [
        Elf64ProgramHeader.from_buffer_copy(table, i * ctypes.sizeof(Elf64ProgramHeader))
        for i in range(header.e_phnum)
    ]

    loads: list[Elf64ProgramHeader] = []
    pvh_entry: int | None = None
    for index, ph in enumerate(program_headers):
        if ph.p_type == PT_LOAD and ph.p_memsz:
            _check_segment(memory, index, ph, size)
            loads.append(ph)
        elif ph.p_type == PT_NOTE and pvh_entry is None:
            if ph.p_offset + ph.p_filesz > size:
                raise LoaderError(f"ELF note segment {index} lies beyond the end of the file")
            pvh_entry = _find_pvh_entry(
                read_at(kernel, ph.p_offset, ph.p_filesz, "ELF note segment")
            )
    if not loads:
        raise LoaderError("ELF kernel has no loadable segments")
    loads.sort(key=lambda ph: int(ph.p_paddr))
    for lower, upper in itertools.pairwise(loads):
        if lower.p_paddr + lower.p_memsz > upper.p_paddr:
            raise LoaderError(f"ELF segments at {lower.p_paddr:#x} and {upper.p_paddr:#x} overlap")
    kernel_start = int(loads[0].p_paddr)
    kernel_end = max(int(ph.p_paddr + ph.p_memsz) for ph in loads)

    def loaded(addr: int) -> bool:
        return any(ph.p_paddr <= addr < ph.p_paddr + ph.p_memsz for ph in loads)

    if not loaded(header.e_entry):
        raise LoaderError(f"ELF entry point {header.e_entry:#x} is not in a loaded segment")
    if pvh_entry is not None and not loaded(pvh_entry):
        raise LoaderError(f"PVH entry point {pvh_entry:#x} is not in a loaded segment")

    for ph in loads:
        read_into_guest(
            memory, kernel, ph.p_offset, ph.p_paddr, ph.p_filesz, f"ELF segment at {ph.p_paddr:#x}"
        )
        _zero_fill(memory, ph.p_paddr + ph.p_filesz, ph.p_memsz - ph.p_filesz)
    return ElfLoadResult(kernel_start, kernel_end, int(header.e_entry), pvh_entry)


def _zero_fill(memory: GuestMemory, addr: int, size: int) -> None:
    view = memory.slice(addr, size)
    for start in range(0, size, len(_ZERO_CHUNK)):
        chunk = min(len(_ZERO_CHUNK), size - start)
        view[start : start + chunk] = _ZERO_CHUNK[:chunk]
