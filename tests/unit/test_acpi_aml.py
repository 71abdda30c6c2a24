"""Tests for nubis.acpi.aml against byte sequences worked out by hand from ACPI 6.4 chapter 20."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nubis.acpi.aml import (
    ONE,
    ONES,
    ZERO,
    AmlError,
    And,
    Arg,
    Buffer,
    Device,
    DWordMemory,
    EisaId,
    Else,
    EndTag,
    Field,
    FieldAccess,
    FieldUpdate,
    If,
    Integer,
    Interrupt,
    Io,
    IrqNoFlags,
    LEqual,
    Local,
    Memory32Fixed,
    Method,
    Name,
    NamePath,
    Notify,
    OperationRegion,
    Package,
    QWordMemory,
    RegionSpace,
    ResourceTemplate,
    Return,
    Scope,
    Store,
    String,
    WordBusNumber,
    WordIo,
    crs,
    encode_pkg_length,
    hid,
    sta,
    to_aml,
    uid,
)


@pytest.mark.parametrize(
    ("content", "encoded"),
    [
        (0, b"\x01"),
        (0x3E, b"\x3f"),  # 0x3e + 1 byte = 0x3f, the largest one-byte form
        (0x3F, b"\x41\x04"),  # 0x3f + 2 = 0x41: low nibble 1 in the lead byte, 0x04 after
        (0xFFD, b"\x4f\xff"),  # 0xfff, the largest two-byte form
        (0xFFE, b"\x81\x00\x01"),  # 0x1001
        (0xFFFFC, b"\x8f\xff\xff"),  # 0xfffff, the largest three-byte form
        (0xFFFFD, b"\xc1\x00\x00\x01"),  # 0x100001
        ((1 << 28) - 5, b"\xcf\xff\xff\xff"),
    ],
)
def test_pkg_length_forms(content: int, encoded: bytes) -> None:
    assert encode_pkg_length(content) == encoded


def test_pkg_length_limits_and_field_form() -> None:
    with pytest.raises(AmlError, match="exceeds the AML maximum"):
        encode_pkg_length((1 << 28) - 4)
    with pytest.raises(AmlError):
        encode_pkg_length(-1)
    assert encode_pkg_length(8, include_self=False) == b"\x08"
    assert encode_pkg_length(0x40, include_self=False) == b"\x40\x04"


def _decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, bytes used): the decoder side of section 20.2.4, for the round-trip property."""
    follow = data[0] >> 6
    if follow == 0:
        return data[0] & 0x3F, 1
    value = data[0] & 0x0F
    for index in range(follow):
        value |= data[1 + index] << (4 + 8 * index)
    return value, 1 + follow


@given(st.integers(0, (1 << 28) - 5))
def test_pkg_length_round_trips_in_the_shortest_form(content: int) -> None:
    encoded = encode_pkg_length(content)
    value, used = _decode_pkg_length(encoded)
    assert used == len(encoded)
    assert value == content + used
    largest_total = {1: 0x3F, 2: 0xFFF, 3: 0xFFFFF}  # the largest value each form encodes
    assert used == 1 or content + used - 1 > largest_total[used - 1]  # nothing shorter fits


@pytest.mark.parametrize(
    ("path", "encoded"),
    [
        ("_SB_", b"_SB_"),
        ("_SB", b"_SB_"),
        ("\\", b"\\\x00"),
        ("", b"\x00"),
        ("\\_SB", b"\\_SB_"),
        ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"),
        ("\\_SB.PCI0.COM1", b"\\\x2f\x03_SB_PCI0COM1"),
        ("^^FOO", b"^^FOO_"),
        ("^_SB.GED", b"^\x2e_SB_GED_"),
    ],
)
def test_name_paths(path: str, encoded: bytes) -> None:
    assert NamePath(path).to_aml_bytes() == encoded


@pytest.mark.parametrize("path", ["1ABC", "ABCDE", "abcd", "\\_SB..X", "A-B"])
def test_bad_name_paths(path: str) -> None:
    with pytest.raises(AmlError, match="name segment"):
        NamePath(path).to_aml_bytes()


@pytest.mark.parametrize(
    ("term", "encoded"),
    [
        (ZERO, b"\x00"),
        (ONE, b"\x01"),
        (ONES, b"\xff"),
        (Integer(2), b"\x0a\x02"),
        (Integer(0xFF), b"\x0a\xff"),
        (Integer(0x100), b"\x0b\x00\x01"),
        (Integer(0x10000), b"\x0c\x00\x00\x01\x00"),
        (Integer(1 << 32), b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
        (Integer(1, width=32), b"\x0c\x01\x00\x00\x00"),
        (Integer(0, width=8), b"\x0a\x00"),
        (String("ab"), b"\x0d\x61\x62\x00"),
        (EisaId("PNP0A08"), b"\x0c\x41\xd0\x0a\x08"),
        (EisaId("PNP0501"), b"\x0c\x41\xd0\x05\x01"),
        (Buffer(b"\x01\x02"), b"\x11\x05\x0a\x02\x01\x02"),
        (Package([1, 2]), b"\x12\x05\x02\x01\x0a\x02"),
        (Name("_UID", 0), b"\x08_UID\x00"),
        (hid("PNP0A08"), b"\x08_HID\x0c\x41\xd0\x0a\x08"),
        (hid("ACPI0013"), b"\x08_HID\x0dACPI0013\x00"),
        (uid(1), b"\x08_UID\x01"),
        (sta(), b"\x08_STA\x0a\x0f"),
        (Method("_STA", 0, [Return(0x0F)]), b"\x14\x09_STA\x00\xa4\x0a\x0f"),
        (Method("_EVT", 1, [], serialized=True), b"\x14\x06_EVT\x09"),
        (Method("FOO", 2, [], sync_level=3), b"\x14\x06FOO_\x32"),
        (Device("COM1", [Name("_UID", 0)]), b"\x5b\x82\x0bCOM1\x08_UID\x00"),
        (Scope("\\_SB", []), b"\x10\x06\\_SB_"),
        (If(LEqual(Arg(0), 1), [Return(1)]), b"\xa0\x06\x93\x68\x01\xa4\x01"),
        (Else([Return(0)]), b"\xa1\x03\xa4\x00"),
        (Store(1, Local(0)), b"\x70\x01\x60"),
        (And(Local(0), 1), b"\x7b\x60\x01\x00"),
        (And(Local(0), 1, Local(1)), b"\x7b\x60\x01\x61"),
        (Notify(NamePath("\\_SB.PWRB"), 0x80), b"\x86\\\x2e_SB_PWRB\x0a\x80"),
        (
            OperationRegion("GDST", RegionSpace.SYSTEM_MEMORY, 0xFED00000, 1),
            b"\x5b\x80GDST\x00\x0c\x00\x00\xd0\xfe\x01",
        ),
        (
            Field(
                "GDST",
                [("GDAT", 8), (None, 8)],
                access=FieldAccess.BYTE,
                update=FieldUpdate.WRITE_AS_ZEROS,
            ),
            b"\x5b\x81\x0dGDST\x41GDAT\x08\x00\x08",
        ),
        (
            Field("REGS", [("A", 1)], access=FieldAccess.DWORD, lock=True),
            b"\x5b\x81\x0bREGS\x13A___\x01",
        ),
    ],
)
def test_terms(term: object, encoded: bytes) -> None:
    assert to_aml(term) == encoded  # type: ignore[arg-type]


def test_python_values_stand_for_terms() -> None:
    assert to_aml(0x1234) == b"\x0b\x34\x12"
    assert to_aml("x") == b"\x0dx\x00"
    with pytest.raises(AmlError, match="boolean"):
        to_aml(True)


@pytest.mark.parametrize(
    ("descriptor", "encoded"),
    [
        (Io(0x3F8, 0x3F8, 1, 8), b"\x47\x01\xf8\x03\xf8\x03\x01\x08"),
        (IrqNoFlags(4), b"\x22\x10\x00"),
        (Interrupt(5), b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"),
        (
            Interrupt(33, edge_triggered=False, active_low=True, shared=True),
            b"\x89\x06\x00\x0d\x01\x21\x00\x00\x00",
        ),
        (Memory32Fixed(0xFED00000, 0x1000), b"\x86\x09\x00\x01\x00\x00\xd0\xfe\x00\x10\x00\x00"),
        (
            WordBusNumber(0, 0),
            b"\x88\x0d\x00\x02\x0c\x00" + b"\x00\x00" * 4 + b"\x01\x00",
        ),
        (
            WordIo(0x0D00, 0xFFFF),
            b"\x88\x0d\x00\x01\x0c\x03\x00\x00\x00\x0d\xff\xff\x00\x00\x00\xf3",
        ),
        (
            DWordMemory(0xC0000000, 0x28000000),
            b"\x87\x17\x00\x00\x0c\x01"
            + bytes(4)
            + b"\x00\x00\x00\xc0"
            + b"\xff\xff\xff\xe7"
            + bytes(4)
            + b"\x00\x00\x00\x28",
        ),
        (
            QWordMemory(1 << 32, 1 << 30),
            b"\x8a\x2b\x00\x00\x0c\x01"
            + bytes(8)
            + (1 << 32).to_bytes(8, "little")
            + ((1 << 32) + (1 << 30) - 1).to_bytes(8, "little")
            + bytes(8)
            + (1 << 30).to_bytes(8, "little"),
        ),
        (EndTag(0x55), b"\x79\x55"),
    ],
)
def test_resource_descriptors(descriptor: object, encoded: bytes) -> None:
    assert to_aml(descriptor) == encoded  # type: ignore[arg-type]


def test_resource_template_checksum() -> None:
    # Data 22 10 00 79 sums to 0xab, so the end tag's checksum is 0x55.
    assert ResourceTemplate([IrqNoFlags(4)]).to_aml_bytes() == (
        b"\x11\x08\x0a\x05\x22\x10\x00\x79\x55"
    )
    template = crs([Io(0x70, 0x70, 1, 2), IrqNoFlags(8), WordBusNumber(0, 7)]).to_aml_bytes()
    body = template[template.index(b"\x47") :]
    assert sum(body) % 256 == 0
    assert body[-2] == 0x79


def test_long_scope_uses_a_two_byte_pkg_length() -> None:
    names = [Name(f"N{i:03d}", i) for i in range(20)]
    encoded = Scope("\\_SB", names).to_aml_bytes()
    content = b"\\_SB_" + b"".join(n.to_aml_bytes() for n in names)
    assert encoded == b"\x10" + encode_pkg_length(len(content)) + content
    assert encoded[1] >> 6 == 1


@pytest.mark.parametrize(
    "term",
    [
        Integer(-1),
        Integer(1 << 64),
        Integer(0x100, width=8),
        Integer(1, width=12),
        String("\u00e9"),
        EisaId("pnp0a08"),
        Local(8),
        Arg(7),
        Method("X", 8, []),
        Method("X", 0, [], sync_level=16),
        IrqNoFlags(16),
        Package([0] * 256),
        WordIo(0x100, 0xFF),
        DWordMemory(0xFFFFFFFF, 2),
        Field("R", [("A", 0)]),
    ],
)
def test_unencodable_terms(term: object) -> None:
    with pytest.raises(AmlError):
        to_aml(term)  # type: ignore[arg-type]
