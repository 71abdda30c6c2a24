"""Boot GDT descriptors and the segments they load (Intel SDM Vol. 3A §3.4.5)."""

from __future__ import annotations

import struct

import pytest

from nubis.arch.x86_64 import gdt
from nubis.arch.x86_64.layout import BOOT_GDT_MAX_ENTRIES


def test_well_known_descriptor_encodings() -> None:
    assert gdt.encode_descriptor(gdt.FLAGS_CODE64, 0, 0xFFFFF) == 0x00AF_9B00_0000_FFFF
    assert gdt.encode_descriptor(gdt.FLAGS_CODE32, 0, 0xFFFFF) == 0x00CF_9B00_0000_FFFF
    assert gdt.encode_descriptor(gdt.FLAGS_DATA, 0, 0xFFFFF) == 0x00CF_9300_0000_FFFF
    assert gdt.encode_descriptor(gdt.FLAGS_TSS, 0, 0x67) == 0x0000_8B00_0000_0067
    assert gdt.encode_descriptor(gdt.FLAGS_NULL, 0, 0) == 0


def test_base_and_limit_are_split_across_the_descriptor() -> None:
    d = gdt.encode_descriptor(0x0093, 0x1234_5678, 0xABCDE)
    assert d & 0xFFFF == 0xBCDE
    assert (d >> 16) & 0xFF_FFFF == 0x34_5678
    assert (d >> 48) & 0xF == 0xA
    assert d >> 56 == 0x12
    seg = gdt.Segment.from_descriptor(2, d)
    assert seg.base == 0x1234_5678
    assert seg.limit == 0xABCDE  # G clear: byte granular
    assert seg.selector == 0x10


@pytest.mark.parametrize(
    ("flags", "base", "limit"),
    [(0xF100, 0, 0), (0x93, 1 << 32, 0), (0x93, 0, 1 << 20), (0x93, -1, 0)],
)
def test_encode_rejects_out_of_range_fields(flags: int, base: int, limit: int) -> None:
    with pytest.raises(ValueError):
        gdt.encode_descriptor(flags, base, limit)


def test_long_mode_segments() -> None:
    table = gdt.long_mode_gdt()
    code, data, tss = table.code, table.data, table.tss
    assert (code.selector, code.base, code.limit) == (0x08, 0, 0xFFFF_FFFF)
    assert (code.type, code.present, code.dpl, code.s, code.l, code.db, code.g) == (
        0xB, 1, 0, 1, 1, 0, 1,
    )  # fmt: skip
    assert code.unusable == 0
    assert (data.selector, data.limit, data.type, data.s, data.db, data.l, data.g) == (
        0x10, 0xFFFF_FFFF, 0x3, 1, 1, 0, 1,
    )  # fmt: skip
    assert (tss.selector, tss.limit, tss.type, tss.s, tss.present, tss.g) == (
        0x18, 0x67, 0xB, 0, 1, 0,
    )  # fmt: skip


def test_protected_mode_code_is_32_bit() -> None:
    code = gdt.protected_mode_gdt().code
    assert (code.l, code.db, code.g, code.limit, code.type) == (0, 1, 1, 0xFFFF_FFFF, 0xB)


def test_gdt_bytes_fit_the_layout() -> None:
    for table in (gdt.long_mode_gdt(), gdt.protected_mode_gdt()):
        raw = table.to_bytes()
        assert len(raw) == BOOT_GDT_MAX_ENTRIES * 8 == gdt.BOOT_GDT_LIMIT + 1
        assert struct.unpack("<4Q", raw) == table.descriptors
        assert table.descriptors[0] == 0
    assert gdt.empty_idt() == bytes(8)
    assert gdt.BOOT_IDT_LIMIT == 7
