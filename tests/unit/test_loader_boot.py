"""Tests for the boot configurators: cmdline, initramfs placement, memory map, zero page, PVH."""

from __future__ import annotations

import contextlib
import ctypes
import io
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nubis.arch.x86_64 import layout
from nubis.arch.x86_64.layout import GiB, MiB
from nubis.loader import (
    E820_RAM,
    E820_RESERVED,
    Cmdline,
    InitramfsLoadResult,
    LoaderError,
    MemoryMapEntry,
    configure_boot_params,
    configure_pvh,
    load_cmdline,
    load_initramfs,
    standard_memory_map,
)
from nubis.loader.bootproto import BOOT_PARAMS_SIZE, BootE820Entry, BootParams, SetupHeader
from nubis.loader.pvh import (
    PVH_MODLIST_START,
    HvmMemmapTableEntry,
    HvmModlistEntry,
    HvmStartInfo,
)
from nubis.memory import PAGE_SIZE, GuestMemory

RAM_SIZE = 64 * MiB


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """64 MiB of guest RAM from address 0."""
    with GuestMemory([(0, RAM_SIZE)]) as mem:
        yield mem


# Command line.


def test_cmdline_joins_parameters() -> None:
    cmdline = Cmdline(64)
    cmdline.insert_str("console=ttyS0 quiet")
    cmdline.insert("root", "/dev/vda")
    cmdline.insert_str("  ")
    assert str(cmdline) == "console=ttyS0 quiet root=/dev/vda"
    assert cmdline.as_bytes() == b"console=ttyS0 quiet root=/dev/vda\x00"
    assert len(cmdline) == 33


def test_cmdline_capacity_counts_the_nul() -> None:
    cmdline = Cmdline(8)
    cmdline.insert("ab", "cdef")  # 7 bytes + NUL
    with pytest.raises(LoaderError, match=r"would need 10 bytes .* more than the limit of 8"):
        cmdline.insert_str("x")
    assert cmdline.as_bytes() == b"ab=cdef\x00"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("a b", "c", "without spaces"),
        ("", "c", "non-empty"),
        ("a=b", "c", "without spaces or '='"),
        ("a", "b c", "contains spaces"),
        ("a\x00", "b", "NUL"),
        ("a", "\u00e9", "printable ASCII"),
    ],
)
def test_cmdline_rejects_bad_parameters(key: str, value: str, message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        Cmdline(100).insert(key, value)


def test_cmdline_rejects_zero_capacity_and_nul_text() -> None:
    with pytest.raises(LoaderError):
        Cmdline(0)
    with pytest.raises(LoaderError, match="NUL"):
        Cmdline(10).insert_str("a\x00b")


@settings(max_examples=200)
@given(parts=st.lists(st.text(max_size=12), max_size=8), capacity=st.integers(1, 40))
def test_cmdline_never_exceeds_capacity(parts: list[str], capacity: int) -> None:
    cmdline = Cmdline(capacity)
    for part in parts:
        with contextlib.suppress(LoaderError):
            cmdline.insert_str(part)
    data = cmdline.as_bytes()
    assert len(data) <= capacity
    assert data.endswith(b"\x00") and data.count(b"\x00") == 1


def test_load_cmdline_writes_nul_terminated(memory: GuestMemory) -> None:
    cmdline = Cmdline(32)
    cmdline.insert_str("panic=-1")
    load_cmdline(memory, cmdline)
    assert memory.read(layout.CMDLINE_START, 9) == b"panic=-1\x00"


# Initramfs placement.


def test_initramfs_goes_high_and_page_aligned(memory: GuestMemory) -> None:
    data = b"initramfs" * 1000
    result = load_initramfs(memory, io.BytesIO(data), kernel_end=4 * MiB)
    assert result == InitramfsLoadResult((RAM_SIZE - len(data)) & ~(PAGE_SIZE - 1), len(data))
    assert memory.read(result.addr, len(data)) == data


def test_initramfs_respects_initrd_addr_max(memory: GuestMemory) -> None:
    result = load_initramfs(
        memory, io.BytesIO(bytes(PAGE_SIZE)), kernel_end=4 * MiB, initrd_addr_max=16 * MiB - 1
    )
    assert result.addr == 16 * MiB - PAGE_SIZE


def test_initramfs_stays_below_the_hole() -> None:
    with GuestMemory(layout.ram_ranges(3 * GiB + 64 * MiB)) as mem:
        result = load_initramfs(
            mem, io.BytesIO(bytes(10)), kernel_end=4 * MiB, initrd_addr_max=0xFFFFFFFF
        )
    assert result.addr == layout.MEM_32BIT_RESERVED_START - PAGE_SIZE


def test_initramfs_that_does_not_fit(memory: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="does not fit between the kernel's end"):
        load_initramfs(memory, io.BytesIO(bytes(2 * MiB)), kernel_end=RAM_SIZE - MiB)
    with pytest.raises(LoaderError, match="empty"):
        load_initramfs(memory, io.BytesIO(b""), kernel_end=4 * MiB)


# Memory map.


def test_standard_memory_map_small_guest() -> None:
    assert standard_memory_map(layout.ram_ranges(512 * MiB)) == [
        MemoryMapEntry(0, 0x9FC00, E820_RAM),
        MemoryMapEntry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        MemoryMapEntry(0x100000, 512 * MiB - 0x100000, E820_RAM),
        MemoryMapEntry(0xE800_0000, 256 * MiB, E820_RESERVED),
    ]


def test_standard_memory_map_large_guest() -> None:
    entries = standard_memory_map(layout.ram_ranges(4 * GiB))
    assert entries[2] == MemoryMapEntry(0x100000, 0xC000_0000 - 0x100000, E820_RAM)
    assert entries[-1] == MemoryMapEntry(1 << 32, 1 * GiB, E820_RAM)
    # The ACPI tables are inside a reserved entry.
    assert any(
        e.type == E820_RESERVED and e.addr <= layout.RSDP_START < e.addr + e.size for e in entries
    )


def test_standard_memory_map_rejects_odd_ram() -> None:
    with pytest.raises(LoaderError, match="start at address 0"):
        standard_memory_map([(0x1000, 64 * MiB)])
    with pytest.raises(LoaderError, match="needs RAM above 0x100000"):
        standard_memory_map([(0, 512 * 1024)])
    with pytest.raises(LoaderError, match="below 4 GiB"):
        standard_memory_map([(0, 64 * MiB), (128 * MiB, MiB)])


# Zero page.


def test_boot_params_layout_is_pinned() -> None:
    assert ctypes.sizeof(BootParams) == BOOT_PARAMS_SIZE == 4096
    assert ctypes.sizeof(BootE820Entry) == 20
    assert BootParams.acpi_rsdp_addr.offset == 0x070
    assert BootParams.ext_ramdisk_image.offset == 0x0C0
    assert BootParams.ext_ramdisk_size.offset == 0x0C4
    assert BootParams.ext_cmd_line_ptr.offset == 0x0C8
    assert BootParams.e820_entries.offset == 0x1E8
    assert BootParams.hdr.offset == 0x1F1
    assert BootParams.e820_table.offset == 0x2D0
    assert BootParams.e820_table.size == 128 * 20


def _cmdline(text: str, capacity: int = 256) -> Cmdline:
    cmdline = Cmdline(capacity)
    cmdline.insert_str(text)
    return cmdline


def test_zero_page_for_an_elf_kernel(memory: GuestMemory) -> None:
    memory_map = standard_memory_map(layout.ram_ranges(RAM_SIZE))
    initramfs = InitramfsLoadResult(0x3000000, 0x12345)
    configure_boot_params(
        memory,
        memory_map=memory_map,
        cmdline=_cmdline("console=ttyS0"),
        initramfs=initramfs,
        rsdp_addr=layout.RSDP_START,
    )
    raw = memory.read(layout.ZERO_PAGE_START, 4096)
    u16 = lambda off: int.from_bytes(raw[off : off + 2], "little")  # noqa: E731
    u32 = lambda off: int.from_bytes(raw[off : off + 4], "little")  # noqa: E731
    assert u16(0x1FE) == 0xAA55
    assert raw[0x202:0x206] == b"HdrS"
    assert u16(0x206) == 0x020F
    assert raw[0x210] == 0xFF
    assert raw[0x211] & 0x01
    assert u32(0x228) == layout.CMDLINE_START
    assert u32(0x238) == len("console=ttyS0")
    assert u32(0x218) == 0x3000000
    assert u32(0x21C) == 0x12345
    assert int.from_bytes(raw[0x70:0x78], "little") == layout.RSDP_START
    assert raw[0x1E8] == len(memory_map)
    for index, (addr, size, kind) in enumerate(memory_map):
        entry = BootE820Entry.from_buffer_copy(raw, 0x2D0 + 20 * index)
        assert (entry.addr, entry.size, entry.type) == (addr, size, kind)


def test_zero_page_copies_a_bzimage_header(memory: GuestMemory) -> None:
    header = SetupHeader(
        setup_sects=27, header=0x53726448, version=0x020C, cmdline_size=15, code32_start=1 << 20
    )
    params = configure_boot_params(
        memory, memory_map=[(0, MiB, E820_RAM)], cmdline=_cmdline("a=b"), setup_header=header
    )
    assert params.hdr.setup_sects == 27
    assert params.hdr.version == 0x020C
    assert params.hdr.code32_start == 1 << 20
    assert params.hdr.type_of_loader == 0xFF
    assert params.hdr.cmdline_size == 15  # the kernel's own limit is kept
    assert params.hdr.ramdisk_image == 0
    assert header.type_of_loader == 0  # the caller's header is not modified
    with pytest.raises(LoaderError, match="longer than the 15 bytes this kernel accepts"):
        configure_boot_params(
            memory,
            memory_map=[(0, MiB, E820_RAM)],
            cmdline=_cmdline("x" * 16),
            setup_header=header,
        )


def test_zero_page_rejects_too_many_e820_entries(memory: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="129 entries"):
        configure_boot_params(
            memory,
            memory_map=[(i * PAGE_SIZE, PAGE_SIZE, 1) for i in range(129)],
            cmdline=Cmdline(1),
        )


# PVH start info.


def test_pvh_layouts_are_pinned() -> None:
    assert ctypes.sizeof(HvmStartInfo) == 56
    assert ctypes.sizeof(HvmModlistEntry) == 32
    assert ctypes.sizeof(HvmMemmapTableEntry) == 24
    assert HvmStartInfo.modlist_paddr.offset == 16
    assert HvmStartInfo.cmdline_paddr.offset == 24
    assert HvmStartInfo.rsdp_paddr.offset == 32
    assert HvmStartInfo.memmap_paddr.offset == 40
    assert HvmStartInfo.memmap_entries.offset == 48
    assert layout.PVH_INFO_START + 56 <= layout.PVH_MEMMAP_START
    assert PVH_MODLIST_START + 32 <= layout.ZERO_PAGE_START


def test_pvh_start_info(memory: GuestMemory) -> None:
    memory_map = standard_memory_map(layout.ram_ranges(RAM_SIZE))
    configure_pvh(
        memory,
        memory_map=memory_map,
        initramfs=InitramfsLoadResult(0x3000000, 0x4000),
        rsdp_addr=layout.RSDP_START,
    )
    info = memory.read_obj(layout.PVH_INFO_START, HvmStartInfo)
    assert memory.read_u32(layout.PVH_INFO_START) == 0x336EC578
    assert info.version == 1
    assert info.nr_modules == 1
    assert info.cmdline_paddr == layout.CMDLINE_START
    assert info.rsdp_paddr == layout.RSDP_START
    assert info.memmap_paddr == layout.PVH_MEMMAP_START
    assert info.memmap_entries == len(memory_map)
    module = memory.read_obj(info.modlist_paddr, HvmModlistEntry)
    assert (module.paddr, module.size) == (0x3000000, 0x4000)
    for index, (addr, size, kind) in enumerate(memory_map):
        entry = memory.read_obj(layout.PVH_MEMMAP_START + 24 * index, HvmMemmapTableEntry)
        assert (entry.addr, entry.size, entry.type, entry.reserved) == (addr, size, kind, 0)


def test_pvh_without_initramfs_and_too_big_a_map(memory: GuestMemory) -> None:
    info = configure_pvh(memory, memory_map=[(0, MiB, E820_RAM)])
    assert (info.nr_modules, info.modlist_paddr, info.rsdp_paddr) == (0, 0, 0)
    with pytest.raises(LoaderError, match="65 entries"):
        configure_pvh(memory, memory_map=[(0, PAGE_SIZE, 1)] * 65)
