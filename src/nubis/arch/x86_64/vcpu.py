"""``configure_vcpu``: bring one vCPU of a nubis VM into its boot state.

The order follows what KVM requires and what a kernel expects:

1. CPUID first (``KVM_SET_CPUID2``, KVM API document §4.46): KVM derives which MSRs and which
   register bits are valid from the vCPU's CPUID, so it must be in place before them.
2. The boot MSRs (``msr``), filtered to those KVM knows.
3. The first vCPU (the bootstrap processor, id 0) gets the boot GDT, IDT and page tables written
   into guest memory, and its special and general-purpose registers (``regs``).
4. The FPU defaults and the LAPIC LINT0/LINT1 delivery modes (``lapic``).

Application processors (``vcpu_id > 0``) get everything except registers: with the in-kernel
irqchip, KVM creates them waiting for INIT and SIPI (``KVM_MP_STATE_UNINITIALIZED``, api.rst
§4.38) until the guest's INIT-SIPI-SIPI sequence starts them at the trampoline the guest chose (Intel SDM Vol. 3A §9.4.4, MultiProcessor Specification 1.4 appendix B.4).
"""

from __future__ import annotations

from collections.abc import Sequence

from nubis._frozen import Frozen
from nubis._typing import Protocol
from nubis.arch.x86_64 import cpuid, lapic, msr, regs
from nubis.arch.x86_64.cpuid import CpuidEntry
from nubis.arch.x86_64.regs import BootEntry
from nubis.kvm import bindings
from nubis.kvm.bindings import Cap

TYPE_CHECKING = False


class BootVcpu(regs.SregsVcpu, lapic.LapicVcpu, msr.MsrVcpu, Protocol):
    """Every vCPU ioctl ``configure_vcpu`` uses (``nubis.kvm.VcpuFd`` has them all)."""

    def set_cpuid2(self, entries: Sequence[bindings.kvm_cpuid_entry2]) -> None:
        """KVM_SET_CPUID2."""
        ...


class KvmSystem(Protocol):
    """The ``/dev/kvm`` queries nubis makes once per VM (``nubis.kvm.Kvm`` has them)."""

    def get_supported_cpuid(self) -> list[bindings.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID."""
        ...

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST."""
        ...

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION."""
        ...


class CpuPolicyBase(Frozen):
    """What KVM offers every vCPU of a VM, read once from ``/dev/kvm``."""

    __slots__ = ("msr_indices", "supported_cpuid", "tsc_deadline")

    supported_cpuid: tuple[CpuidEntry, ...]
    msr_indices: frozenset[int]
    tsc_deadline: bool

    def __init__(
        self,
        supported_cpuid: tuple[CpuidEntry, ...],
        msr_indices: frozenset[int],
        tsc_deadline: bool,
    ) -> None:
        object.__setattr__(self, "supported_cpuid", supported_cpuid)
        object.__setattr__(self, "msr_indices", msr_indices)
        object.__setattr__(self, "tsc_deadline", tsc_deadline)

    @classmethod
    def from_kvm(cls, kvm: KvmSystem) -> CpuPolicyBase:
        """Ask ``kvm`` for its supported CPUID, its MSR list and the TSC-deadline capability."""
        return cls(
            tuple(cpuid.from_kvm(kvm.get_supported_cpuid())),
            frozenset(kvm.get_msr_index_list()),
            bool(kvm.check_extension(Cap.TSC_DEADLINE_TIMER)),
        )

    def cpuid_for(self, vcpu_id: int, num_vcpus: int) -> list[CpuidEntry]:
        """The CPUID entries of vCPU ``vcpu_id`` of ``num_vcpus``."""
        return cpuid.vcpu_cpuid(
            self.supported_cpuid, vcpu_id, num_vcpus, tsc_deadline=self.tsc_deadline
        )

    def boot_msrs(self) -> dict[int, int]:
        """The boot MSRs KVM can set."""
        return msr.boot_msrs(self.msr_indices, mtrr=cpuid.has_mtrr(self.supported_cpuid))


def configure_vcpu(
    kvm: KvmSystem,
    vcpu_fd: BootVcpu,
    memory: regs.GuestMemoryWriter,
    vcpu_id: int,
    num_vcpus: int,
    boot: BootEntry,
    *,
    base: CpuPolicyBase | None = None,
) -> None:
    """Apply CPUID, MSRs, (for vCPU 0) boot tables and registers, FPU and LAPIC to ``vcpu_fd``.

    ``base`` is the per-VM answer of ``CpuPolicyBase.from_kvm``; pass it when configuring
    several vCPUs so ``/dev/kvm`` is asked once, not once per vCPU.
    """
    policy = base if base is not None else CpuPolicyBase.from_kvm(kvm)
    vcpu_fd.set_cpuid2(cpuid.to_kvm(policy.cpuid_for(vcpu_id, num_vcpus)))
    msr.apply_msrs(vcpu_fd, policy.boot_msrs())
    if vcpu_id == 0:
        regs.write_boot_tables(memory, boot)
        regs.setup_regs(vcpu_fd, boot)
        regs.setup_sregs(vcpu_fd, boot)
    lapic.setup_fpu(vcpu_fd)
    lapic.setup_lint(vcpu_fd)


def configure_vcpus(
    kvm: KvmSystem,
    vcpu_fds: Sequence[BootVcpu],
    memory: regs.GuestMemoryWriter,
    boot: BootEntry,
) -> None:
    """``configure_vcpu`` for each of ``vcpu_fds``, whose index is the vCPU id."""
    base = CpuPolicyBase.from_kvm(kvm)
    for vcpu_id, vcpu_fd in enumerate(vcpu_fds):
        configure_vcpu(kvm, vcpu_fd, memory, vcpu_id, len(vcpu_fds), boot, base=base)
