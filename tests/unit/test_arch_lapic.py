"""LAPIC LINT0/LINT1 programming (Intel SDM Vol. 3A §11.5.1)."""

from __future__ import annotations

import struct

import pytest

from nubis.arch.x86_64 import lapic


def test_delivery_mode_replaces_bits_10_to_8_only() -> None:
    assert lapic.with_delivery_mode(0x0001_0000, lapic.APIC_MODE_EXTINT) == 0x0001_0700
    assert lapic.with_delivery_mode(0x0001_07FF, lapic.APIC_MODE_NMI) == 0x0001_04FF


def test_program_lint_touches_only_lint0_and_lint1() -> None:
    page = bytearray(range(256)) * 4
    struct.pack_into("<I", page, 0x350, 0x0001_0000)  # masked, fixed
    struct.pack_into("<I", page, 0x360, 0x0001_0000)
    out = lapic.program_lint(bytes(page))
    assert len(out) == 1024
    assert struct.unpack_from("<I", out, 0x350)[0] == 0x0001_0700
    assert struct.unpack_from("<I", out, 0x360)[0] == 0x0001_0400
    for offset in range(0, 1024, 4):
        if offset not in (0x350, 0x360):
            assert out[offset : offset + 4] == page[offset : offset + 4]


def test_program_lint_rejects_short_page() -> None:
    with pytest.raises(ValueError, match="LVT LINT1"):
        lapic.program_lint(bytes(0x360))
