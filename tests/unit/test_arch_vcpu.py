"""configure_vcpu over fake KVM objects: what is applied, in which order, to BSP and APs."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable, Mapping, Sequence

import pytest

from nubis.arch.x86_64 import cpuid, lapic
from nubis.arch.x86_64.layout import BOOT_GDT_START, PML4_START, ZERO_PAGE_START
from nubis.arch.x86_64.regs import BootEntry
from nubis.arch.x86_64.vcpu import CpuPolicyBase, configure_vcpu, configure_vcpus
from nubis.kvm import bindings
from nubis.kvm.bindings import Cap

INTEL = b"GenuineIntel"


class FakeKvm:
    def __init__(self, tsc_deadline: bool = True) -> None:
        self.calls = 0
        self.tsc_deadline = tsc_deadline

    def get_supported_cpuid(self) -> list[bindings.kvm_cpuid_entry2]:
        self.calls += 1
        ebx, edx, ecx = (int.from_bytes(INTEL[i : i + 4], "little") for i in (0, 4, 8))
        return cpuid.to_kvm(
            [
                cpuid.CpuidEntry(0, 0, 0, 0xD, ebx, ecx, edx),
                cpuid.CpuidEntry(1, 0, 0, 0x906EA, 0x800, 0, cpuid.EDX_MTRR),
                cpuid.CpuidEntry(0x4000_0000, 0, 0, 0x4000_0001, 0, 0, 0),
            ]
        )

    def get_msr_index_list(self) -> list[int]:
        return [0x10, 0x174, 0xC000_0082]  # like KVM: no MTRR MSRs listed

    def check_extension(self, cap: int) -> int:
        return int(cap == Cap.TSC_DEADLINE_TIMER and self.tsc_deadline)


class FakeVcpu:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.cpuid: list[cpuid.CpuidEntry] = []
        self.msrs: dict[int, int] = {}
        self.sregs = bindings.kvm_sregs()
        self.regs = bindings.kvm_regs()
        self.fpu = bindings.kvm_fpu()
        self.lapic = bindings.kvm_lapic_state()
        struct.pack_into("<I", self.lapic, 0x350, 0x1_0000)
        struct.pack_into("<I", self.lapic, 0x360, 0x1_0000)
        self.lapic_in = b""

    def set_cpuid2(self, entries: Sequence[bindings.kvm_cpuid_entry2]) -> None:
        self.log.append("cpuid")
        self.cpuid = cpuid.from_kvm(entries)

    def set_msrs(self, values: Mapping[int, int]) -> None:
        self.log.append("msrs")
        self.msrs.update(values)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        return {i: self.msrs[i] for i in indices}

    def get_sregs(self) -> bindings.kvm_sregs:
        return self.sregs

    def set_sregs(self, sregs: bindings.kvm_sregs) -> None:
        self.log.append("sregs")
        self.sregs = sregs

    def set_regs(self, regs: bindings.kvm_regs) -> None:
        self.log.append("regs")
        self.regs = regs

    def set_fpu(self, fpu: bindings.kvm_fpu) -> None:
        self.log.append("fpu")
        self.fpu = fpu

    def get_lapic(self) -> bindings.kvm_lapic_state:
        return self.lapic

    def set_lapic(self, state: bindings.kvm_lapic_state) -> None:
        self.log.append("lapic")
        self.lapic_in = ctypes.string_at(ctypes.addressof(state), ctypes.sizeof(state))


class FakeMemory:
    def __init__(self) -> None:
        self.writes: dict[int, bytes] = {}

    def write(self, addr: int, data: bytes) -> None:
        self.writes[addr] = bytes(data)


def test_bsp_gets_everything_in_order() -> None:
    vcpu, mem = FakeVcpu(), FakeMemory()
    configure_vcpu(FakeKvm(), vcpu, mem, 0, 2, BootEntry.linux64(0x100_0000))
    assert vcpu.log == ["cpuid", "msrs", "regs", "sregs", "fpu", "lapic"]
    leaf1 = cpuid.find(vcpu.cpuid, 1)
    assert leaf1 is not None and leaf1.ebx >> 24 == 0 and leaf1.ecx & cpuid.ECX_TSC_DEADLINE
    assert vcpu.msrs == {0x10: 0, 0x174: 0, 0x2FF: 0x806, 0xC000_0082: 0}
    assert vcpu.regs.rip == 0x100_0000 and vcpu.regs.rsi == ZERO_PAGE_START
    assert vcpu.sregs.cr3 == PML4_START
    assert (vcpu.fpu.fcw, vcpu.fpu.mxcsr) == (0x37F, 0x1F80)
    assert struct.unpack_from("<I", vcpu.lapic_in, 0x350)[0] == 0x1_0700
    assert struct.unpack_from("<I", vcpu.lapic_in, 0x360)[0] == 0x1_0400
    assert BOOT_GDT_START in mem.writes and PML4_START in mem.writes


def test_ap_gets_no_registers_and_no_memory_writes() -> None:
    vcpu, mem = FakeVcpu(), FakeMemory()
    configure_vcpu(FakeKvm(tsc_deadline=False), vcpu, mem, 1, 2, BootEntry.pvh(0x100_0000))
    assert vcpu.log == ["cpuid", "msrs", "fpu", "lapic"]
    assert mem.writes == {}
    leaf1 = cpuid.find(vcpu.cpuid, 1)
    assert leaf1 is not None and leaf1.ebx >> 24 == 1
    assert not leaf1.ecx & cpuid.ECX_TSC_DEADLINE


def test_configure_vcpus_asks_kvm_once() -> None:
    kvm = FakeKvm()
    vcpus = [FakeVcpu() for _ in range(3)]
    configure_vcpus(kvm, vcpus, FakeMemory(), BootEntry.pvh(0x100_0000))
    assert kvm.calls == 1
    ids = []
    for v in vcpus:
        leaf1 = cpuid.find(v.cpuid, 1)
        assert leaf1 is not None
        ids.append(leaf1.ebx >> 24)
    assert ids == [0, 1, 2]
    assert [("regs" in v.log) for v in vcpus] == [True, False, False]


def test_policy_base_from_kvm() -> None:
    base = CpuPolicyBase.from_kvm(FakeKvm())
    assert base.tsc_deadline
    assert base.boot_msrs() == {0x10: 0, 0x174: 0, 0x2FF: 0x806, 0xC000_0082: 0}
    with pytest.raises(ValueError):
        base.cpuid_for(3, 2)


def test_boot_fpu() -> None:
    fpu = lapic.boot_fpu()
    assert (fpu.fcw, fpu.mxcsr, fpu.fsw, fpu.ftwx) == (0x37F, 0x1F80, 0, 0)
