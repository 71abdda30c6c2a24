"""Boot register state for the Linux 64-bit boot protocol and PVH."""

from __future__ import annotations

import struct

import pytest

from nubis.arch.x86_64 import gdt, paging, regs
from nubis.arch.x86_64.layout import (
    BOOT_GDT_START,
    BOOT_IDT_START,
    BOOT_STACK_POINTER,
    PDE_START,
    PML4_START,
    PVH_INFO_START,
    ZERO_PAGE_START,
)
from nubis.arch.x86_64.regs import BootEntry, BootProtocol
from nubis.kvm import bindings


def reset_sregs() -> bindings.kvm_sregs:
    """Roughly what KVM_GET_SREGS reports for a fresh vCPU."""
    s = bindings.kvm_sregs()
    s.cr0 = 0x6000_0010
    s.apic_base = 0xFEE0_0900
    s.cr8 = 0
    s.ldt.limit = 0xFFFF
    s.ldt.type = 2
    s.ldt.present = 1
    return s


def test_linux64_sregs() -> None:
    s = reset_sregs()
    regs.apply_boot_sregs(s, BootEntry.linux64(0x100_0200))
    assert s.cr0 == 0x8000_0011  # PG | ET | PE
    assert s.cr3 == PML4_START
    assert s.cr4 == 0x20  # PAE
    assert s.efer & 0x500 == 0x500  # LME | LMA
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.type, s.cs.s, s.cs.present) == (8, 1, 0, 11, 1, 1)
    assert (s.cs.base, s.cs.limit, s.cs.g) == (0, 0xFFFF_FFFF, 1)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        assert (seg.selector, seg.type, seg.limit, seg.db, seg.present) == (
            0x10,
            3,
            0xFFFF_FFFF,
            1,
            1,
        )
    assert (s.tr.selector, s.tr.type, s.tr.s, s.tr.present) == (0x18, 11, 0, 1)
    assert (s.gdt.base, s.gdt.limit) == (BOOT_GDT_START, 31)
    assert (s.idt.base, s.idt.limit) == (BOOT_IDT_START, 7)
    assert s.apic_base == 0xFEE0_0900  # untouched
    assert (s.ldt.limit, s.ldt.type) == (0xFFFF, 2)


def test_pvh_sregs() -> None:
    s = reset_sregs()
    s.efer = 0x500  # even if something had set long mode before
    s.cr4 = 0x20
    regs.apply_boot_sregs(s, BootEntry.pvh(0x100_0000))
    assert s.cr0 == 0x11  # PE | ET, paging off
    assert (s.cr3, s.cr4, s.efer & 0x500) == (0, 0, 0)
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.g, s.cs.limit, s.cs.type) == (
        8,
        0,
        1,
        1,
        0xFFFF_FFFF,
        11,
    )
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        assert (seg.selector, seg.type, seg.limit, seg.db, seg.g) == (0x10, 3, 0xFFFF_FFFF, 1, 1)
    assert (s.tr.selector, s.tr.type, s.tr.limit, s.tr.present) == (0x18, 11, 0x67, 1)


def test_linux64_regs() -> None:
    r = regs.boot_regs(BootEntry.linux64(0x100_0200))
    assert (r.rip, r.rsi, r.rsp, r.rbp, r.rflags) == (
        0x100_0200, ZERO_PAGE_START, BOOT_STACK_POINTER, BOOT_STACK_POINTER, 2,
    )  # fmt: skip
    assert r.rbx == 0


def test_pvh_regs() -> None:
    r = regs.boot_regs(BootEntry.pvh(0x100_0000))
    assert (r.rip, r.rbx, r.rflags, r.rsi) == (0x100_0000, PVH_INFO_START, 2, 0)


def test_boot_entry_constructors() -> None:
    assert BootEntry.linux64(5) == BootEntry(BootProtocol.LINUX64, 5, ZERO_PAGE_START)
    assert BootEntry.pvh(5, 0x1234) == BootEntry(BootProtocol.PVH, 5, 0x1234)


class FakeMemory:
    def __init__(self) -> None:
        self.writes: dict[int, bytes] = {}

    def write(self, addr: int, data: bytes) -> None:
        self.writes[addr] = bytes(data)


@pytest.mark.parametrize("protocol", list(BootProtocol))
def test_write_boot_tables(protocol: BootProtocol) -> None:
    boot = BootEntry(protocol, 0x100_0000, 0)
    mem = FakeMemory()
    regs.write_boot_tables(mem, boot)
    assert mem.writes[BOOT_GDT_START] == boot.gdt.to_bytes()
    assert mem.writes[BOOT_IDT_START] == bytes(8)
    if protocol is BootProtocol.LINUX64:
        assert dict(paging.identity_map_tables()).items() <= mem.writes.items()
        code = struct.unpack_from("<Q", mem.writes[BOOT_GDT_START], 8)[0]
        assert code == gdt.encode_descriptor(gdt.FLAGS_CODE64, 0, 0xFFFFF)
    else:
        assert PML4_START not in mem.writes and PDE_START not in mem.writes


class FakeVcpu:
    def __init__(self) -> None:
        self.sregs = reset_sregs()
        self.regs: bindings.kvm_regs | None = None

    def get_sregs(self) -> bindings.kvm_sregs:
        return self.sregs

    def set_sregs(self, sregs: bindings.kvm_sregs) -> None:
        self.sregs = sregs

    def set_regs(self, r: bindings.kvm_regs) -> None:
        self.regs = r


def test_setup_functions_go_through_the_vcpu() -> None:
    vcpu = FakeVcpu()
    boot = BootEntry.linux64(0x200_0000)
    regs.setup_sregs(vcpu, boot)
    regs.setup_regs(vcpu, boot)
    assert vcpu.sregs.cr3 == PML4_START
    assert vcpu.regs is not None and vcpu.regs.rip == 0x200_0000
