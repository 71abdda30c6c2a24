"""The x86_64 boot setup on a real vCPU: tiny guests entered the way PVH and Linux kernels are.

Each guest reports what it sees through ``out`` to port 0x10 (4 bytes at a time), then spins.
The guests are hand-assembled; the assembly is next to the bytes.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator

import pytest

from nubis.arch.x86_64 import regs
from nubis.arch.x86_64.layout import (
    BOOT_STACK_POINTER,
    HIGH_RAM_START,
    PML4_START,
    PVH_INFO_START,
    ZERO_PAGE_START,
)
from nubis.arch.x86_64.regs import BootEntry
from nubis.arch.x86_64.vcpu import CpuPolicyBase, configure_vcpu
from nubis.kvm import IoOut, Kvm, MpState, VcpuFd, VmFd, bindings
from nubis.memory import GuestMemory

pytestmark = pytest.mark.kvm

REPORT_PORT = 0x10
MARKER_ADDRESS = 0x30_0000  # in low RAM, past the kernel entry
HIGH_ADDRESS = 0xBFE0_0000  # the last 2 MiB below the 32-bit hole: the third page directory
LOW_RAM = 4 << 20
HIGH_RAM = 2 << 20

# 32-bit protected mode, paging off: entered through the PVH register setup.
PVH_GUEST = bytes.fromhex(
    "bc f08f0000"  # mov esp, 0x8ff0      (PVH gives no stack; pushf needs one)
    "9c 58"  # pushf; pop eax
    "66 ba 1000 ef"  # mov dx, 0x10; out dx, eax        -> EFLAGS
    "89 d8 ef"  # mov eax, ebx; out dx, eax             -> EBX (start info)
    "0f 20 c0 ef"  # mov eax, cr0; out dx, eax          -> CR0
    "31 c0 66 8c c8 ef"  # xor eax, eax; mov ax, cs; out -> CS
    "66 8c d0 ef"  # mov ax, ss; out dx, eax            -> SS
    "a1 00003000 ef"  # mov eax, [0x300000]; out       -> a value through flat DS
    "eb fe"  # jmp $
)

# 64-bit long mode: entered through the Linux 64-bit boot protocol register setup.
LONG_MODE_GUEST = bytes.fromhex(
    "48 89 f0 66 ba 1000 ef"  # mov rax, rsi; mov dx, 0x10; out -> RSI (zero page)
    "0f 20 d8 ef"  # mov rax, cr3; out                 -> CR3
    "31 c0 66 8c c8 ef"  # xor eax, eax; mov ax, cs; out -> CS
    "48 89 e0 ef"  # mov rax, rsp; out                 -> RSP
    "48 a1 0000e0bf00000000 ef"  # movabs rax, [0xbfe00000]; out -> low half
    "48 c1 e8 20 ef"  # shr rax, 32; out               -> high half
    "b9 800000c0 0f 32 66 ba 1000 ef"  # rdmsr EFER; mov dx, 0x10; out -> EFER low
    "d9 3c 25 00800000"  # fnstcw [0x8000]
    "0f b7 04 25 00800000 ef"  # movzx eax, word [0x8000]; out -> x87 control word
    "eb fe"  # jmp $
)

# 32-bit: CPUID leaf 1 EBX, leaf 0x40000000 EBX, leaf 0xB subleaf 1 EDX and EBX.
CPUID_GUEST = bytes.fromhex(
    "b8 01000000 0f a2 89 d8 66 ba 1000 ef"  # cpuid(1); out ebx
    "b8 00000040 0f a2 89 d8 66 ba 1000 ef"  # cpuid(0x40000000); out ebx
    "b8 0b000000 b9 01000000 0f a2"  # cpuid(0xb, 1)
    "89 d0 66 ba 1000 ef"  # out edx (x2APIC id)
    "89 d8 ef"  # out ebx (processors at the core level)
    "eb fe"  # jmp $
)


class Guest:
    """A VM with the in-kernel irqchip, 4 MiB of low RAM and 2 MiB just below 3 GiB."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.vm: VmFd = kvm.create_vm()
        self.vm.create_irq_chip()
        self.memory = GuestMemory([(0, LOW_RAM), (HIGH_ADDRESS, HIGH_RAM)])
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, region.start, region.size, region.host_address)
        self.vcpus: list[VcpuFd] = []

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        self.memory.close()


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture
def guest(kvm: Kvm) -> Iterator[Guest]:
    g = Guest(kvm)
    try:
        yield g
    finally:
        g.close()


def reports(vcpu: VcpuFd, count: int) -> list[int]:
    """Run ``vcpu`` until it has written ``count`` dwords to the report port."""
    values = []
    for _ in range(count):
        exit_ = vcpu.run()
        if not (isinstance(exit_, IoOut) and exit_.port == REPORT_PORT and exit_.size == 4):
            pytest.fail(f"guest exit {exit_!r} after {values!r}: {vcpu.register_dump()}")
        values.append(int.from_bytes(exit_.data, "little"))
    return values


def boot(guest: Guest, entry: BootEntry, code: bytes, num_vcpus: int = 1) -> VcpuFd:
    guest.memory.write(entry.entry, code)
    base = CpuPolicyBase.from_kvm(guest.kvm)
    for vcpu_id in range(num_vcpus):
        vcpu = guest.vm.create_vcpu(vcpu_id)
        guest.vcpus.append(vcpu)
        configure_vcpu(guest.kvm, vcpu, guest.memory, vcpu_id, num_vcpus, entry, base=base)
    return guest.vcpus[0]


@pytest.mark.timeout(30)
def test_pvh_entry_state(guest: Guest) -> None:
    guest.memory.write_u32(MARKER_ADDRESS, 0xCAFE_BABE)
    vcpu = boot(guest, BootEntry.pvh(HIGH_RAM_START), PVH_GUEST)
    eflags, ebx, cr0, cs, ss, marker = reports(vcpu, 6)
    assert eflags == 0x2  # interrupts off
    assert ebx == PVH_INFO_START
    assert cr0 & 0x8000_0001 == 0x1  # protected mode, paging off
    assert cr0 & 0x10  # ET
    assert (cs, ss) == (0x08, 0x10)
    assert marker == 0xCAFE_BABE


@pytest.mark.timeout(30)
def test_linux64_entry_state(guest: Guest) -> None:
    guest.memory.write_u64(HIGH_ADDRESS, 0x1122_3344_5566_7788)
    vcpu = boot(guest, BootEntry.linux64(HIGH_RAM_START), LONG_MODE_GUEST)
    rsi, cr3, cs, rsp, low, high, efer, fcw = reports(vcpu, 8)
    assert rsi == ZERO_PAGE_START
    assert cr3 == PML4_START
    assert cs == 0x08
    assert rsp == BOOT_STACK_POINTER
    assert (high << 32 | low) == 0x1122_3344_5566_7788  # read through the identity map
    assert efer & 0x500 == 0x500  # LME | LMA
    assert fcw == 0x37F


@pytest.mark.timeout(30)
@pytest.mark.parametrize("vcpu_id", [0, 1])
def test_cpuid_seen_by_the_guest(guest: Guest, vcpu_id: int) -> None:
    num_vcpus = 5  # differs from any plausible host count, so the guest sees nubis's numbers
    entry = BootEntry.pvh(HIGH_RAM_START)
    boot(guest, entry, CPUID_GUEST, num_vcpus=2)
    # Re-apply with 5 vCPUs so leaf 1's count is nubis's, not the host's.
    base = CpuPolicyBase.from_kvm(guest.kvm)
    vcpu = guest.vcpus[vcpu_id]
    configure_vcpu(guest.kvm, vcpu, guest.memory, vcpu_id, num_vcpus, entry, base=base)
    if vcpu_id:
        # An AP waits for INIT/SIPI; start it at the same code for the test.
        regs.setup_regs(vcpu, entry)
        regs.setup_sregs(vcpu, entry)
        vcpu.set_mp_state(MpState.RUNNABLE)
    leaf1_ebx, signature, x2apic_id, core_count = reports(vcpu, 4)
    assert leaf1_ebx >> 24 == vcpu_id
    assert (leaf1_ebx >> 16) & 0xFF == num_vcpus
    assert signature == int.from_bytes(b"KVMK", "little")
    assert x2apic_id == vcpu_id
    assert core_count & 0xFFFF == num_vcpus


@pytest.mark.timeout(30)
def test_ap_keeps_waiting_for_sipi(guest: Guest) -> None:
    boot(guest, BootEntry.pvh(HIGH_RAM_START), PVH_GUEST, num_vcpus=2)
    ap = guest.vcpus[1]
    assert ap.get_mp_state() == MpState.UNINITIALIZED
    assert ap.get_regs().rip == 0xFFF0  # still at the reset vector
    assert guest.vcpus[0].get_regs().rip == HIGH_RAM_START


@pytest.mark.timeout(30)
@pytest.mark.parametrize("vcpu_id", [0, 1])
def test_msrs_fpu_and_lapic_applied(guest: Guest, vcpu_id: int) -> None:
    entry = BootEntry.linux64(HIGH_RAM_START)
    boot(guest, entry, LONG_MODE_GUEST, num_vcpus=2)
    vcpu = guest.vcpus[vcpu_id]
    # Disturb the state configure_vcpu owns, then configure again: it must put it back.
    vcpu.set_fpu(bindings.kvm_fpu(fcw=0x27F))
    vcpu.set_msrs({0x174: 0x10})
    configure_vcpu(guest.kvm, vcpu, guest.memory, vcpu_id, 2, entry)
    msrs = vcpu.get_msrs([0x2FF, 0x1A0, 0x174, 0xC000_0082])
    assert msrs[0x2FF] == 0x806
    assert msrs[0x1A0] & 1
    assert msrs[0x174] == 0 and msrs[0xC000_0082] == 0
    # KVM_SET_FPU carries the control word; KVM_GET_FPU does not report MXCSR back on every
    # kernel (it reads 0 on this one), so only the control word is checked here.
    assert vcpu.get_fpu().fcw == 0x37F
    state = vcpu.get_lapic()
    page = ctypes.string_at(ctypes.addressof(state), ctypes.sizeof(state))
    lint0, lint1 = (struct.unpack_from("<I", page, offset)[0] for offset in (0x350, 0x360))
    assert (lint0 >> 8) & 7 == 0b111  # ExtINT
    assert (lint1 >> 8) & 7 == 0b100  # NMI
