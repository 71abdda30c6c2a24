"""Unit tests for nubis.image's binary formats: newc cpio, ELF notes and libraries, bzImage payload."""

from __future__ import annotations

import io
import struct

import pytest

from nubis.image import elf
from nubis.image.cpio import CpioWriter
from nubis.image.errors import ImageError
from nubis.image.kernel import LZ4_LEGACY_MAGIC, find_payload


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    entries = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return entries
        entries.append((name, fields[1], body, fields[9], fields[10]))


def test_cpio_entries_round_trip_and_are_aligned() -> None:
    out = io.BytesIO()
    writer = CpioWriter(out)
    writer.add_directory("bin")
    writer.add_file("bin/hello", b"abc", 0o755)
    writer.add_symlink("bin/sh", "/bin/busybox")
    writer.add_char_device("dev/console", 5, 1)
    writer.close()
    data = out.getvalue()
    assert len(data) % 4 == 0
    entries = parse_newc(data)
    assert [e[0] for e in entries] == ["bin", "bin/hello", "bin/sh", "dev/console"]
    assert entries[1][1] == 0o100755 and entries[1][2] == b"abc"
    assert entries[2][1] == 0o120777 and entries[2][2] == b"/bin/busybox"
    assert entries[3][1] == 0o020600 and entries[3][3:] == (5, 1)


def test_cpio_tree_is_reproducible(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    (tmp_path / "l").symlink_to("a/f")
    archives = []
    for _ in range(2):
        out = io.BytesIO()
        writer = CpioWriter(out)
        writer.add_tree(tmp_path)
        writer.close()
        archives.append(out.getvalue())
    assert archives[0] == archives[1]
    # Each directory's files come before its subdirectories, all in sorted order.
    assert [e[0] for e in parse_newc(archives[0])] == ["l", "a", "a/f"]


def make_elf(
    notes: bytes = b"", dynamic: bytes = b"", strtab: bytes = b"", interp: bytes = b""
) -> tuple[bytes, int]:
    """A minimal ELF64 with optional PT_NOTE, PT_INTERP and PT_DYNAMIC (strtab in one PT_LOAD)."""
    phdrs = []
    body = b""
    base = 64 + 56 * 4
    if notes:
        phdrs.append((elf.PT_NOTE, base + len(body), len(notes)))
        body += notes
    if interp:
        phdrs.append((elf.PT_INTERP, base + len(body), len(interp)))
        body += interp
    strtab_off = base + len(body)
    body += strtab
    if dynamic:
        phdrs.append((elf.PT_DYNAMIC, base + len(body), len(dynamic)))
        body += dynamic
    phdrs.append((elf.PT_LOAD, 0, base + len(body)))
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, len(phdrs), 64, 0, 0)
    table = b"".join(
        struct.pack("<IIQQQQQQ", t, 4, off, off, off, size, size, 8) for t, off, size in phdrs
    )
    table += bytes(56 * (4 - len(phdrs)))
    return header + table + body, strtab_off


def test_pvh_entry_is_read_from_the_xen_note() -> None:
    desc = struct.pack("<Q", 0x1000850)
    note = struct.pack("<III", 4, len(desc), elf.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + desc
    image, _ = make_elf(notes=note)
    assert elf.pvh_entry(image) == 0x1000850


def test_missing_pvh_note_is_a_clear_error() -> None:
    image, _ = make_elf()
    with pytest.raises(ImageError, match="XEN_ELFNOTE_PHYS32_ENTRY"):
        elf.pvh_entry(image)
    with pytest.raises(ImageError, match="not an ELF"):
        elf.pvh_entry(b"MZ" + bytes(100))


def test_needed_libraries_and_interpreter() -> None:
    strtab = b"\0libc.so.6\0libaio.so.1\0"
    interp = b"/lib64/ld-linux-x86-64.so.2\0"

    def dynamic(strtab_off: int) -> bytes:
        return b"".join(
            struct.pack("<qQ", tag, value)
            for tag, value in [
                (elf.DT_NEEDED, 1), (elf.DT_NEEDED, 11), (elf.DT_STRTAB, strtab_off), (elf.DT_NULL, 0)
            ]
        )  # fmt: skip

    _, strtab_off = make_elf(strtab=strtab, dynamic=dynamic(0), interp=interp)
    image, _ = make_elf(strtab=strtab, dynamic=dynamic(strtab_off), interp=interp)
    assert elf.needed_libraries(image) == ["libc.so.6", "libaio.so.1"]
    assert elf.interpreter(image) == "/lib64/ld-linux-x86-64.so.2"
    static, _ = make_elf()
    assert elf.needed_libraries(static) == []
    assert elf.interpreter(static) is None


def fake_bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<II", image, 0x248, 16, len(payload) + 4)
    return bytes(image) + bytes(16) + payload + struct.pack("<I", 1234)


def test_payload_is_found_from_the_boot_header_without_its_size_trailer() -> None:
    payload = LZ4_LEGACY_MAGIC + b"compressed"
    assert find_payload(fake_bzimage(payload)) == payload


def test_a_non_bzimage_is_rejected() -> None:
    with pytest.raises(ImageError, match="not a bzImage"):
        find_payload(bytes(4096))
