"""The model-specific registers nubis sets on every vCPU before it first runs.

The list follows what a freshly reset processor that firmware has prepared would hold, so the
guest kernel starts from known values (Intel SDM Vol. 4 "Model-Specific Registers", table 2-2
for the architectural MSRs; AMD APM Vol. 2 §6.1.1 for the SYSCALL MSRs):

* IA32_SYSENTER_CS/ESP/EIP (0x174-0x176) = 0; STAR, LSTAR, CSTAR, SFMASK (0xc0000081-84) = 0;
  IA32_KERNEL_GS_BASE (0xc0000102) = 0: no system-call entry until the kernel installs one.
* IA32_TSC (0x10) = 0: every vCPU's TSC starts together (KVM synchronizes writes of the same
  value made close together).
* IA32_MISC_ENABLE (0x1a0) with bit 0, fast-string enable, set (SDM Vol. 4 table 2-2), as
  firmware leaves it; Linux checks it before using ``rep movs`` fast paths.
* IA32_MTRR_DEF_TYPE (0x2ff) = enable (bit 11) | default type write-back (6) (SDM Vol. 3A
  §12.11.2.1): with no variable or fixed ranges, all guest RAM is write-back.

KVM sets only the MSRs it knows; ``boot_msrs`` keeps those in ``KVM_GET_MSR_INDEX_LIST``
(KVM API document §4.3). The MTRR MSRs are the exception: KVM emulates them whenever the vCPU's
CPUID has the MTRR feature (leaf 1 EDX bit 12) but leaves them out of that list, so
IA32_MTRR_DEF_TYPE is kept when the caller says the vCPU has MTRRs. ``KVM_SET_MSRS`` (§4.19) returns how many it set and stops at the
first it refuses; ``VcpuFd.set_msrs`` turns a short count into an error, and ``apply_msrs``
reads the values back so a silently ignored write is caught too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nubis._typing import Protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

MSR_IA32_TSC: Final = 0x10
MSR_IA32_SYSENTER_CS: Final = 0x174
MSR_IA32_SYSENTER_ESP: Final = 0x175
MSR_IA32_SYSENTER_EIP: Final = 0x176
MSR_IA32_MISC_ENABLE: Final = 0x1A0
MSR_MTRR_DEF_TYPE: Final = 0x2FF
MSR_STAR: Final = 0xC000_0081
MSR_LSTAR: Final = 0xC000_0082
MSR_CSTAR: Final = 0xC000_0083
MSR_SYSCALL_MASK: Final = 0xC000_0084
MSR_KERNEL_GS_BASE: Final = 0xC000_0102

MISC_ENABLE_FAST_STRING: Final = 1 << 0
MTRR_ENABLE: Final = 1 << 11
MTRR_MEM_TYPE_WB: Final = 0x6

BOOT_MSRS: Final[tuple[tuple[int, int], ...]] = (
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_TSC, 0),
    (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
)


class MsrVcpu(Protocol):
    """What ``apply_msrs`` needs of a vCPU (``nubis.kvm.VcpuFd`` has it)."""

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """KVM_SET_MSRS: write every MSR in ``values``, or raise."""
        ...

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS: the values of ``indices``, or raise."""
        ...


# MSRs whose value reads back differently from what was written: the TSC keeps counting.
_NOT_READ_BACK: Final = frozenset({MSR_IA32_TSC})


def boot_msrs(supported: Iterable[int], *, mtrr: bool) -> dict[int, int]:
    """The boot MSRs (index to value) KVM can set on a vCPU.

    ``supported`` is ``KVM_GET_MSR_INDEX_LIST``; ``mtrr`` says whether the vCPU's CPUID has
    the MTRR feature, which is what makes KVM accept IA32_MTRR_DEF_TYPE.
    """
    known = set(supported)
    if mtrr:
        known.add(MSR_MTRR_DEF_TYPE)
    return {index: value for index, value in BOOT_MSRS if index in known}


def apply_msrs(vcpu: MsrVcpu, msrs: Mapping[int, int]) -> None:
    """Set ``msrs`` on ``vcpu`` and check that each one took the value it was given."""
    vcpu.set_msrs(msrs)
    check = [index for index in msrs if index not in _NOT_READ_BACK]
    actual = vcpu.get_msrs(check)
    for index in check:
        value = actual.get(index)
        if value != msrs[index]:
            shown = "nothing" if value is None else f"{value:#x}"
            raise RuntimeError(
                f"MSR {index:#x} reads back as {shown} after nubis set it to {msrs[index]:#x}"
            )
