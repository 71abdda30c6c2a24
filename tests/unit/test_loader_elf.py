"""Tests for nubis.loader.elf: layouts, segment loading, the PVH note, hostile ELF files."""

from __future__ import annotations

import ctypes
import io
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nubis.arch.x86_64.layout import HIGH_RAM_START, MiB
from nubis.loader import LoaderError, load_elf
from nubis.loader.elf import (
    ELF_NOTE_HEADER,
    EM_X86_64,
    PT_LOAD,
    PT_NOTE,
    XEN_ELFNOTE_PHYS32_ENTRY,
    Elf64Header,
    Elf64ProgramHeader,
)
from nubis.memory import GuestMemory

RAM_SIZE = 8 * MiB
ENTRY = 0x200000


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    """One ELF note with 4-byte padding of name and descriptor."""

    def pad(data: bytes) -> bytes:
        return data + bytes(-len(data) % 4)

    return ELF_NOTE_HEADER.pack(len(name), len(desc), kind) + pad(name) + pad(desc)


def build_elf(
    segments: list[tuple[int, bytes, int]],
    *,
    notes: bytes | None = None,
    entry: int = ENTRY,
    machine: int = EM_X86_64,
) -> bytes:
    """A minimal x86_64 ELF executable: (paddr, file bytes, memsz) per PT_LOAD, one PT_NOTE."""
    phnum = len(segments) + (notes is not None)
    data_offset = 64 + 56 * phnum
    header = Elf64Header(
        e_type=2,
        e_machine=machine,
        e_version=1,
        e_entry=entry,
        e_phoff=64,
        e_ehsize=64,
        e_phentsize=56,
        e_phnum=phnum,
    )
    header.e_ident[:7] = list(b"\x7fELF\x02\x01\x01")
    phdrs = b""
    blobs = b""
    for paddr, data, memsz in segments:
        phdrs += bytes(
            Elf64ProgramHeader(
                p_type=PT_LOAD,
                p_offset=data_offset + len(blobs),
                p_vaddr=0xFFFFFFFF80000000 + paddr,
                p_paddr=paddr,
                p_filesz=len(data),
                p_memsz=memsz,
            )
        )
        blobs += data
    if notes is not None:
        phdrs += bytes(
            Elf64ProgramHeader(
                p_type=PT_NOTE, p_offset=data_offset + len(blobs), p_filesz=len(notes)
            )
        )
        blobs += notes
    return bytes(header) + phdrs + blobs


PVH_NOTES = note(b"Xen\x00", 6, b"linux\x00") + note(
    b"Xen\x00", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", ENTRY + 0x40)
)
KERNEL = build_elf(
    [(ENTRY, b"\xaa" * 0x1000, 0x1000), (ENTRY + 0x1000, b"\xbb" * 0x100, 0x3000)],
    notes=PVH_NOTES,
)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """8 MiB of guest RAM from address 0."""
    with GuestMemory([(0, RAM_SIZE)]) as mem:
        yield mem


def test_layouts_are_pinned() -> None:
    assert ctypes.sizeof(Elf64Header) == 64
    assert ctypes.sizeof(Elf64ProgramHeader) == 56
    assert Elf64Header.e_entry.offset == 0x18
    assert Elf64Header.e_phoff.offset == 0x20
    assert Elf64Header.e_phnum.offset == 0x38
    assert Elf64ProgramHeader.p_paddr.offset == 0x18
    assert Elf64ProgramHeader.p_memsz.offset == 0x28
    assert ELF_NOTE_HEADER.size == 12


def test_loads_segments_and_zero_fills(memory: GuestMemory) -> None:
    memory.write(ENTRY + 0x1100, b"\xff" * 0x100)  # stale bytes the bss tail must clear
    result = load_elf(memory, io.BytesIO(KERNEL))
    assert result.kernel_start == ENTRY
    assert result.kernel_end == ENTRY + 0x4000
    assert result.entry_64 == ENTRY
    assert result.pvh_entry == ENTRY + 0x40
    assert memory.read(ENTRY, 0x1000) == b"\xaa" * 0x1000
    assert memory.read(ENTRY + 0x1000, 0x100) == b"\xbb" * 0x100
    assert memory.read(ENTRY + 0x1100, 0x2F00) == bytes(0x2F00)


def test_four_byte_pvh_note_and_no_note(memory: GuestMemory) -> None:
    notes = note(b"Xen\x00", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", ENTRY + 8))
    image = build_elf([(ENTRY, b"\x90" * 16, 16)], notes=notes)
    assert load_elf(memory, io.BytesIO(image)).pvh_entry == ENTRY + 8
    image = build_elf([(ENTRY, b"\x90" * 16, 16)])
    assert load_elf(memory, io.BytesIO(image)).pvh_entry is None


def test_other_notes_named_xen_are_skipped(memory: GuestMemory) -> None:
    notes = note(b"GNU\x00", XEN_ELFNOTE_PHYS32_ENTRY, b"\x00" * 4)
    image = build_elf([(ENTRY, b"\x90" * 16, 16)], notes=notes)
    assert load_elf(memory, io.BytesIO(image)).pvh_entry is None


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"", "too short"),
        (b"MZ" + bytes(100), "not an ELF"),
        (build_elf([(ENTRY, b"x", 1)], machine=3), "not x86_64"),
        (build_elf([(0x9000, b"x", 1)], entry=0x9000), "below 0x100000"),
        (build_elf([(HIGH_RAM_START - 0x10, b"x" * 32, 32)], entry=HIGH_RAM_START), "below"),
        (build_elf([(RAM_SIZE - 8, b"x", 16)], entry=RAM_SIZE - 8), "does not fit"),
        (build_elf([(0x1_0000_0000, b"x", 1)], entry=0x1_0000_0000), "does not fit"),
        (build_elf([(ENTRY, b"x" * 8, 4)]), "file size larger"),
        (build_elf([(ENTRY, b"x" * 16, 16), (ENTRY + 8, b"y", 1)]), "overlap"),
        (build_elf([(ENTRY, b"x", 1)], entry=ENTRY + 4), "entry point"),
        (build_elf([]), "no program headers"),
        (build_elf([(ENTRY, b"", 0)]), "no loadable segments"),
        (build_elf([(ENTRY, b"x", 1)], notes=b"\x04\x00"), "truncated"),
        (
            build_elf(
                [(ENTRY, b"x", 1)], notes=note(b"Xen\x00", XEN_ELFNOTE_PHYS32_ENTRY, b"\x01\x02")
            ),
            "2-byte value",
        ),
        (
            build_elf(
                [(ENTRY, b"x", 1)],
                notes=note(b"Xen\x00", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x50)),
            ),
            "PVH entry point 0x50 is not in a loaded segment",
        ),
        (KERNEL[:-1], "note segment 2 lies beyond the end"),
        (build_elf([(ENTRY, b"x" * 16, 16)])[:-1], "segment 0 at 0x200000 lies beyond the end"),
        (KERNEL[:100], "program headers lie beyond the end"),
    ],
)
def test_rejects_bad_kernels(memory: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        load_elf(memory, io.BytesIO(image))
    assert memory.read(ENTRY, 0x10) == bytes(0x10)  # nothing was written


def test_error_is_one_sentence(memory: GuestMemory) -> None:
    with pytest.raises(LoaderError) as info:
        load_elf(memory, io.BytesIO(build_elf([(ENTRY, b"x", 1)], machine=40)))
    assert str(info.value) == "ELF kernel is for machine 40, not x86_64 (62)"


LOW_AREA_ZEROS = bytes(HIGH_RAM_START)


def _load_hostile(image: bytes) -> None:
    """Load ``image``: only LoaderError may escape, and nothing lands below 1 MiB."""
    with GuestMemory([(0, RAM_SIZE)]) as mem:
        try:
            result = load_elf(mem, io.BytesIO(image))
        except LoaderError as exc:
            assert str(exc)
        else:
            assert HIGH_RAM_START <= result.kernel_start < result.kernel_end <= RAM_SIZE
        assert mem.read(0, HIGH_RAM_START) == LOW_AREA_ZEROS


_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(cut=st.integers(min_value=0, max_value=len(KERNEL)))
def test_truncated_kernels_fail_cleanly(cut: int) -> None:
    _load_hostile(KERNEL[:cut])


@_settings
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(KERNEL) - 1), st.integers(0, 255)), min_size=1, max_size=8
    )
)
def test_corrupted_kernels_fail_cleanly(edits: list[tuple[int, int]]) -> None:
    image = bytearray(KERNEL)
    for offset, value in edits:
        image[offset] = value
    _load_hostile(bytes(image))


_u64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=st.tuples(_u64, _u64, _u64, _u64),
    phnum=st.integers(0, 0xFFFF),
    phoff=_u64,
    entry=_u64,
)
def test_hostile_header_fields_fail_cleanly(
    fields: tuple[int, int, int, int], phnum: int, phoff: int, entry: int
) -> None:
    offset, paddr, filesz, memsz = fields
    image = bytearray(KERNEL)
    header = Elf64Header.from_buffer(image)
    phdr = Elf64ProgramHeader.from_buffer(image, 64)
    phdr.p_offset, phdr.p_paddr, phdr.p_filesz, phdr.p_memsz = offset, paddr, filesz, memsz
    _load_hostile(bytes(image))
    header.e_entry = entry
    _load_hostile(bytes(image))
    header.e_phnum, header.e_phoff = phnum, phoff
    _load_hostile(bytes(image))
    del header, phdr


@_settings
@given(notes=st.binary(max_size=64))
def test_random_note_segments_fail_cleanly(notes: bytes) -> None:
    _load_hostile(build_elf([(ENTRY, b"x", 1)], notes=notes))
