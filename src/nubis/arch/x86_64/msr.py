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
(KVM API document §4.3), and ``KVM_SET_MSRS`` (§4.19) returns how many it set, which
``apply_msrs`` checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol

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
    """What ``apply_msrs`` needs of a vCPU: KVM_SET_MSRS returning how many were set."""

    def set_msrs(self, msrs: list[tuple[int, int]]) -> int:
        """Set each (index, value) pair; return the number of MSRs KVM set."""
        ...


def boot_msrs(supported: Iterable[int]) -> list[tuple[int, int]]:
    """The (index, value) boot MSRs, keeping only those KVM reports in ``supported``."""
    known = set(supported)
    return [(index, value) for index, value in BOOT_MSRS if index in known]


def apply_msrs(vcpu: MsrVcpu, msrs: list[tuple[int, int]]) -> None:
    """Set ``msrs`` on ``vcpu`` and raise if KVM set fewer than all of them."""
    count = vcpu.set_msrs(msrs)
    if count != len(msrs):
        failed = msrs[count] if 0 <= count < len(msrs) else None
        where = f" (it stopped at MSR {failed[0]:#x})" if failed else ""
        raise RuntimeError(f"KVM set {count} of {len(msrs)} boot MSRs{where}")
