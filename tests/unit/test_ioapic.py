"""The userspace IOAPIC: register access, MSI translation and routes (nubis.devices.ioapic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nubis.arch.x86_64 import layout
from nubis.devices.ioapic import (
    RTE_MASKED,
    IoApic,
    MsiMessage,
    redirection_to_msi,
)


class Routes:
    def __init__(self) -> None:
        self.calls: list[tuple[int, MsiMessage | None]] = []

    def __call__(self, pin: int, message: MsiMessage | None) -> None:
        self.calls.append((pin, message))


def write32(ioapic: IoApic, offset: int, value: int) -> None:
    ioapic.write(0, offset, memoryview(bytearray(value.to_bytes(4, "little"))))


def read32(ioapic: IoApic, offset: int) -> int:
    data = bytearray(4)
    ioapic.read(0, offset, memoryview(data))
    return int.from_bytes(data, "little")


def write_register(ioapic: IoApic, index: int, value: int) -> None:
    write32(ioapic, 0x00, index)
    write32(ioapic, 0x10, value)


def read_register(ioapic: IoApic, index: int) -> int:
    write32(ioapic, 0x00, index)
    return read32(ioapic, 0x10)


def test_identification_registers() -> None:
    ioapic = IoApic(Routes(), ioapic_id=3, num_pins=24)
    assert read_register(ioapic, 0) == 3 << 24
    assert read_register(ioapic, 1) == 23 << 16 | 0x20  # 24 entries, version 0x20
    assert read_register(ioapic, 2) == 3 << 24
    write_register(ioapic, 0, 0x0500_0000)
    assert read_register(ioapic, 0) == 5 << 24
    write32(ioapic, 0x00, 0x12)
    assert read32(ioapic, 0x00) == 0x12


def test_entries_start_masked_and_unrouted() -> None:
    routes = Routes()
    ioapic = IoApic(routes)
    for pin in range(24):
        assert read_register(ioapic, 0x10 + 2 * pin) == RTE_MASKED
        assert read_register(ioapic, 0x11 + 2 * pin) == 0
        assert ioapic.message(pin) is None
    assert routes.calls == []


def test_linux_style_programming_routes_the_pin() -> None:
    """Linux writes the high half (destination) first, then the low half with the vector."""
    routes = Routes()
    ioapic = IoApic(routes)
    write_register(ioapic, 0x10 + 2 * 4 + 1, 0x0100_0000)  # destination APIC 1
    assert routes.calls == []  # still masked
    write_register(ioapic, 0x10 + 2 * 4, 0x0000_0024)  # vector 0x24, fixed, edge, unmasked
    assert routes.calls == [(4, (0xFEE0_1000, 0x24))]
    assert ioapic.message(4) == (0xFEE0_1000, 0x24)
    # Rewriting the same value does not touch the routing table again.
    write_register(ioapic, 0x10 + 2 * 4, 0x0000_0024)
    assert len(routes.calls) == 1
    # Masking removes the route; unmasking brings it back.
    write_register(ioapic, 0x10 + 2 * 4, 0x0001_0024)
    assert routes.calls[-1] == (4, None)
    write_register(ioapic, 0x10 + 2 * 4, 0x0000_0024)
    assert routes.calls[-1] == (4, (0xFEE0_1000, 0x24))


def test_msi_translation() -> None:
    # Lowest priority, logical destination 0x0f, level-triggered, vector 0x41.
    entry = 0x0F << 56 | 1 << 15 | 1 << 11 | 1 << 8 | 0x41
    assert redirection_to_msi(entry) == (0xFEE0_F004, 0x41 | 1 << 8 | 1 << 14 | 1 << 15)
    # An extended destination ID (bits 8-14 of the APIC ID in entry bits 49-55).
    assert redirection_to_msi(0x7F << 49 | 0x30) == (0xFEE0_0FE0, 0x30)


def test_read_only_bits_cannot_be_set() -> None:
    ioapic = IoApic(Routes())
    write_register(ioapic, 0x10, 0xFFFF_FFFF)
    assert read_register(ioapic, 0x10) == 0xFFFF_FFFF & ~(1 << 12 | 1 << 14) & 0x1_FFFF


def test_registers_past_the_last_entry_are_ignored() -> None:
    routes = Routes()
    ioapic = IoApic(routes, num_pins=4)
    write_register(ioapic, 0x10 + 2 * 4, 0x30)
    assert read_register(ioapic, 0x10 + 2 * 4) == 0
    assert read_register(ioapic, 0x03) == 0
    assert routes.calls == []
    write32(ioapic, 0x40, 0x30)  # the EOI register
    assert read32(ioapic, 0x40) == 0


@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, layout.IOAPIC_SIZE - 1),
            st.sampled_from([1, 2, 4, 8]),
            st.integers(0, (1 << 64) - 1),
        ),
        max_size=60,
    )
)
def test_any_guest_access_is_safe_and_routes_stay_consistent(
    accesses: list[tuple[bool, int, int, int]],
) -> None:
    """Whatever the guest does, routes mirror the unmasked entries and pins stay in range."""
    routes = Routes()
    ioapic = IoApic(routes, num_pins=24)
    for is_write, offset, width, value in accesses:
        data = memoryview(bytearray(value.to_bytes(8, "little")[:width]))
        if is_write:
            ioapic.write(0, offset, data)
        else:
            ioapic.read(0, offset, data)
            assert len(data) == width
    current: dict[int, MsiMessage | None] = {}
    for pin, message in routes.calls:
        assert 0 <= pin < 24
        assert current.get(pin) != message  # only changes are reported
        current[pin] = message
    for pin in range(24):
        entry = ioapic.entries[pin]
        expected = None if entry & RTE_MASKED else redirection_to_msi(entry)
        assert ioapic.message(pin) == expected
        assert current.get(pin) == expected
        assert entry & (1 << 12 | 1 << 14) == 0
