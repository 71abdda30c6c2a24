"""Tests for nubis.allocator: address ranges with alignment and policies, and ids."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from nubis.allocator import (
    AddressAllocator,
    AllocatorError,
    AllocPolicy,
    ExactMatch,
    IdAllocator,
)
from nubis.arch.x86_64.layout import MEM_32BIT_DEVICES_SIZE, MEM_32BIT_DEVICES_START


def test_first_match_takes_the_lowest_aligned_address() -> None:
    alloc = AddressAllocator(0x1001, 0x10000)
    assert alloc.allocate(0x100, 0x1000) == 0x2000
    assert alloc.allocate(0x10) == 0x1001
    assert alloc.allocate(0x10, 0x10) == 0x1020


def test_last_match_takes_the_highest_aligned_address() -> None:
    alloc = AddressAllocator(0x1000, 0x10000)  # ends at 0x11000
    assert alloc.allocate(0x100, 0x1000, AllocPolicy.LAST_MATCH) == 0x10000
    assert alloc.allocate(0x100, 0x100, AllocPolicy.LAST_MATCH) == 0x10F00
    assert alloc.allocate(0x3000, 0x4000, AllocPolicy.LAST_MATCH) == 0xC000


def test_exact_match() -> None:
    alloc = AddressAllocator(0, 0x10000)
    assert alloc.allocate(0x1000, 0x1000, ExactMatch(0x4000)) == 0x4000
    with pytest.raises(AllocatorError, match=r"\[0x4800, 0x5800\): it is not entirely free"):
        alloc.allocate(0x1000, 1, ExactMatch(0x4800))
    with pytest.raises(AllocatorError, match="not aligned to 0x1000"):
        alloc.allocate(0x1000, 0x1000, ExactMatch(0x6800))
    with pytest.raises(AllocatorError, match="not entirely free"):
        alloc.allocate(0x1000, 1, ExactMatch(0xF800))  # runs past the end
    with pytest.raises(AllocatorError, match="not entirely free"):
        alloc.allocate(0x10, 1, ExactMatch(-0x10))


def test_pci_bar_in_the_32bit_window() -> None:
    alloc = AddressAllocator(MEM_32BIT_DEVICES_START, MEM_32BIT_DEVICES_SIZE)
    bar = alloc.allocate(1 << 20, 1 << 20)
    assert bar == MEM_32BIT_DEVICES_START
    top = alloc.allocate(1 << 24, 1 << 24, AllocPolicy.LAST_MATCH)
    assert top + (1 << 24) == MEM_32BIT_DEVICES_START + MEM_32BIT_DEVICES_SIZE


def test_exhaustion_is_reported() -> None:
    alloc = AddressAllocator(0, 0x100)
    alloc.allocate(0x80)
    with pytest.raises(AllocatorError, match=r"0x81 bytes aligned to 0x1 in \[0x0, 0x100\)"):
        alloc.allocate(0x81)
    with pytest.raises(AllocatorError, match="no free range fits"):
        alloc.allocate(0x80, 0x100, AllocPolicy.LAST_MATCH)


@pytest.mark.parametrize("alignment", [0, -1, 3, 0x1800])
def test_bad_alignment_is_refused(alignment: int) -> None:
    with pytest.raises(AllocatorError, match="power of two"):
        AddressAllocator(0, 0x10000).allocate(0x10, alignment)


@pytest.mark.parametrize("size", [0, -1])
def test_bad_size_is_refused(size: int) -> None:
    with pytest.raises(AllocatorError, match="must be positive"):
        AddressAllocator(0, 0x10000).allocate(size)


@pytest.mark.parametrize(("base", "size"), [(0, 0), (-1, 10), ((1 << 64) - 1, 2)])
def test_bad_allocator_range_is_refused(base: int, size: int) -> None:
    with pytest.raises(AllocatorError):
        AddressAllocator(base, size)


def test_double_free_and_unknown_free() -> None:
    alloc = AddressAllocator(0, 0x1000)
    address = alloc.allocate(0x10)
    alloc.free(address)
    with pytest.raises(AllocatorError, match="cannot free 0x0: no allocation starts there"):
        alloc.free(address)
    address = alloc.allocate(0x10)
    with pytest.raises(AllocatorError):
        alloc.free(address + 4)


def test_freeing_merges_neighbours() -> None:
    alloc = AddressAllocator(0, 0x1000)
    a = alloc.allocate(0x100)
    b = alloc.allocate(0x100)
    c = alloc.allocate(0x100)
    alloc.free(a)
    alloc.free(c)
    assert alloc.free_ranges() == [(0, 0x100), (0x200, 0x1000)]
    alloc.free(b)
    assert alloc.free_ranges() == [(0, 0x1000)]
    assert alloc.allocations() == {}
    assert alloc.allocate(0x1000) == 0


def test_id_allocator_hands_out_lowest_first() -> None:
    ids = IdAllocator(24, 27)
    assert [ids.allocate() for _ in range(3)] == [24, 25, 26]
    ids.free(25)
    ids.free(24)
    assert ids.allocate() == 24
    assert ids.allocate() == 25
    assert ids.allocate() == 27
    with pytest.raises(AllocatorError, match=r"all ids in \[24, 27\] are in use"):
        ids.allocate()


def test_id_allocator_exact() -> None:
    ids = IdAllocator(0, 10)
    assert ids.allocate_exact(2) == 2
    assert [ids.allocate() for _ in range(3)] == [0, 1, 3]
    with pytest.raises(AllocatorError, match="already in use"):
        ids.allocate_exact(3)
    with pytest.raises(AllocatorError, match=r"outside \[0, 10\]"):
        ids.allocate_exact(11)
    ids.allocate_exact(8)
    ids.free(8)  # freed ahead of the counter: the counter reaches it in order
    assert [ids.allocate() for _ in range(5)] == [4, 5, 6, 7, 8]
    ids.free(1)
    ids.allocate_exact(1)
    assert ids.allocate() == 9


def test_id_allocator_errors() -> None:
    with pytest.raises(AllocatorError, match="empty"):
        IdAllocator(5, 4)
    ids = IdAllocator(0, 1)
    with pytest.raises(AllocatorError, match="cannot free id 0: it is not allocated"):
        ids.free(0)
    ids.allocate()
    ids.free(0)
    with pytest.raises(AllocatorError):
        ids.free(0)
    assert not ids.is_allocated(0)


# --- property tests ---------------------------------------------------------------------

WINDOW_BASE = 0x1000
WINDOW_SIZE = 0x10000


class AddressMachine(RuleBasedStateMachine):
    """Random allocations and frees; the live set is checked after every step."""

    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.alloc = AddressAllocator(WINDOW_BASE, WINDOW_SIZE)
        self.model: dict[int, tuple[int, int]] = {}

    def _fits_somewhere(self, size: int, alignment: int) -> bool:
        busy = sorted((a, a + s) for a, (s, _) in self.model.items())
        candidate = -(-WINDOW_BASE // alignment) * alignment
        while candidate + size <= WINDOW_BASE + WINDOW_SIZE:
            if all(end <= candidate or candidate + size <= start for start, end in busy):
                return True
            candidate += alignment
        return False

    @rule(
        target=live,
        size=st.integers(1, 0x4000),
        shift=st.integers(0, 14),
        policy=st.sampled_from([AllocPolicy.FIRST_MATCH, AllocPolicy.LAST_MATCH]),
    )
    def allocate(self, size: int, shift: int, policy: AllocPolicy) -> int:
        alignment = 1 << shift
        fits = self._fits_somewhere(size, alignment)
        try:
            address = self.alloc.allocate(size, alignment, policy)
        except AllocatorError:
            assert not fits
            return -1
        assert fits
        assert address % alignment == 0
        assert address >= WINDOW_BASE and address + size <= WINDOW_BASE + WINDOW_SIZE
        self.model[address] = (size, alignment)
        return address

    @rule(target=live, address=st.integers(WINDOW_BASE - 16, WINDOW_BASE + WINDOW_SIZE))
    def allocate_exact(self, address: int) -> int:
        size = 0x100
        free = address >= WINDOW_BASE and address + size <= WINDOW_BASE + WINDOW_SIZE
        free = free and all(
            a + s <= address or address + size <= a for a, (s, _) in self.model.items()
        )
        try:
            got = self.alloc.allocate(size, 1, ExactMatch(address))
        except AllocatorError:
            assert not free
            return -1
        assert free and got == address
        self.model[address] = (size, 1)
        return address

    @rule(address=consumes(live))
    def free(self, address: int) -> None:
        if address in self.model:
            self.alloc.free(address)
            del self.model[address]
        else:
            with pytest.raises(AllocatorError):
                self.alloc.free(address)

    @invariant()
    def consistent(self) -> None:
        live = sorted((a, a + s) for a, (s, _) in self.model.items())
        for (_, end), (start, _) in itertools.pairwise(live):
            assert end <= start
        assert self.alloc.allocations() == {a: s for a, (s, _) in self.model.items()}
        free = self.alloc.free_ranges()
        # free space and allocations tile the window exactly
        pieces = sorted(free + live)
        assert pieces[0][0] == WINDOW_BASE and pieces[-1][1] == WINDOW_BASE + WINDOW_SIZE
        for (_, end), (start, _) in itertools.pairwise(pieces):
            assert end == start
        for (_, end), (start, _) in itertools.pairwise(free):
            assert end < start  # adjacent free ranges are always merged


AddressMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_address_allocator_state_machine = AddressMachine.TestCase


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.one_of(st.none(), st.integers(0, 15)), max_size=60))
def test_id_allocator_always_returns_the_lowest_free(ops: list[int | None]) -> None:
    ids = IdAllocator(0, 15)
    used: set[int] = set()
    for op in ops:
        if op is None:
            free = [i for i in range(16) if i not in used]
            if free:
                got = ids.allocate()
                assert got == free[0]
                used.add(got)
            else:
                with pytest.raises(AllocatorError):
                    ids.allocate()
        elif op in used:
            ids.free(op)
            used.remove(op)
        else:
            ids.allocate_exact(op)
            used.add(op)
