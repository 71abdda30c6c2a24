"""Just enough ELF64 parsing to check a vmlinux and to find a program's shared libraries.

Layouts follow the System V gABI (ELF header, program headers, notes, the dynamic section).
Only little-endian ELF64 is accepted, which is what x86-64 kernels and Debian's amd64 binaries are.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from nubis.image.errors import ImageError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1

#: Elf64_Ehdr fields from e_type on (gABI "ELF Header"), after the 16-byte e_ident.
_EHDR = struct.Struct("<HHIQQQIHHHHHH")
#: Elf64_Phdr (gABI "Program Header").
_PHDR = struct.Struct("<IIQQQQQQ")
#: Elf64_Nhdr (gABI "Note Section"): namesz, descsz, type.
_NHDR = struct.Struct("<III")
#: Elf64_Dyn (gABI "Dynamic Section"): tag, value.
_DYN = struct.Struct("<qQ")

PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
PT_NOTE = 4
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5

#: Xen's ELF note type giving the 32-bit PVH entry point (xen/include/public/elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclass(frozen=True)
class ProgramHeader:
    """One ELF64 program header."""

    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class Note:
    """One ELF note: owner name, type and descriptor bytes."""

    name: str
    type: int
    desc: bytes


def program_headers(data: bytes) -> list[ProgramHeader]:
    """Return the program headers of an ELF64 little-endian image, checking its identity."""
    if len(data) < 64 or data[:4] != ELF_MAGIC:
        raise ImageError("The file is not an ELF image (bad magic).")
    if data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise ImageError("The ELF image is not 64-bit little-endian.")
    fields = _EHDR.unpack_from(data, 16)
    phoff, phentsize, phnum = fields[4], fields[8], fields[9]
    if phentsize != _PHDR.size or phoff + phnum * phentsize > len(data):
        raise ImageError("The ELF image's program header table is malformed.")
    return [ProgramHeader(*_PHDR.unpack_from(data, phoff + i * phentsize)) for i in range(phnum)]


def notes(data: bytes) -> Iterator[Note]:
    """Yield every note in the image's PT_NOTE segments."""
    for ph in program_headers(data):
        if ph.type != PT_NOTE:
            continue
        pos, end = ph.offset, min(ph.offset + ph.filesz, len(data))
        while pos + _NHDR.size <= end:
            namesz, descsz, ntype = _NHDR.unpack_from(data, pos)
            pos += _NHDR.size
            name = data[pos : pos + namesz].rstrip(b"\0").decode(errors="replace")
            pos += (namesz + 3) & ~3
            desc = data[pos : pos + descsz]
            pos += (descsz + 3) & ~3
            yield Note(name, ntype, desc)


def pvh_entry(data: bytes) -> int:
    """Return the PVH 32-bit entry address from the Xen PHYS32_ENTRY note, or raise."""
    for note in notes(data):
        if note.name == "Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            return int.from_bytes(note.desc, "little")
    raise ImageError(
        "The ELF image has no XEN_ELFNOTE_PHYS32_ENTRY note, so it cannot boot by PVH."
    )


def _vaddr_to_offset(headers: list[ProgramHeader], vaddr: int) -> int:
    for ph in headers:
        if ph.type == PT_LOAD and ph.vaddr <= vaddr < ph.vaddr + ph.filesz:
            return ph.offset + (vaddr - ph.vaddr)
    raise ImageError("An ELF dynamic-section address is outside every loadable segment.")


def interpreter(data: bytes) -> str | None:
    """Return the program interpreter path (PT_INTERP) of a dynamic executable, if any."""
    for ph in program_headers(data):
        if ph.type == PT_INTERP:
            return data[ph.offset : ph.offset + ph.filesz].rstrip(b"\0").decode()
    return None


def needed_libraries(data: bytes) -> list[str]:
    """Return the DT_NEEDED sonames of a dynamically linked ELF image (empty if static)."""
    headers = program_headers(data)
    dynamic = next((ph for ph in headers if ph.type == PT_DYNAMIC), None)
    if dynamic is None:
        return []
    entries: list[tuple[int, int]] = []
    pos, end = dynamic.offset, dynamic.offset + dynamic.filesz
    while pos + _DYN.size <= end:
        tag, value = _DYN.unpack_from(data, pos)
        pos += _DYN.size
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    strtab = next((v for t, v in entries if t == DT_STRTAB), None)
    if strtab is None:
        return []
    base = _vaddr_to_offset(headers, strtab)
    names = []
    for tag, value in entries:
        if tag == DT_NEEDED:
            start = base + value
            names.append(data[start : data.index(b"\0", start)].decode())
    return names
