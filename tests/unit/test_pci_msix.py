"""Tests for nubis.pci.msix: capability bytes, table writes, masking and pending bits."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nubis.pci.msix import (
    MSIX_CAPABILITY,
    MSIX_TABLE_ENTRY,
    MsixConfig,
    MsixVector,
)

ENABLE = 1 << 15
FUNCTION_MASK = 1 << 14


class RecordingRouter:
    """An MsiInterruptRouter that records routes and deliveries."""

    def __init__(self) -> None:
        self.updates: list[tuple[int, int, int, bool]] = []
        self.delivered: list[int] = []

    def update(self, vector: int, address: int, data: int, masked: bool) -> None:
        self.updates.append((vector, address, data, masked))

    def trigger(self, vector: int) -> None:
        self.delivered.append(vector)


def write_u32(msix: MsixConfig, offset: int, value: int) -> None:
    msix.write_table(offset, memoryview(bytearray(value.to_bytes(4, "little"))))


def program(msix: MsixConfig, vector: int, address: int, data: int, *, masked: bool) -> None:
    base = 16 * vector
    write_u32(msix, base, address & 0xFFFF_FFFF)
    write_u32(msix, base + 4, address >> 32)
    write_u32(msix, base + 8, data)
    write_u32(msix, base + 12, int(masked))


def test_layouts_are_pinned() -> None:
    assert MSIX_CAPABILITY.size == 12
    assert MSIX_TABLE_ENTRY.size == 16


def test_capability_bytes_describe_table_and_pba() -> None:
    msix = MsixConfig(
        3, RecordingRouter(), table_bar=0, table_offset=0x4000, pba_bar=2, pba_offset=0x6000
    )
    body, mask = msix.capability()
    assert struct.unpack("<BBHII", body) == (0x11, 0, 2, 0x4000, 0x6002)
    assert struct.unpack("<BBHII", mask) == (0, 0, 0xC000, 0, 0)
    assert msix.table_size == 48
    assert msix.pba_size == 8


@pytest.mark.parametrize("count", [0, 2049])
def test_table_size_is_bounded(count: int) -> None:
    with pytest.raises(ValueError, match="table size"):
        MsixConfig(count, RecordingRouter())


def test_vectors_start_masked() -> None:
    msix = MsixConfig(2, RecordingRouter())
    assert msix.vector(1) == MsixVector(0, 0, masked=True)


def test_delivery_when_enabled_and_unmasked() -> None:
    router = RecordingRouter()
    msix = MsixConfig(2, router)
    msix.set_message_control(ENABLE)
    program(msix, 1, 0xFEE0_1000, 0x41, masked=False)
    assert router.updates[-1] == (1, 0xFEE0_1000, 0x41, False)
    msix.trigger(1)
    assert router.delivered == [1]
    assert not msix.is_pending(1)


def test_masked_vector_sets_pending_and_fires_on_unmask() -> None:
    router = RecordingRouter()
    msix = MsixConfig(4, router)
    msix.set_message_control(ENABLE)
    program(msix, 2, 0xFEE0_0000, 0x30, masked=True)
    msix.trigger(2)
    assert router.delivered == []
    assert msix.is_pending(2)
    pba = bytearray(8)
    msix.read_pba(0, memoryview(pba))
    assert pba[0] == 0b100
    write_u32(msix, 2 * 16 + 12, 0)  # unmask
    assert router.delivered == [2]
    assert not msix.is_pending(2)
    assert router.updates[-1] == (2, 0xFEE0_0000, 0x30, False)


def test_function_mask_holds_all_vectors() -> None:
    router = RecordingRouter()
    msix = MsixConfig(2, router)
    program(msix, 0, 0xFEE0_0000, 0x20, masked=False)
    program(msix, 1, 0xFEE0_0000, 0x21, masked=False)
    msix.set_message_control(ENABLE | FUNCTION_MASK)
    msix.trigger(0)
    msix.trigger(1)
    msix.trigger(1)
    assert router.delivered == []
    msix.set_message_control(ENABLE)
    assert sorted(router.delivered) == [0, 1]  # pending once each, not per trigger


def test_disabled_msix_keeps_interrupts_pending() -> None:
    router = RecordingRouter()
    msix = MsixConfig(1, router)
    program(msix, 0, 0xFEE0_0000, 0x22, masked=False)
    msix.trigger(0)
    assert router.delivered == []
    assert msix.is_pending(0)
    msix.set_message_control(ENABLE)
    assert router.delivered == [0]
    assert msix.message_control == ENABLE


def test_out_of_range_trigger_is_dropped() -> None:
    router = RecordingRouter()
    msix = MsixConfig(1, router)
    msix.set_message_control(ENABLE)
    msix.trigger(1)
    msix.trigger(-1)
    assert router.delivered == []


def test_qword_write_and_read_back() -> None:
    msix = MsixConfig(2, RecordingRouter())
    msix.write_table(16, memoryview(bytearray((0x1_FEE0_0000).to_bytes(8, "little"))))
    out = bytearray(8)
    msix.read_table(16, memoryview(out))
    assert int.from_bytes(out, "little") == 0x1_FEE0_0000


def test_unaligned_and_out_of_range_accesses_are_ignored() -> None:
    router = RecordingRouter()
    msix = MsixConfig(1, router)
    write_u32(msix, 2, 0xFFFF_FFFF)
    write_u32(msix, 16, 0xFFFF_FFFF)
    assert router.updates == []
    out = bytearray(b"\xaa" * 4)
    msix.read_table(14, memoryview(out))
    assert out == bytes(4)
    msix.write_pba(0, memoryview(bytearray(b"\xff" * 8)))
    assert not msix.is_pending(0)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("table"), st.integers(-4, 80), st.binary(max_size=9)),
            st.tuples(st.just("control"), st.integers(0, 0xFFFF), st.just(b"")),
            st.tuples(st.just("trigger"), st.integers(-2, 6), st.just(b"")),
            st.tuples(st.just("pba"), st.integers(-4, 16), st.binary(max_size=9)),
        ),
        max_size=50,
    )
)
def test_fuzzed_msix_keeps_invariants(ops: list[tuple[str, int, bytes]]) -> None:
    router = RecordingRouter()
    msix = MsixConfig(4, router)
    for kind, value, data in ops:
        if kind == "table":
            msix.write_table(value, memoryview(bytearray(data)))
            msix.read_table(value, memoryview(bytearray(len(data))))
        elif kind == "control":
            msix.set_message_control(value)
        elif kind == "pba":
            msix.write_pba(value, memoryview(bytearray(data)))
            msix.read_pba(value, memoryview(bytearray(len(data))))
        else:
            msix.trigger(value)
        assert msix.message_control & 0x7FF == 3
        for vector in range(4):
            masked = not msix.enabled or msix.function_masked or msix.vector(vector).masked
            # A vector is never left pending while it could be delivered.
            assert not (msix.is_pending(vector) and not masked)
    assert all(0 <= v < 4 for v in router.delivered)
