"""Boot register state of the first vCPU for the two ways nubis enters a kernel.

**Linux 64-bit boot protocol** (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): the
CPU is in long mode with paging on, the kernel, zero page and command line are identity mapped,
CS is a flat 64-bit code segment and DS/ES/SS flat data segments, interrupts are off and RSI
holds the address of ``struct boot_params`` (the zero page). Entering long mode needs CR0.PE
and CR0.PG, CR4.PAE, EFER.LME (EFER.LMA is what the processor sets once paging is on, and KVM
wants it set with LME when userspace loads the state) and CR3 pointing at a PML4 (Intel SDM
Vol. 3A §10.8.5; AMD APM Vol. 2 §14.6.1).

**PVH** (Xen's ``xen/include/public/arch-x86/hvm/start_info.h``, "Boot state"; Linux enters it
through the XEN_ELFNOTE_PHYS32_ENTRY note): 32-bit protected mode with paging off (CR0.PE set,
CR0.PG clear, CR4 zero), flat 4 GiB 32-bit code and read/write data segments, TR a 32-bit TSS,
EFLAGS 0x2 and EBX the guest physical address of ``struct hvm_start_info``.

Both set CR0.ET, which the processor hard-wires to 1 (SDM Vol. 3A §2.5). The segment registers'
hidden parts, the GDTR and the IDTR are loaded with ``KVM_SET_SREGS`` and the general-purpose
registers with ``KVM_SET_REGS`` (KVM API document §4.12 and §4.14); ``write_boot_tables`` puts
the matching GDT, IDT and (for long mode) page tables into guest memory so the guest sees the
same descriptors it runs with.
"""

from __future__ import annotations

from nubis._enum import Enum
from nubis._frozen import Frozen
from nubis._typing import Protocol
from nubis.arch.x86_64 import gdt, paging
from nubis.arch.x86_64.layout import (
    BOOT_GDT_START,
    BOOT_IDT_START,
    BOOT_STACK_POINTER,
    PML4_START,
    PVH_INFO_START,
    ZERO_PAGE_START,
)
from nubis.kvm import bindings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

X86_CR0_PE: Final = 1 << 0
X86_CR0_ET: Final = 1 << 4
X86_CR0_PG: Final = 1 << 31
X86_CR4_PAE: Final = 1 << 5
EFER_LME: Final = 1 << 8
EFER_LMA: Final = 1 << 10
RFLAGS_RESERVED: Final = 1 << 1  # bit 1 always reads as 1; IF stays clear


class BootProtocol(Enum):
    """How the kernel is entered."""

    LINUX64 = "linux64"
    PVH = "pvh"


class BootEntry(Frozen):
    """Where the kernel starts and where its boot information lies.

    ``boot_info`` is the zero page (``struct boot_params``) for ``LINUX64`` and the
    ``struct hvm_start_info`` for ``PVH``.
    """

    __slots__ = ("boot_info", "entry", "protocol")

    protocol: BootProtocol
    entry: int
    boot_info: int

    def __init__(self, protocol: BootProtocol, entry: int, boot_info: int) -> None:
        object.__setattr__(self, "protocol", protocol)
        object.__setattr__(self, "entry", entry)
        object.__setattr__(self, "boot_info", boot_info)

    @classmethod
    def linux64(cls, entry: int, zero_page: int = ZERO_PAGE_START) -> BootEntry:
        """A Linux 64-bit boot protocol entry with the zero page at ``zero_page``."""
        return cls(BootProtocol.LINUX64, entry, zero_page)

    @classmethod
    def pvh(cls, entry: int, start_info: int = PVH_INFO_START) -> BootEntry:
        """A PVH entry with the ``hvm_start_info`` at ``start_info``."""
        return cls(BootProtocol.PVH, entry, start_info)

    @property
    def gdt(self) -> gdt.BootGdt:
        """The boot GDT this protocol needs."""
        if self.protocol is BootProtocol.LINUX64:
            return gdt.long_mode_gdt()
        return gdt.protected_mode_gdt()


class GuestMemoryWriter(Protocol):
    """What ``write_boot_tables`` needs of guest memory (``nubis.memory.GuestMemory`` has it)."""

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` at guest physical address ``addr``."""
        ...


class SregsVcpu(Protocol):
    """The register ioctls of a vCPU (``nubis.kvm.VcpuFd`` has them)."""

    def get_sregs(self) -> bindings.kvm_sregs:
        """KVM_GET_SREGS."""
        ...

    def set_sregs(self, sregs: bindings.kvm_sregs) -> None:
        """KVM_SET_SREGS."""
        ...

    def set_regs(self, regs: bindings.kvm_regs) -> None:
        """KVM_SET_REGS."""
        ...


def kvm_segment(segment: gdt.Segment) -> bindings.kvm_segment:
    """The ``struct kvm_segment`` for a decoded descriptor."""
    return bindings.kvm_segment(
        base=segment.base,
        limit=segment.limit,
        selector=segment.selector,
        type=segment.type,
        present=segment.present,
        dpl=segment.dpl,
        db=segment.db,
        s=segment.s,
        l=segment.l,
        g=segment.g,
        avl=segment.avl,
        unusable=segment.unusable,
    )


def apply_boot_sregs(sregs: bindings.kvm_sregs, boot: BootEntry) -> None:
    """Change ``sregs`` in place into the boot state of ``boot``'s protocol.

    Fields the protocols say nothing about (APIC base, CR8, the LDT, pending interrupts) keep
    the values KVM reported.
    """
    table = boot.gdt
    code = kvm_segment(table.code)
    data = kvm_segment(table.data)
    sregs.cs = code
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, data)
    sregs.tr = kvm_segment(table.tss)
    sregs.gdt.base = BOOT_GDT_START
    sregs.gdt.limit = gdt.BOOT_GDT_LIMIT
    sregs.idt.base = BOOT_IDT_START
    sregs.idt.limit = gdt.BOOT_IDT_LIMIT
    sregs.cr2 = 0
    if boot.protocol is BootProtocol.LINUX64:
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
        sregs.cr3 = PML4_START
        sregs.cr4 = X86_CR4_PAE
        sregs.efer |= EFER_LME | EFER_LMA
    else:
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET
        sregs.cr3 = 0
        sregs.cr4 = 0
        sregs.efer &= ~(EFER_LME | EFER_LMA)


def boot_regs(boot: BootEntry) -> bindings.kvm_regs:
    """The general-purpose registers at the kernel entry point of ``boot``."""
    regs = bindings.kvm_regs(rflags=RFLAGS_RESERVED, rip=boot.entry)
    if boot.protocol is BootProtocol.LINUX64:
        regs.rsi = boot.boot_info
        regs.rsp = BOOT_STACK_POINTER
        regs.rbp = BOOT_STACK_POINTER
    else:
        regs.rbx = boot.boot_info
    return regs


def setup_sregs(vcpu: SregsVcpu, boot: BootEntry) -> None:
    """Load the boot special registers of ``boot`` into ``vcpu`` (get, modify, set)."""
    sregs = vcpu.get_sregs()
    apply_boot_sregs(sregs, boot)
    vcpu.set_sregs(sregs)


def setup_regs(vcpu: SregsVcpu, boot: BootEntry) -> None:
    """Load the boot general-purpose registers of ``boot`` into ``vcpu``."""
    vcpu.set_regs(boot_regs(boot))


def write_boot_tables(memory: GuestMemoryWriter, boot: BootEntry) -> None:
    """Write the boot GDT, the empty IDT and, for long mode, the identity page tables."""
    memory.write(BOOT_GDT_START, boot.gdt.to_bytes())
    memory.write(BOOT_IDT_START, gdt.empty_idt())
    if boot.protocol is BootProtocol.LINUX64:
        for address, table in paging.identity_map_tables():
            memory.write(address, table)
