"""Tests for nubis.memory: region setup, bounds checks, typed access, property tests."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nubis.arch.x86_64.layout import FIRST_ADDR_PAST_32BITS, MEM_32BIT_RESERVED_START, MiB
from nubis.memory import PAGE_SIZE, GuestAddress, GuestMemory, GuestMemoryError
from nubis.memory.guest import HUGE_PAGE_SIZE


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """Two regions with a gap, like RAM below and above the 32-bit hole."""
    mem = GuestMemory([(0x10000, 0x4000), (0x0, 0x8000)])
    yield mem
    mem.close()


def test_regions_are_sorted_and_sized(memory: GuestMemory) -> None:
    assert [(r.start, r.size, r.end) for r in memory.regions] == [
        (0, 0x8000, 0x8000),
        (0x10000, 0x4000, 0x14000),
    ]
    assert memory.total_size == 0xC000
    assert all(r.fd is None for r in memory.regions)


def test_host_address_is_the_mapping(memory: GuestMemory) -> None:
    region = memory.regions[1]
    memory.write(0x10010, b"nubis")
    assert ctypes.string_at(region.host_address + 0x10, 5) == b"nubis"
    assert memory.host_address(0x10010, 5) == region.host_address + 0x10
    assert memory.host_address(0x7FFF, 1) == memory.regions[0].host_address + 0x7FFF


def _vma_flags(address: int) -> list[str]:
    """The VmFlags smaps(5) gives the mapping of this process that holds ``address``."""
    with open("/proc/self/smaps", encoding="ascii") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_private_ram_with_thp_is_huge_page_aligned_and_advised() -> None:
    # Host and guest addresses agree modulo 2 MiB, so KVM can map the host's huge pages as
    # 2 MiB guest pages; the kernel is asked for huge pages on exactly the guest's range.
    huge = HUGE_PAGE_SIZE
    with GuestMemory([(0, 64 * MiB), (FIRST_ADDR_PAST_32BITS, 3 * MiB)], thp=True) as mem:
        for region in mem.regions:
            assert region.host_address % huge == region.start % huge == 0
            assert len(region.view) == region.size
            assert "hg" in _vma_flags(region.host_address)
            assert "hg" in _vma_flags(region.host_address + region.size - 1)
        last = FIRST_ADDR_PAST_32BITS + 3 * MiB - 4
        mem.write_u32(last, 0xDEADBEEF)
        assert ctypes.string_at(mem.host_address(last, 4), 4) == bytes.fromhex("efbeadde")
        assert mem.read(last, 4) == bytes.fromhex("efbeadde")
        assert mem.read_u32(last) == 0xDEADBEEF
        with pytest.raises(GuestMemoryError):
            mem.read(last + 4, 1)
    with GuestMemory([(0, 64 * MiB)]) as plain:
        assert "hg" not in _vma_flags(plain.regions[0].host_address)


def test_shared_memory_uses_memfd() -> None:
    with GuestMemory([(0, 2 * PAGE_SIZE)], shared=True) as mem:
        region = mem.regions[0]
        assert region.fd is not None
        assert os.get_inheritable(region.fd) is False
        mem.write(0x1000, b"through the fd")
        assert os.pread(region.fd, 14, 0x1000) == b"through the fd"
        fd = region.fd
    with pytest.raises(OSError):
        os.fstat(fd)


def test_guest_address_is_an_int() -> None:
    assert GuestAddress(0x1000) + 1 == 0x1001


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ([], "at least one range"),
        ([(0, 0)], "non-positive size"),
        ([(-PAGE_SIZE, PAGE_SIZE)], "outside the 64-bit"),
        ([((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE)], "outside the 64-bit"),
        ([(0x100, PAGE_SIZE)], "not aligned"),
        ([(0, PAGE_SIZE + 1)], "not aligned"),
        ([(0, 2 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)], "overlaps \\[0x0, 0x2000\\)"),
    ],
)
def test_bad_ranges_are_refused(ranges: list[tuple[int, int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GuestMemory(ranges)


def test_slice_is_zero_copy_and_writable(memory: GuestMemory) -> None:
    view = memory.slice(0x100, 4)
    view[:] = b"abcd"
    assert memory.read(0x100, 4) == b"abcd"
    memory.write(0x102, b"XY")
    assert bytes(view) == b"abXY"
    assert not view.readonly
    view.release()


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (-1, 1),
        (0, -1),
        (0x7FFF, 2),  # straddles the end of the first region
        (0x8000, 1),  # in the gap
        (0xFFFF, 2),  # starts in the gap, ends in the second region
        (0x14000, 1),  # just past the last region
        (0x0, 0xC001),
        ((1 << 64) - 1, 2),
        (1 << 80, 1),
        (0x10000, 1 << 70),
    ],
)
def test_out_of_bounds_accesses_raise(memory: GuestMemory, addr: int, length: int) -> None:
    assert not memory.contains(addr, length)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        memory.slice(addr, length)
    with pytest.raises(GuestMemoryError):
        memory.read(addr, length)
    with pytest.raises(GuestMemoryError):
        memory.host_address(addr, length)
    if length >= 0 and length < 1 << 20:
        with pytest.raises(GuestMemoryError):
            memory.write(addr, bytes(length))


def test_error_names_the_range(memory: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match=r"\[0x7fff, 0x8001\)") as info:
        memory.read_u16(0x7FFF)
    assert info.value.address == 0x7FFF
    assert info.value.length == 2
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["u8", "u16", "u32", "u64"])
def test_typed_access_at_the_end_of_a_region(memory: GuestMemory, name: str) -> None:
    size = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}[name]
    write = getattr(memory, f"write_{name}")
    read = getattr(memory, f"read_{name}")
    write(0x8000 - size, 0x5A)
    assert read(0x8000 - size) == 0x5A
    with pytest.raises(GuestMemoryError):
        read(0x8000 - size + 1)
    with pytest.raises(GuestMemoryError):
        write(0x8000 - size + 1, 0)


def test_typed_access_is_little_endian(memory: GuestMemory) -> None:
    memory.write_u64(0x10, 0x0102030405060708)
    assert memory.read(0x10, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert memory.read_u32(0x10) == 0x05060708
    assert memory.read_u16(0x14) == 0x0304
    assert memory.read_u8(0x17) == 0x01
    memory.write_u16(0x20, 0xBEEF)
    memory.write_u32(0x22, 0xDEADBEEF)
    memory.write_u8(0x26, 0x7F)
    assert memory.read(0x20, 7) == bytes.fromhex("efbeefbeadde7f")


class _Pair(ctypes.Structure):
    _fields_ = (("a", ctypes.c_uint32), ("b", ctypes.c_uint16))


def test_read_and_write_ctypes_structures(memory: GuestMemory) -> None:
    memory.write_obj(0x10000, _Pair(a=0x11223344, b=0x5566))
    assert memory.read(0x10000, 6) == bytes.fromhex("4433221166 55".replace(" ", ""))
    pair = memory.read_obj(0x10000, _Pair)
    assert (pair.a, pair.b) == (0x11223344, 0x5566)
    with pytest.raises(GuestMemoryError):
        memory.read_obj(0x14000 - 4, _Pair)


def test_write_accepts_memoryview_and_bytearray(memory: GuestMemory) -> None:
    memory.write(0x40, memoryview(b"view"))
    memory.write(0x44, bytearray(b"array"))
    assert memory.read(0x40, 9) == b"viewarray"


def test_find_region(memory: GuestMemory) -> None:
    assert memory.find_region(0x7FFF) is memory.regions[0]
    assert memory.find_region(0x8000) is None
    assert memory.find_region(0x13FFF) is memory.regions[1]
    assert memory.find_region(-1) is None


def test_ram_ranges_across_the_32bit_hole() -> None:
    # Only the address map matters here: the ranges are mapped lazily with MAP_NORESERVE.
    ranges = [(0, MEM_32BIT_RESERVED_START), (FIRST_ADDR_PAST_32BITS, 16 * MiB)]
    with GuestMemory(ranges) as mem:
        mem.write_u32(MEM_32BIT_RESERVED_START - 4, 1)
        mem.write_u32(FIRST_ADDR_PAST_32BITS, 2)
        with pytest.raises(GuestMemoryError):
            mem.read(MEM_32BIT_RESERVED_START - 2, 4)
        with pytest.raises(GuestMemoryError):
            mem.read_u8(MEM_32BIT_RESERVED_START)
        assert mem.total_size == MEM_32BIT_RESERVED_START + 16 * MiB


def test_close_with_outstanding_view_does_not_crash() -> None:
    mem = GuestMemory([(0, PAGE_SIZE)])
    view = mem.slice(0, 16)
    mem.close()
    view[0] = 1  # still mapped while the view lives
    view.release()


def test_private_mapping_is_anonymous() -> None:
    with GuestMemory([(0, PAGE_SIZE)]) as mem:
        assert isinstance(mem.regions[0].mmap, mmap.mmap)
        assert mem.read(0, PAGE_SIZE) == bytes(PAGE_SIZE)


# --- property tests ---------------------------------------------------------------------

_PAGES = st.integers(min_value=1, max_value=4)


@st.composite
def _layouts(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Disjoint page-aligned ranges with random gaps, shuffled."""
    count = draw(st.integers(min_value=1, max_value=4))
    ranges = []
    cursor = draw(st.integers(min_value=0, max_value=8)) * PAGE_SIZE
    for _ in range(count):
        size = draw(_PAGES) * PAGE_SIZE
        ranges.append((cursor, size))
        cursor += size + draw(st.integers(min_value=0, max_value=3)) * PAGE_SIZE
    return draw(st.permutations(ranges))


def _inside(ranges: list[tuple[int, int]], addr: int, length: int) -> bool:
    return length >= 0 and any(s <= addr and addr + length <= s + n for s, n in ranges)


@settings(max_examples=150, deadline=None)
@given(
    layout=_layouts(),
    addr=st.one_of(
        st.integers(min_value=-PAGE_SIZE, max_value=20 * PAGE_SIZE),
        st.integers(min_value=-(1 << 70), max_value=1 << 70),
    ),
    length=st.one_of(
        st.integers(min_value=-8, max_value=2 * PAGE_SIZE),
        st.integers(min_value=-(1 << 70), max_value=1 << 70),
    ),
)
@example(layout=[(0, 4096), (4096, 4096), (20480, 16384)], addr=36864, length=0)
@example(layout=[(0, 4096), (4096, 4096)], addr=4096, length=0)
def test_accesses_never_escape(layout: list[tuple[int, int]], addr: int, length: int) -> None:
    with GuestMemory(layout) as mem:
        expected = _inside(layout, addr, length)
        assert mem.contains(addr, length) is expected
        if expected:
            view = mem.slice(addr, length)
            assert len(view) == length
            # An empty access may sit at a region's end (no RAM at addr itself), or at the
            # seam of two adjacent regions; it then belongs to either, so compare with all.
            holders = {
                r.host_address + addr - r.start
                for r in mem.regions
                if r.start <= addr and addr + length <= r.end
            }
            assert mem.host_address(addr, length) in holders
            if length:
                region = mem.find_region(addr)
                assert region is not None
                assert mem.host_address(addr, length) == region.host_address + addr - region.start
            view.release()
        else:
            with pytest.raises(GuestMemoryError):
                mem.slice(addr, length)
            with pytest.raises(GuestMemoryError):
                mem.read(addr, length)
            with pytest.raises(GuestMemoryError):
                mem.host_address(addr, length)


@settings(max_examples=100, deadline=None)
@given(layout=_layouts(), data=st.data())
def test_reads_see_writes(layout: list[tuple[int, int]], data: st.DataObject) -> None:
    with GuestMemory(layout) as mem:
        shadow: dict[int, int] = {}
        for _ in range(data.draw(st.integers(min_value=1, max_value=10))):
            start, size = data.draw(st.sampled_from(layout))
            addr = data.draw(st.integers(min_value=start, max_value=start + size - 1))
            payload = data.draw(st.binary(min_size=0, max_size=start + size - addr))
            mem.write(addr, payload)
            for i, byte in enumerate(payload):
                shadow[addr + i] = byte
        for addr, byte in shadow.items():
            assert mem.read_u8(addr) == byte
