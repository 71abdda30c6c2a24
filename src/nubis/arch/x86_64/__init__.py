"""x86_64: memory layout, register/GDT/page-table setup, CPUID and MSR policy.

Modules, one job each:

* ``layout``: the guest physical address map and I/O ports.
* ``gdt``: segment descriptors, the boot GDT and IDT (Intel SDM Vol. 3A §3.4.5).
* ``paging``: identity-mapped boot page tables for long mode (SDM Vol. 3A §4.5).
* ``regs``: boot register state for the Linux 64-bit boot protocol and PVH.
* ``cpuid``: the per-vCPU CPUID policy over KVM's supported CPUID.
* ``msr``: the boot MSR list.
* ``lapic``: LAPIC LINT0/LINT1 and FPU defaults.
* ``vcpu``: ``configure_vcpu``, which applies all of the above to one vCPU.
* ``host``: what kind of /dev/kvm this host has and whether it can run unmodified Linux.

The names below are re-exported lazily, so importing ``layout`` alone stays cheap.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from nubis.arch.x86_64.cpuid import CpuidEntry, vcpu_cpuid
    from nubis.arch.x86_64.host import HostKvm, KvmKind, detect_host_kvm
    from nubis.arch.x86_64.regs import BootEntry, BootProtocol
    from nubis.arch.x86_64.vcpu import CpuPolicyBase, configure_vcpu, configure_vcpus

_EXPORTS = {
    "BootEntry": "regs",
    "BootProtocol": "regs",
    "CpuPolicyBase": "vcpu",
    "CpuidEntry": "cpuid",
    "HostKvm": "host",
    "KvmKind": "host",
    "configure_vcpu": "vcpu",
    "configure_vcpus": "vcpu",
    "detect_host_kvm": "host",
    "vcpu_cpuid": "cpuid",
}

__all__ = [
    "BootEntry",
    "BootProtocol",
    "CpuPolicyBase",
    "CpuidEntry",
    "HostKvm",
    "KvmKind",
    "configure_vcpu",
    "configure_vcpus",
    "detect_host_kvm",
    "vcpu_cpuid",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(__import__(f"{__name__}.{module}", fromlist=[name]), name)
