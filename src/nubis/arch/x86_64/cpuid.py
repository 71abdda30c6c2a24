"""The CPUID a nubis vCPU reports: KVM's supported CPUID, adjusted per vCPU.

``KVM_GET_SUPPORTED_CPUID`` (KVM API document §4.46) lists what KVM can offer; nubis narrows it
and fills in what only the VMM knows — which vCPU this is and how many there are — before
``KVM_SET_CPUID2``. The topology is one socket of ``num_vcpus`` cores with one thread each, so
a vCPU's (x2)APIC id is its index. Leaves, with Intel SDM Vol. 2A "CPUID" (table 3-8) and AMD
APM Vol. 3 appendix E as the references:

* leaf 1: EBX[31:24] initial APIC id, EBX[23:16] logical processors per package, EDX[28] HTT
  when there is more than one; ECX[31] hypervisor present; ECX[24] TSC-deadline timer only when
  KVM emulates it (``KVM_CAP_TSC_DEADLINE_TIMER``; older kernels leave it out of the supported
  list); the thermal and power-management bits (ECX[7] EIST, ECX[8] TM2, EDX[22] ACPI, EDX[29]
  TM) cleared.
* leaf 4 (Intel deterministic cache parameters): EAX[31:26] cores per package - 1 and
  EAX[25:14] logical processors sharing the cache - 1 (one for L1/L2, all for L3 and beyond).
* leaf 6 (thermal and power management): cleared except EAX[2] ARAT, which KVM's emulated APIC
  timer honours and which tells Linux the timer keeps running in idle.
* leaves 0xB and 0x1F (extended topology; SDM Vol. 3A §10.9.2): subleaf 0 the SMT level (shift
  0, one thread), subleaf 1 the core level (shift ceil(log2 n), n processors), subleaf 2 the
  invalid terminator; EDX the x2APIC id in every subleaf.
* 0x40000000: the KVM signature "KVMKVMKVM\\0\\0\\0" (KVM API document, "KVM CPUID bits",
  Documentation/virt/kvm/x86/cpuid.rst); 0x40000001 (kvmclock and other paravirt features)
  kept as KVM reports it.
* 0x80000007 (advanced power management): EDX cleared except bit 8, the invariant TSC.
* 0x80000008 ECX on AMD: NC[7:0] = cores - 1, ApicIdSize[15:12] = ceil(log2 n).
* 0x8000001D on AMD (cache topology): EAX[25:14] logical processors sharing the cache - 1, as
  for leaf 4.
* 0x8000001E on AMD: extended APIC id, compute-unit id and one thread per unit, node 0.

Everything here is a pure function over `CpuidEntry` lists; ``from_kvm``/``to_kvm`` convert
from and to ``struct kvm_cpuid_entry2``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nubis._frozen import Frozen, replace
from nubis.kvm import bindings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

KVM_CPUID_FLAG_SIGNIFCANT_INDEX: Final = bindings.KVM_CPUID_FLAG_SIGNIFCANT_INDEX

LEAF_VENDOR: Final = 0x0
LEAF_FEATURES: Final = 0x1
LEAF_CACHE_PARAMETERS: Final = 0x4
LEAF_POWER_MANAGEMENT: Final = 0x6
LEAF_EXTENDED_TOPOLOGY: Final = 0xB
LEAF_EXTENDED_TOPOLOGY_V2: Final = 0x1F
LEAF_HYPERVISOR_SIGNATURE: Final = 0x4000_0000
LEAF_KVM_FEATURES: Final = 0x4000_0001
LEAF_EXTENDED_FEATURES: Final = 0x8000_0001
LEAF_SVM: Final = 0x8000_000A
LEAF_ADVANCED_POWER_MANAGEMENT: Final = 0x8000_0007
LEAF_ADDRESS_SIZES: Final = 0x8000_0008
LEAF_AMD_CACHE_TOPOLOGY: Final = 0x8000_001D
LEAF_AMD_TOPOLOGY: Final = 0x8000_001E

# KVM paravirtual features (leaf 0x4000_0001 EAX, Documentation/virt/kvm/x86/cpuid.rst) that
# nubis withholds: asynchronous page faults, which let the host tell the guest "this page is
# not present yet, run something else". In the nested test host, guests offered them
# triple-faulted within seconds once L1 migrated or split guest pages (forced compaction),
# and survived the same load with the kernel's ``no-kvmapf``. Without them a vCPU simply
# waits while the host brings the page in.
KVM_FEATURE_ASYNC_PF: Final = 1 << 4
KVM_FEATURE_ASYNC_PF_VMEXIT: Final = 1 << 10
KVM_FEATURE_ASYNC_PF_INT: Final = 1 << 14
KVM_FEATURES_WITHHELD: Final = (
    KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_VMEXIT | KVM_FEATURE_ASYNC_PF_INT
)

# Leaf 1.
EBX_CLFLUSH_MASK: Final = 0x0000_FF00
ECX_EIST: Final = 1 << 7
ECX_TM2: Final = 1 << 8
ECX_TSC_DEADLINE: Final = 1 << 24
ECX_HYPERVISOR: Final = 1 << 31
ECX_VMX: Final = 1 << 5  # leaf 1: Intel VMX
ECX_SVM: Final = 1 << 2  # leaf 0x80000001: AMD SVM
EDX_MTRR: Final = 1 << 12
EDX_ACPI: Final = 1 << 22
EDX_HTT: Final = 1 << 28
EDX_TM: Final = 1 << 29
# Leaf 6.
EAX_ARAT: Final = 1 << 2
# Leaf 0x80000007.
EDX_INVARIANT_TSC: Final = 1 << 8
# Leaf 0xB / 0x1F level types (ECX[15:8]).
LEVEL_TYPE_INVALID: Final = 0
LEVEL_TYPE_SMT: Final = 1
LEVEL_TYPE_CORE: Final = 2

KVM_SIGNATURE: Final = b"KVMKVMKVM\0\0\0"
VENDOR_INTEL: Final = b"GenuineIntel"
VENDOR_AMD: Final = b"AuthenticAMD"
VENDOR_HYGON: Final = b"HygonGenuine"


class CpuidEntry(Frozen):
    """One CPUID leaf/subleaf as KVM describes it (``struct kvm_cpuid_entry2``)."""

    __slots__ = ("eax", "ebx", "ecx", "edx", "flags", "function", "index")

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def __init__(
        self, function: int, index: int, flags: int, eax: int, ebx: int, ecx: int, edx: int
    ) -> None:
        object.__setattr__(self, "function", function)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "flags", flags)
        object.__setattr__(self, "eax", eax)
        object.__setattr__(self, "ebx", ebx)
        object.__setattr__(self, "ecx", ecx)
        object.__setattr__(self, "edx", edx)


def from_kvm(entries: Iterable[bindings.kvm_cpuid_entry2]) -> list[CpuidEntry]:
    """Convert ``kvm_cpuid_entry2`` structures into `CpuidEntry` values."""
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in entries]


def to_kvm(entries: Iterable[CpuidEntry]) -> list[bindings.kvm_cpuid_entry2]:
    """Convert `CpuidEntry` values into ``kvm_cpuid_entry2`` structures."""
    return [
        bindings.kvm_cpuid_entry2(
            function=e.function,
            index=e.index,
            flags=e.flags,
            eax=e.eax,
            ebx=e.ebx,
            ecx=e.ecx,
            edx=e.edx,
        )
        for e in entries
    ]


def vendor(entries: Sequence[CpuidEntry]) -> bytes:
    """The 12-byte vendor string of leaf 0 (EBX, EDX, ECX), or b"" when leaf 0 is missing."""
    for e in entries:
        if e.function == LEAF_VENDOR and e.index == 0:
            return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx))
    return b""


def _apic_id_bits(num_vcpus: int) -> int:
    """Bits of APIC id needed to number ``num_vcpus`` cores: ceil(log2 n)."""
    return (num_vcpus - 1).bit_length()


def _topology_leaf(function: int, vcpu_id: int, num_vcpus: int) -> list[CpuidEntry]:
    """Subleaves 0 (SMT), 1 (core) and 2 (terminator) of leaf 0xB or 0x1F."""
    flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        CpuidEntry(function, 0, flags, 0, 1, LEVEL_TYPE_SMT << 8 | 0, vcpu_id),
        CpuidEntry(
            function,
            1,
            flags,
            _apic_id_bits(num_vcpus),
            num_vcpus & 0xFFFF,
            LEVEL_TYPE_CORE << 8 | 1,
            vcpu_id,
        ),
        CpuidEntry(function, 2, flags, 0, 0, LEVEL_TYPE_INVALID << 8 | 2, vcpu_id),
    ]


def _signature_registers() -> tuple[int, int, int]:
    """EBX, ECX and EDX of leaf 0x40000000: the signature, four bytes each, little-endian."""
    sig = KVM_SIGNATURE
    return (
        int.from_bytes(sig[0:4], "little"),
        int.from_bytes(sig[4:8], "little"),
        int.from_bytes(sig[8:12], "little"),
    )


def _adjust(
    e: CpuidEntry, vcpu_id: int, num_vcpus: int, amd: bool, tsc_deadline: bool
) -> CpuidEntry:
    f = e.function
    if f == LEAF_FEATURES:
        ebx = (e.ebx & EBX_CLFLUSH_MASK) | (vcpu_id & 0xFF) << 24 | min(num_vcpus, 0xFF) << 16
        # No nested virtualization: without VMX/SVM a Linux guest also skips disabling them
        # on other CPUs by NMI before an emergency restart, which hangs its panic reboot.
        ecx = (e.ecx | ECX_HYPERVISOR) & ~(ECX_EIST | ECX_TM2 | ECX_VMX)
        ecx = ecx | ECX_TSC_DEADLINE if tsc_deadline else ecx & ~ECX_TSC_DEADLINE
        edx = e.edx & ~(EDX_ACPI | EDX_TM)
        edx = edx | EDX_HTT if num_vcpus > 1 else edx & ~EDX_HTT
        return replace(e, ebx=ebx, ecx=ecx, edx=edx)
    if f == LEAF_CACHE_PARAMETERS or (f == LEAF_AMD_CACHE_TOPOLOGY and amd):
        if e.eax & 0x1F == 0:  # cache type 0: no more caches
            return e
        level = (e.eax >> 5) & 0x7
        sharing = 1 if level < 3 else num_vcpus
        eax = (e.eax & ~(0xFFF << 14)) | (min(sharing, 0x1000) - 1) << 14
        if f == LEAF_CACHE_PARAMETERS:
            eax = (eax & 0x03FF_FFFF) | (min(num_vcpus, 0x40) - 1) << 26
        return replace(e, eax=eax)
    if f == LEAF_POWER_MANAGEMENT:
        return replace(e, eax=e.eax & EAX_ARAT, ebx=0, ecx=0, edx=0)
    if f == LEAF_HYPERVISOR_SIGNATURE:
        ebx, ecx, edx = _signature_registers()
        return replace(e, eax=max(e.eax, LEAF_KVM_FEATURES), ebx=ebx, ecx=ecx, edx=edx)
    if f == LEAF_KVM_FEATURES:
        return replace(e, eax=e.eax & ~KVM_FEATURES_WITHHELD)
    if f == LEAF_EXTENDED_FEATURES:
        return replace(e, ecx=e.ecx & ~ECX_SVM)
    if f == LEAF_SVM:
        return replace(e, eax=0, ebx=0, ecx=0, edx=0)
    if f == LEAF_ADVANCED_POWER_MANAGEMENT:
        return replace(e, edx=e.edx & EDX_INVARIANT_TSC)
    if f == LEAF_ADDRESS_SIZES and amd:
        ecx = (e.ecx & ~0xF0FF) | _apic_id_bits(num_vcpus) << 12 | (min(num_vcpus, 0x100) - 1)
        return replace(e, ecx=ecx)
    if f == LEAF_AMD_TOPOLOGY and amd:
        return replace(
            e,
            eax=vcpu_id,
            ebx=(e.ebx & ~0xFFFF) | (vcpu_id & 0xFF),
            ecx=e.ecx & ~0x7FF,
            edx=0,
        )
    return e


def vcpu_cpuid(
    supported: Sequence[CpuidEntry],
    vcpu_id: int,
    num_vcpus: int,
    *,
    tsc_deadline: bool,
) -> list[CpuidEntry]:
    """The CPUID entries for vCPU ``vcpu_id`` of ``num_vcpus``, from KVM's supported list.

    ``tsc_deadline`` says whether KVM emulates the TSC-deadline timer (the answer to
    ``KVM_CHECK_EXTENSION(KVM_CAP_TSC_DEADLINE_TIMER)``); the bit is offered only then.
    """
    if num_vcpus < 1:
        raise ValueError(f"a VM needs at least one vCPU, not {num_vcpus}")
    if not 0 <= vcpu_id < num_vcpus:
        raise ValueError(f"vCPU id {vcpu_id} is outside 0..{num_vcpus - 1}")
    amd = vendor(supported) in (VENDOR_AMD, VENDOR_HYGON)
    topology_leaves = {
        e.function
        for e in supported
        if e.function in (LEAF_EXTENDED_TOPOLOGY, LEAF_EXTENDED_TOPOLOGY_V2)
    }
    functions = {e.function for e in supported}
    result: list[CpuidEntry] = []
    emitted_topology: set[int] = set()
    for e in supported:
        if e.function in topology_leaves:
            if e.function not in emitted_topology:
                emitted_topology.add(e.function)
                result.extend(_topology_leaf(e.function, vcpu_id, num_vcpus))
            continue
        result.append(_adjust(e, vcpu_id, num_vcpus, amd, tsc_deadline))
    if LEAF_HYPERVISOR_SIGNATURE not in functions:
        ebx, ecx, edx = _signature_registers()
        result.append(CpuidEntry(LEAF_HYPERVISOR_SIGNATURE, 0, 0, LEAF_KVM_FEATURES, ebx, ecx, edx))
    if LEAF_KVM_FEATURES not in functions:
        result.append(CpuidEntry(LEAF_KVM_FEATURES, 0, 0, 0, 0, 0, 0))
    return result


def has_mtrr(entries: Sequence[CpuidEntry]) -> bool:
    """Whether leaf 1 reports MTRRs (EDX bit 12)."""
    leaf = find(entries, LEAF_FEATURES)
    return leaf is not None and bool(leaf.edx & EDX_MTRR)


def find(entries: Sequence[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry for ``function``/``index``; for leaves whose subleaf does not matter, any."""
    for e in entries:
        if e.function == function and (
            e.index == index or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        ):
            return e
    return None
