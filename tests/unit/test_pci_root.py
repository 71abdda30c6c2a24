"""Tests for nubis.pci.root and nubis.pci.mapping: CF8/CFC, ECAM, slots, BAR placement and moves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nubis.arch.x86_64 import layout
from nubis.devices.bus import Bus
from nubis.pci.configuration import BarKind, BarReprogramming, PciBar, PciConfiguration
from nubis.pci.mapping import PciBarAllocator, PciMmioMapper
from nubis.pci.root import PciBus, PciConfigIo, PciConfigMmio, PciDevice

GiB = 1 << 30


class BarDevice:
    """A minimal PciDevice with one 32-bit and one 64-bit BAR that echoes its BAR offsets."""

    def __init__(self) -> None:
        self.config = PciConfiguration(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000)
        self.config.add_bar(0, 0x1000, BarKind.MEMORY32)
        self.config.add_bar(2, 0x4000, BarKind.MEMORY64)
        self.moves: list[tuple[int, int]] = []

    def read_config(self, offset: int, data: memoryview) -> None:
        self.config.read(offset, data)

    def write_config(self, offset: int, data: memoryview) -> BarReprogramming | None:
        return self.config.write(offset, data)

    def bars(self) -> list[PciBar]:
        return self.config.bars()

    def assign_bar(self, index: int, address: int) -> None:
        self.config.assign_bar(index, address)

    def move_bar(self, old_address: int, new_address: int) -> None:
        self.moves.append((old_address, new_address))
        self.config.move_bar(old_address, new_address)

    def read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = offset.to_bytes(8, "little")[: len(data)]

    def write(self, base: int, offset: int, data: memoryview) -> None:
        pass


def _device_check(device: PciDevice) -> None:
    """Static check that the test device satisfies the Protocol."""


_device_check(BarDevice())


def cf8_address(bus: int, slot: int, function: int, register: int, enable: bool = True) -> int:
    return (1 << 31 if enable else 0) | bus << 16 | slot << 11 | function << 8 | register


def io_read(io: PciConfigIo, address: int, port_offset: int, size: int) -> int:
    io.write(0xCF8, 0, memoryview(bytearray(address.to_bytes(4, "little"))))
    buf = bytearray(size)
    io.read(0xCF8, port_offset, memoryview(buf))
    return int.from_bytes(buf, "little")


def io_write(io: PciConfigIo, address: int, port_offset: int, value: int, size: int) -> None:
    io.write(0xCF8, 0, memoryview(bytearray(address.to_bytes(4, "little"))))
    io.write(0xCF8, port_offset, memoryview(bytearray(value.to_bytes(size, "little"))))


def ecam_offset(bus: int, slot: int, function: int, register: int) -> int:
    return bus << 20 | slot << 15 | function << 12 | register


def ecam_read(ecam: PciConfigMmio, offset: int, size: int) -> int:
    buf = bytearray(size)
    ecam.read(layout.PCI_MMCONFIG_START, offset, memoryview(buf))
    return int.from_bytes(buf, "little")


def test_host_bridge_ids_through_cf8() -> None:
    io = PciConfigIo(PciBus())
    assert io_read(io, cf8_address(0, 0, 0, 0), 4, 4) == 0xFFF0_8086
    assert io_read(io, cf8_address(0, 0, 0, 8), 4, 4) >> 8 == 0x060000
    assert io_read(io, cf8_address(0, 0, 0, 0), 4, 2) == 0x8086
    assert io_read(io, cf8_address(0, 0, 0, 0), 6, 2) == 0xFFF0
    assert io_read(io, cf8_address(0, 0, 0, 0), 5, 1) == 0x80
    assert io_read(io, cf8_address(0, 0, 0, 0), 7, 1) == 0xFF


def test_cf8_address_register_reads_back_without_reserved_bits() -> None:
    io = PciConfigIo(PciBus())
    address = cf8_address(0, 3, 0, 0x10) | 0x7F00_0003
    io.write(0xCF8, 0, memoryview(bytearray(address.to_bytes(4, "little"))))
    assert io.config_address == cf8_address(0, 3, 0, 0x10)
    buf = bytearray(4)
    io.read(0xCF8, 0, memoryview(buf))
    assert int.from_bytes(buf, "little") == io.config_address
    # Byte writes to 0xCF8-0xCFB (0xCF9 is a reset register on some chipsets) leave it alone.
    io.write(0xCF8, 1, memoryview(bytearray(b"\x06")))
    assert io.config_address == cf8_address(0, 3, 0, 0x10)


def test_cf8_without_enable_bit_reads_all_ones() -> None:
    io = PciConfigIo(PciBus())
    assert io_read(io, cf8_address(0, 0, 0, 0, enable=False), 4, 4) == 0xFFFF_FFFF


def test_absent_slots_functions_and_buses_read_all_ones() -> None:
    pci_bus = PciBus()
    io = PciConfigIo(pci_bus)
    ecam = PciConfigMmio(pci_bus)
    for bus, slot, function in ((0, 1, 0), (0, 0, 1), (1, 0, 0), (0, 31, 7)):
        assert io_read(io, cf8_address(bus, slot, function, 0), 4, 4) == 0xFFFF_FFFF
        assert ecam_read(ecam, ecam_offset(bus, slot, function, 0), 4) == 0xFFFF_FFFF


def test_ecam_reads_device_ids_and_extended_space() -> None:
    pci_bus = PciBus()
    device = BarDevice()
    slot = pci_bus.add_device(device)
    assert slot == 1
    ecam = PciConfigMmio(pci_bus)
    assert ecam_read(ecam, ecam_offset(0, slot, 0, 0), 4) == 0x5678_1234
    assert ecam_read(ecam, ecam_offset(0, slot, 0, 2), 2) == 0x5678
    assert ecam_read(ecam, ecam_offset(0, slot, 0, 0x100), 4) == 0
    assert ecam_read(ecam, ecam_offset(0, slot, 0, 1), 2) == 0xFFFF  # misaligned
    assert ecam_read(ecam, ecam_offset(0, slot, 0, 0), 8) == (1 << 64) - 1


def test_ecam_decode() -> None:
    assert PciConfigMmio.decode(ecam_offset(3, 17, 5, 0xABC)) == (3, 17, 5, 0xABC)


def test_slots_are_bounded_and_unique() -> None:
    pci_bus = PciBus()
    for expected in range(1, 32):
        assert pci_bus.add_device(BarDevice()) == expected
    with pytest.raises(ValueError, match="all 31 slots"):
        pci_bus.add_device(BarDevice())
    with pytest.raises(ValueError, match="already in use"):
        pci_bus.add_device(BarDevice(), 5)
    with pytest.raises(ValueError, match="between 1 and 31"):
        PciBus().add_device(BarDevice(), 0)
    pci_bus.remove_device(5)
    assert pci_bus.add_device(BarDevice()) == 5
    with pytest.raises(ValueError, match="holds no device"):
        PciBus().remove_device(4)


def test_bar_placement_in_both_windows() -> None:
    ram = 6 * GiB
    mmio = Bus("mmio")
    mapper = PciMmioMapper(mmio, PciBarAllocator.for_ram_size(ram))
    first, second = BarDevice(), BarDevice()
    bars = mapper.map_device(first) + mapper.map_device(second)
    mem64 = layout.mem_64bit_devices_start(ram)
    assert [(b.index, b.address) for b in bars] == [
        (0, layout.MEM_32BIT_DEVICES_START),
        (2, mem64),
        (0, layout.MEM_32BIT_DEVICES_START + 0x1000),
        (2, mem64 + 0x4000),
    ]
    assert first.config.bar(2).address == mem64
    found = mmio.find(mem64 + 0x10)
    assert found is not None and found.device is first
    buf = bytearray(4)
    assert mmio.read(mem64 + 0x4010, memoryview(buf))
    assert int.from_bytes(buf, "little") == 0x10
    mapper.unmap_device(first)
    assert mmio.find(mem64) is None


def test_guest_bar_move_goes_through_mapper_and_bus() -> None:
    mmio = Bus("mmio")
    mapper = PciMmioMapper(mmio, PciBarAllocator.for_ram_size(GiB))
    pci_bus = PciBus(mapper)
    device = BarDevice()
    slot = pci_bus.add_device(device)
    mapper.map_device(device)
    ecam = PciConfigMmio(pci_bus)
    old = device.config.bar(0).address
    new = old + 0x10_0000

    def write(register: int, value: int) -> None:
        ecam.write(
            0, ecam_offset(0, slot, 0, register), memoryview(bytearray(value.to_bytes(4, "little")))
        )

    write(0x10, 0xFFFF_FFFF)
    assert ecam_read(ecam, ecam_offset(0, slot, 0, 0x10), 4) == 0xFFFF_F000
    write(0x10, old)
    assert device.moves == []
    write(0x10, new)
    assert device.moves == [(old, new)]
    assert mmio.find(old) is None
    assert mmio.find(new) is not None
    assert device.config.bar(0).address == new


def test_refused_moves_leave_the_bar_in_place() -> None:
    mmio = Bus("mmio")
    mapper = PciMmioMapper(mmio, PciBarAllocator.for_ram_size(GiB))
    pci_bus = PciBus(mapper)
    first, second = BarDevice(), BarDevice()
    pci_bus.add_device(first)
    slot = pci_bus.add_device(second)
    mapper.map_device(first)
    mapper.map_device(second)
    io = PciConfigIo(pci_bus)
    old = second.config.bar(0).address
    # Onto the other device's BAR, into RAM, into the LAPIC: all refused.
    for target in (first.config.bar(0).address, 0x10_0000, layout.APIC_START):
        io_write(io, cf8_address(0, slot, 0, 0x10), 4, target, 4)
        assert second.moves == []
        assert second.config.bar(0).address == old
        found = mmio.find(old)
        assert found is not None and found.device is second
    # A later legal move starts from where the BAR really is.
    io_write(io, cf8_address(0, slot, 0, 0x10), 4, old + 0x2000, 4)
    assert second.moves == [(old, old + 0x2000)]


def test_bar_move_without_relocator_is_ignored() -> None:
    pci_bus = PciBus()
    device = BarDevice()
    slot = pci_bus.add_device(device)
    device.assign_bar(0, 0xC000_0000)
    io = PciConfigIo(pci_bus)
    io_write(io, cf8_address(0, slot, 0, 0x10), 4, 0xC001_0000, 4)
    assert device.moves == []


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["io", "ecam", "raw"]),
            st.booleans(),
            st.integers(0, 0xFFFF_FFFF),
            st.integers(-2, 12),
            st.binary(max_size=9),
        ),
        max_size=40,
    )
)
def test_fuzzed_config_accesses_never_raise(ops: list[tuple[str, bool, int, int, bytes]]) -> None:
    mmio = Bus("mmio")
    mapper = PciMmioMapper(mmio, PciBarAllocator.for_ram_size(GiB))
    pci_bus = PciBus(mapper)
    device = BarDevice()
    pci_bus.add_device(device)
    mapper.map_device(device)
    io = PciConfigIo(pci_bus)
    ecam = PciConfigMmio(pci_bus)
    for kind, is_write, address, port_offset, data in ops:
        view = memoryview(bytearray(data))
        # Aim most accesses at the host bridge and the device: slot 0-2, function 0-1.
        slot, function, register = address % 3, (address >> 2) % 2, (address >> 3) & 0xFFF
        if kind == "ecam":
            offset = ecam_offset(0, slot, function, register)
            if is_write:
                ecam.write(0, offset, view)
            else:
                ecam.read(0, offset, view)
            continue
        if kind == "io":
            target = cf8_address(0, slot, function, register & 0xFC)
            io.write(0xCF8, 0, memoryview(bytearray(target.to_bytes(4, "little"))))
        if is_write:
            io.write(0xCF8, port_offset, view)
        else:
            io.read(0xCF8, port_offset, view)
    # Every BAR decodes where the bus maps it, and the ids never change.
    for bar in device.bars():
        found = mmio.find(bar.address)
        assert found is not None and found.device is device
        assert found.base == bar.address and found.length == bar.size
    assert ecam_read(ecam, ecam_offset(0, 1, 0, 0), 4) == 0x5678_1234
    assert ecam_read(ecam, ecam_offset(0, 0, 0, 0), 4) == 0xFFF0_8086


def test_64bit_bar_moved_half_by_half_ends_where_the_guest_wanted() -> None:
    mmio = Bus("mmio")
    mapper = PciMmioMapper(mmio, PciBarAllocator.for_ram_size(GiB))
    pci_bus = PciBus(mapper)
    device = BarDevice()
    slot = pci_bus.add_device(device)
    mapper.map_device(device)
    io = PciConfigIo(pci_bus)
    old = device.config.bar(2).address
    new = old + (1 << 32) + 0x8000
    # Lower half first (Linux's order); the intermediate address is a legal place too.
    io_write(io, cf8_address(0, slot, 0, 0x18), 4, (new & 0xFFFF_FFFF) | 0x4, 4)
    io_write(io, cf8_address(0, slot, 0, 0x1C), 4, new >> 32, 4)
    assert device.config.bar(2).address == new
    assert [m[1] for m in device.moves] == [(old & ~0xFFFF_FFFF) | (new & 0xFFFF_FFFF), new]
    found = mmio.find(new)
    assert found is not None and found.device is device and found.length == 0x4000
    assert mmio.find(old) is None
