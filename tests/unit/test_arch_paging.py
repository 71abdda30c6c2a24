"""Identity-mapped boot page tables (Intel SDM Vol. 3A §4.5)."""

from __future__ import annotations

import struct

import pytest

from nubis.arch.x86_64 import paging
from nubis.arch.x86_64.layout import PDE_START, PDPTE_START, PML4_START, GiB, MiB


@pytest.fixture(scope="module")
def tables() -> dict[int, bytes]:
    return dict(paging.identity_map_tables())


def test_table_addresses_and_sizes(tables: dict[int, bytes]) -> None:
    expected = {PML4_START, PDPTE_START} | {PDE_START + i * 0x1000 for i in range(4)}
    assert set(tables) == expected
    assert all(len(t) == 4096 for t in tables.values())


def test_top_levels_point_down(tables: dict[int, bytes]) -> None:
    pml4 = struct.unpack("<512Q", tables[PML4_START])
    assert pml4[0] == PDPTE_START | 0x3
    assert not any(pml4[1:])
    pdpt = struct.unpack("<512Q", tables[PDPTE_START])
    assert pdpt[:4] == tuple(PDE_START + i * 0x1000 | 0x3 for i in range(4))
    assert not any(pdpt[4:])


@pytest.mark.parametrize(
    "address",
    [0, 0x7000, 0x8FF0, 0x10_0000, 0x1F_FFFF, 0x20_0000, GiB + 0x1234, 3 * GiB + 5, 4 * GiB - 1],
)
def test_identity_within_4_gib(tables: dict[int, bytes], address: int) -> None:
    assert paging.translate(tables, PML4_START, address) == address


def test_nothing_mapped_past_4_gib(tables: dict[int, bytes]) -> None:
    assert paging.translate(tables, PML4_START, 4 * GiB) is None
    assert paging.translate(tables, PML4_START, 1 << 39) is None


def test_every_pde_is_a_writable_2_mib_page(tables: dict[int, bytes]) -> None:
    for i in range(4):
        entries = struct.unpack("<512Q", tables[PDE_START + i * 0x1000])
        for j, entry in enumerate(entries):
            assert entry == (i * 512 + j) * 2 * MiB | 0x83
