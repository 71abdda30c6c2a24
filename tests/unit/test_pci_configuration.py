"""Tests for nubis.pci.configuration: header layout, masks, capabilities, BAR sizing and moves."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nubis.pci.configuration import (
    CONFIG_SPACE_SIZE,
    TYPE0_HEADER,
    BarKind,
    BarReprogramming,
    PciConfiguration,
    PciHeaderOffset,
)


def make_config() -> PciConfiguration:
    return PciConfiguration(
        vendor_id=0x1AF4,
        device_id=0x1042,
        class_code=0x018000,
        revision_id=1,
        subsystem_vendor_id=0x1AF4,
        subsystem_id=0x40,
    )


def read(config: PciConfiguration, offset: int, size: int) -> int:
    buf = bytearray(size)
    config.read(offset, memoryview(buf))
    return int.from_bytes(buf, "little")


def write(
    config: PciConfiguration, offset: int, value: int, size: int = 4
) -> BarReprogramming | None:
    return config.write(offset, memoryview(bytearray(value.to_bytes(size, "little"))))


def test_type0_header_layout_matches_the_spec_offsets() -> None:
    assert TYPE0_HEADER.size == 64
    # Field offsets of figure 6-1, recomputed from the struct's format prefix.
    fmt = TYPE0_HEADER.format
    assert isinstance(fmt, str)
    codes = [
        "H",
        "H",
        "H",
        "H",
        "B",
        "B",
        "B",
        "B",
        "B",
        "B",
        "B",
        "B",
        "6I",
        "I",
        "H",
        "H",
        "I",
        "B",
    ]
    names = [
        "VENDOR_ID",
        "DEVICE_ID",
        "COMMAND",
        "STATUS",
        "REVISION_ID",
        "PROG_IF",
        "SUBCLASS",
        "CLASS_CODE",
        "CACHE_LINE_SIZE",
        "LATENCY_TIMER",
        "HEADER_TYPE",
        "BIST",
        "BAR0",
        "CARDBUS_CIS",
        "SUBSYSTEM_VENDOR_ID",
        "SUBSYSTEM_ID",
        "EXPANSION_ROM",
        "CAPABILITIES_POINTER",
    ]
    prefix = "<"
    for code, name in zip(codes, names, strict=True):
        assert struct.calcsize(prefix) == PciHeaderOffset[name], name
        prefix += code
    assert int(PciHeaderOffset.INTERRUPT_LINE) == 0x3C
    assert int(PciHeaderOffset.INTERRUPT_PIN) == 0x3D


def test_ids_and_class_read_back() -> None:
    config = make_config()
    assert read(config, 0, 4) == 0x1042_1AF4
    assert read(config, 0x08, 4) == 0x0180_0001
    assert read(config, 0x2C, 4) == 0x0040_1AF4
    assert read(config, 0x0E, 1) == 0
    assert read(config, 0x3D, 1) == 0


def test_read_only_fields_ignore_writes() -> None:
    config = make_config()
    for offset in (0x00, 0x08, 0x2C, 0x30, 0x34):
        before = read(config, offset, 4)
        write(config, offset, 0xFFFF_FFFF)
        assert read(config, offset, 4) == before


def test_command_register_keeps_only_writable_bits() -> None:
    config = make_config()
    write(config, PciHeaderOffset.COMMAND, 0xFFFF, 2)
    assert read(config, PciHeaderOffset.COMMAND, 2) == 0x0547
    assert config.memory_decode_enabled
    write(config, PciHeaderOffset.COMMAND, 0, 2)
    assert not config.memory_decode_enabled


def test_interrupt_line_is_scratch_and_pin_is_read_only() -> None:
    config = make_config()
    write(config, PciHeaderOffset.INTERRUPT_LINE, 0xFFFF, 2)
    assert read(config, PciHeaderOffset.INTERRUPT_LINE, 2) == 0x00FF


def test_invalid_accesses_read_all_ones_and_write_nothing() -> None:
    config = make_config()
    assert read(config, 0x02, 4) == 0xFFFF_FFFF  # crosses a dword
    assert read(config, 0x00, 3) == 0xFFFFFF
    assert read(config, CONFIG_SPACE_SIZE - 2, 4) == 0xFFFF_FFFF
    assert read(config, 0x00, 8) == (1 << 64) - 1
    assert write(config, 0x0E, 0xFFFF_FFFF, 4) is None


def test_extended_config_space_reads_zero() -> None:
    config = make_config()
    assert read(config, 0x100, 4) == 0
    write(config, 0x100, 0xFFFF_FFFF)
    assert read(config, 0x100, 4) == 0


def test_capability_list_links_and_sets_status_bit() -> None:
    config = make_config()
    assert read(config, PciHeaderOffset.STATUS, 2) & 0x10 == 0
    first = config.add_capability(bytes([0x09, 0xAA, 5, 1, 2]))
    second = config.add_capability(bytes([0x11, 0, 0, 0]), bytes([0, 0, 0xFF, 0]))
    assert read(config, PciHeaderOffset.STATUS, 2) & 0x10
    assert read(config, 0x34, 1) == first == 0x40
    assert second == 0x48  # dword aligned after the 5-byte capability
    assert read(config, first, 1) == 0x09
    assert read(config, first + 1, 1) == second
    assert read(config, second + 1, 1) == 0
    # Id and next pointer are read-only even when the mask says otherwise.
    write(config, second, 0xFFFF_FFFF)
    assert read(config, second, 4) == 0x00FF_0011


def test_capabilities_must_fit_in_256_bytes() -> None:
    config = make_config()
    config.add_capability(bytes(180))
    with pytest.raises(ValueError, match="no room"):
        config.add_capability(bytes(32))


def test_32bit_bar_sizing_and_move() -> None:
    config = make_config()
    config.add_bar(1, 0x1000, BarKind.MEMORY32)
    config.assign_bar(1, 0xC000_0000)
    offset = PciHeaderOffset.BAR0 + 4
    assert read(config, offset, 4) == 0xC000_0000
    assert write(config, offset, 0xFFFF_FFFF) is None  # sizing never moves
    assert read(config, offset, 4) == 0xFFFF_F000
    assert write(config, offset, 0xC000_0000) is None  # restored: same place
    move = write(config, offset, 0xC010_0000)
    assert move == BarReprogramming(1, 0xC000_0000, 0xC010_0000, 0x1000, BarKind.MEMORY32)
    # Not committed yet: the BAR still decodes at the old address.
    assert config.bar(1).address == 0xC000_0000
    config.move_bar(0xC000_0000, 0xC010_0000)
    assert config.bar(1).address == 0xC010_0000


def test_64bit_prefetchable_bar_sizing_and_move() -> None:
    config = make_config()
    config.add_bar(0, 0x8000, BarKind.MEMORY64, prefetchable=True)
    config.assign_bar(0, 0x1_0000_0000)
    low, high = PciHeaderOffset.BAR0, PciHeaderOffset.BAR0 + 4
    assert read(config, low, 4) == 0x0000_000C
    assert read(config, high, 4) == 1
    # Linux sizes both halves, then restores them: no move at any step.
    for offset, value in ((low, 0xFFFF_FFFF), (high, 0xFFFF_FFFF)):
        assert write(config, offset, value) is None
    assert read(config, low, 4) == 0xFFFF_800C
    assert read(config, high, 4) == 0xFFFF_FFFF
    assert write(config, low, 0x0000_000C) is None
    assert write(config, high, 1) is None
    # Relocation half by half: each half asks for a move from where the BAR decodes.
    move = write(config, low, 0x0001_000C)
    assert move == BarReprogramming(0, 0x1_0000_0000, 0x1_0001_0000, 0x8000, BarKind.MEMORY64)
    move = write(config, high, 2)  # the first move was not committed (say it was refused)
    assert move == BarReprogramming(0, 0x1_0000_0000, 0x2_0001_0000, 0x8000, BarKind.MEMORY64)
    config.move_bar(0x1_0000_0000, 0x2_0001_0000)
    # Upper half first works too.
    assert write(config, high, 3) is not None
    config.move_bar(0x2_0001_0000, 0x3_0001_0000)
    move = write(config, low, 0x0002_0000)
    assert move == BarReprogramming(0, 0x3_0001_0000, 0x3_0002_0000, 0x8000, BarKind.MEMORY64)


def test_large_64bit_bar_has_no_writable_low_address_bits() -> None:
    config = make_config()
    config.add_bar(2, 8 << 30, BarKind.MEMORY64)
    write(config, PciHeaderOffset.BAR0 + 8, 0xFFFF_FFFF)
    assert read(config, PciHeaderOffset.BAR0 + 8, 4) == 0x4
    write(config, PciHeaderOffset.BAR0 + 12, 0xFFFF_FFFF)
    assert read(config, PciHeaderOffset.BAR0 + 12, 4) == 0xFFFF_FFFE


@pytest.mark.parametrize(
    ("index", "size", "kind", "message"),
    [
        (5, 0x1000, BarKind.MEMORY64, "does not fit"),
        (0, 0x1800, BarKind.MEMORY32, "power of two"),
        (0, 8, BarKind.MEMORY32, "power of two"),
        (0, 1 << 32, BarKind.MEMORY32, "power of two"),
    ],
)
def test_bad_bars_are_refused(index: int, size: int, kind: BarKind, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_config().add_bar(index, size, kind)


def test_bar_registers_cannot_overlap() -> None:
    config = make_config()
    config.add_bar(0, 0x1000, BarKind.MEMORY64)
    with pytest.raises(ValueError, match="already in use"):
        config.add_bar(1, 0x1000, BarKind.MEMORY32)


def test_assign_bar_checks_alignment_and_range() -> None:
    config = make_config()
    config.add_bar(0, 0x1000, BarKind.MEMORY32)
    with pytest.raises(ValueError, match="size-aligned"):
        config.assign_bar(0, 0xC000_0800)
    with pytest.raises(ValueError, match="size-aligned"):
        config.assign_bar(0, 1 << 32)
    with pytest.raises(ValueError, match="not declared"):
        config.assign_bar(3, 0)


def test_move_bar_requires_a_bar_at_the_old_address() -> None:
    config = make_config()
    config.add_bar(0, 0x1000, BarKind.MEMORY32)
    config.assign_bar(0, 0xC000_0000)
    with pytest.raises(ValueError, match="no BAR decodes"):
        config.move_bar(0xD000_0000, 0xC000_0000)


def _fuzzed_config() -> PciConfiguration:
    config = make_config()
    config.add_bar(0, 0x8000, BarKind.MEMORY64)
    config.add_bar(2, 0x1000, BarKind.MEMORY32, prefetchable=True)
    config.assign_bar(0, 0x1_0000_0000)
    config.assign_bar(2, 0xC000_0000)
    config.add_capability(
        bytes([0x11, 0, 0x03, 0x00, 0, 0, 0, 0, 0, 0, 0, 0]), bytes([0, 0, 0, 0xC0]) + bytes(8)
    )
    return config


accesses = st.lists(
    st.tuples(
        st.integers(min_value=-8, max_value=CONFIG_SPACE_SIZE + 8),
        st.binary(min_size=0, max_size=9),
    ),
    max_size=40,
)


@given(accesses)
def test_fuzzed_writes_never_raise_and_keep_invariants(writes: list[tuple[int, bytes]]) -> None:
    config = _fuzzed_config()
    ids = read(config, 0, 4), read(config, 8, 4), read(config, 0x2C, 4)
    for offset, data in writes:
        move = config.write(offset, memoryview(bytearray(data)))
        if move is not None:
            bar = config.bar(move.index)
            assert move.old_address == bar.address
            assert move.new_address % bar.size == 0
            config.move_bar(move.old_address, move.new_address)
        buf = bytearray(len(data))
        config.read(offset, memoryview(buf))
    assert (read(config, 0, 4), read(config, 8, 4), read(config, 0x2C, 4)) == ids
    # BAR type bits and the capability chain survive any write.
    assert read(config, PciHeaderOffset.BAR0, 4) & 0xF == 0x4
    assert read(config, PciHeaderOffset.BAR0 + 8, 4) & 0xF == 0x8
    assert read(config, 0x34, 1) == 0x40
    assert read(config, 0x41, 1) == 0
    assert read(config, PciHeaderOffset.STATUS, 2) == 0x10
    assert read(config, 0x100, 4) == 0
