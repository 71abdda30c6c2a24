"""CPUID policy over synthetic KVM_GET_SUPPORTED_CPUID lists (Intel SDM Vol. 2A "CPUID")."""

from __future__ import annotations

import pytest

from nubis.arch.x86_64 import cpuid
from nubis.arch.x86_64.cpuid import CpuidEntry, find, vcpu_cpuid

SIG = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def regs(vendor: bytes) -> tuple[int, int, int]:
    """EBX, EDX, ECX of leaf 0 for a 12-byte vendor string."""
    ebx, edx, ecx = (int.from_bytes(vendor[i : i + 4], "little") for i in (0, 4, 8))
    return ebx, edx, ecx


def supported(vendor: bytes) -> list[CpuidEntry]:
    ebx, edx, ecx = regs(vendor)
    return [
        CpuidEntry(0x0, 0, 0, 0x1F, ebx, ecx, edx),
        # APIC id 7 and 16 logical processors from the host, CLFLUSH 8, TSC deadline, EIST, TM2.
        CpuidEntry(
            0x1, 0, 0, 0x000A_0F10, 0x0710_0800, 0x7FFA_3383 | 1 << 24, 0x1FCB_FBFF | 1 << 29
        ),
        CpuidEntry(0x4, 0, SIG, 0x1C00_4121, 0x01C0_003F, 0x3F, 0),  # L1d
        CpuidEntry(0x4, 1, SIG, 0x1C00_4122, 0x01C0_003F, 0x3F, 0),  # L1i
        CpuidEntry(0x4, 2, SIG, 0x1C00_4143, 0x03C0_003F, 0x3FF, 0),  # L2
        CpuidEntry(0x4, 3, SIG, 0x1C03_C163, 0x0280_003F, 0x9FFF, 6),  # L3
        CpuidEntry(0x4, 4, SIG, 0, 0, 0, 0),
        CpuidEntry(0x6, 0, 0, 0x0000_0077, 2, 9, 0),
        CpuidEntry(0xB, 0, SIG, 1, 2, 0x100, 7),
        CpuidEntry(0xB, 1, SIG, 5, 16, 0x201, 7),
        CpuidEntry(0x1F, 0, SIG, 1, 2, 0x100, 7),
        CpuidEntry(0x1F, 1, SIG, 5, 16, 0x201, 7),
        CpuidEntry(0x1F, 2, SIG, 0, 0, 0x2, 7),
        CpuidEntry(0x4000_0000, 0, 0, 0x4000_0001, 0, 0, 0),
        CpuidEntry(0x4000_0001, 0, 0, 0x0100_7AFB, 0, 0, 0),
        CpuidEntry(0x8000_0000, 0, 0, 0x8000_0021, 0, 0, 0),
        CpuidEntry(0x8000_0007, 0, 0, 0, 0, 0, 0x0000_07FF),
        CpuidEntry(0x8000_0008, 0, 0, 0x3030, 0, 0x0000_700F, 0),
        CpuidEntry(0x8000_001D, 0, SIG, 0x0000_4121, 0x01C0_003F, 0x3F, 0),  # L1d, 2 threads
        CpuidEntry(0x8000_001D, 1, SIG, 0x0000_4143, 0x01C0_003F, 0x3FF, 0),  # L2, 2 threads
        CpuidEntry(0x8000_001D, 2, SIG, 0x0003_C163, 0x03C0_003F, 0x7FFF, 1),  # L3, 16 threads
        CpuidEntry(0x8000_001D, 3, SIG, 0, 0, 0, 0),
        CpuidEntry(0x8000_001E, 0, 0, 14, 0x0000_0107, 0x0000_0300, 0),
    ]


@pytest.mark.parametrize("vendor", [cpuid.VENDOR_INTEL, cpuid.VENDOR_AMD])
@pytest.mark.parametrize(("vcpu_id", "num_vcpus"), [(0, 1), (0, 4), (3, 4), (5, 6)])
def test_leaf_1(vendor: bytes, vcpu_id: int, num_vcpus: int) -> None:
    out = vcpu_cpuid(supported(vendor), vcpu_id, num_vcpus, tsc_deadline=True)
    leaf = find(out, 1)
    assert leaf is not None
    assert leaf.ebx >> 24 == vcpu_id
    assert (leaf.ebx >> 16) & 0xFF == num_vcpus
    assert (leaf.ebx >> 8) & 0xFF == 8  # CLFLUSH line size kept
    assert leaf.ebx & 0xFF == 0
    assert leaf.ecx & cpuid.ECX_HYPERVISOR
    assert leaf.ecx & cpuid.ECX_TSC_DEADLINE
    assert not leaf.ecx & (cpuid.ECX_EIST | cpuid.ECX_TM2)
    assert not leaf.edx & (cpuid.EDX_TM | cpuid.EDX_ACPI)
    assert bool(leaf.edx & cpuid.EDX_HTT) == (num_vcpus > 1)
    assert leaf.eax == 0x000A_0F10


def test_tsc_deadline_only_when_kvm_emulates_it() -> None:
    out = vcpu_cpuid(supported(cpuid.VENDOR_INTEL), 0, 1, tsc_deadline=False)
    leaf = find(out, 1)
    assert leaf is not None and not leaf.ecx & cpuid.ECX_TSC_DEADLINE
    base = [e for e in supported(cpuid.VENDOR_INTEL)]
    base[1] = CpuidEntry(1, 0, 0, 0, 0, 0, 0)  # KVM that does not list it
    leaf = find(vcpu_cpuid(base, 0, 1, tsc_deadline=True), 1)
    assert leaf is not None and leaf.ecx & cpuid.ECX_TSC_DEADLINE


@pytest.mark.parametrize("leaf", [0xB, 0x1F])
@pytest.mark.parametrize(
    ("vcpu_id", "num_vcpus", "shift"), [(0, 1, 0), (1, 2, 1), (4, 5, 3), (7, 8, 3)]
)
def test_extended_topology(leaf: int, vcpu_id: int, num_vcpus: int, shift: int) -> None:
    out = vcpu_cpuid(supported(cpuid.VENDOR_INTEL), vcpu_id, num_vcpus, tsc_deadline=True)
    subleaves = sorted((e for e in out if e.function == leaf), key=lambda e: e.index)
    assert [e.index for e in subleaves] == [0, 1, 2]
    smt, core, end = subleaves
    assert all(e.flags & SIG for e in subleaves)
    assert all(e.edx == vcpu_id for e in subleaves)
    assert (smt.eax & 0x1F, smt.ebx & 0xFFFF, smt.ecx) == (0, 1, 0x100)
    assert (core.eax & 0x1F, core.ebx & 0xFFFF, core.ecx) == (shift, num_vcpus, 0x201)
    assert (end.eax, end.ebx, (end.ecx >> 8) & 0xFF, end.ecx & 0xFF) == (0, 0, 0, 2)
    # The APIC id is consistent with the topology: package id 0, core id = vcpu id.
    assert vcpu_id >> core.eax == 0


def test_topology_leaves_not_invented() -> None:
    base = [e for e in supported(cpuid.VENDOR_INTEL) if e.function not in (0xB, 0x1F)]
    out = vcpu_cpuid(base, 0, 2, tsc_deadline=True)
    assert not [e for e in out if e.function in (0xB, 0x1F)]


@pytest.mark.parametrize("num_vcpus", [1, 2, 6])
def test_cache_leaf_cores_and_sharing(num_vcpus: int) -> None:
    out = vcpu_cpuid(supported(cpuid.VENDOR_INTEL), 0, num_vcpus, tsc_deadline=True)
    caches = {e.index: e for e in out if e.function == 4}
    for index in (0, 1, 2, 3):
        assert caches[index].eax >> 26 == num_vcpus - 1
        assert caches[index].eax & 0x3FFF == supported(cpuid.VENDOR_INTEL)[2 + index].eax & 0x3FFF
    for index in (0, 1, 2):  # L1 and L2: one thread per core
        assert (caches[index].eax >> 14) & 0xFFF == 0
    assert (caches[3].eax >> 14) & 0xFFF == num_vcpus - 1  # L3 shared by all
    assert caches[4].eax == 0  # the terminator stays


def test_power_management_cleared() -> None:
    out = vcpu_cpuid(supported(cpuid.VENDOR_AMD), 0, 2, tsc_deadline=True)
    leaf6 = find(out, 6)
    assert leaf6 is not None
    assert (leaf6.eax, leaf6.ebx, leaf6.ecx, leaf6.edx) == (cpuid.EAX_ARAT, 0, 0, 0)
    apm = find(out, 0x8000_0007)
    assert apm is not None and apm.edx == cpuid.EDX_INVARIANT_TSC


def test_kvm_signature_and_features() -> None:
    base = supported(cpuid.VENDOR_INTEL)
    out = vcpu_cpuid(base, 0, 1, tsc_deadline=True)
    sig = find(out, 0x4000_0000)
    assert sig is not None
    raw = b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx))
    assert raw == b"KVMKVMKVM\0\0\0"
    assert sig.eax >= 0x4000_0001
    kvm_features = find(out, 0x4000_0001)
    offered = find(base, 0x4000_0001)
    assert kvm_features is not None and offered is not None
    # kvmclock and the other paravirtual features are kept; asynchronous page faults are not.
    assert kvm_features.eax == offered.eax & ~(1 << 4 | 1 << 10 | 1 << 14)
    assert offered.eax & (1 << 4 | 1 << 14) and kvm_features.eax & (1 << 3 | 1 << 24)


def test_kvm_signature_added_when_missing() -> None:
    base = [e for e in supported(cpuid.VENDOR_INTEL) if e.function < 0x4000_0000]
    out = vcpu_cpuid(base, 0, 1, tsc_deadline=True)
    sig = find(out, 0x4000_0000)
    assert sig is not None and sig.ebx == int.from_bytes(b"KVMK", "little")
    assert find(out, 0x4000_0001) is not None


@pytest.mark.parametrize(
    ("vcpu_id", "num_vcpus", "size"), [(0, 1, 0), (1, 2, 1), (2, 3, 2), (8, 9, 4)]
)
def test_amd_core_count_and_topology(vcpu_id: int, num_vcpus: int, size: int) -> None:
    out = vcpu_cpuid(supported(cpuid.VENDOR_AMD), vcpu_id, num_vcpus, tsc_deadline=True)
    sizes = find(out, 0x8000_0008)
    assert sizes is not None
    assert sizes.ecx & 0xFF == num_vcpus - 1
    assert (sizes.ecx >> 12) & 0xF == size
    assert sizes.eax == 0x3030
    topo = find(out, 0x8000_001E)
    assert topo is not None
    assert topo.eax == vcpu_id
    assert topo.ebx & 0xFF == vcpu_id
    assert (topo.ebx >> 8) & 0xFF == 0  # one thread per compute unit
    assert topo.ecx & 0x7FF == 0


def test_intel_leaves_8000_0008_untouched() -> None:
    base = supported(cpuid.VENDOR_INTEL)
    out = vcpu_cpuid(base, 1, 2, tsc_deadline=True)
    assert find(out, 0x8000_0008) == find(base, 0x8000_0008)


def test_other_leaves_pass_through_in_order() -> None:
    base = supported(cpuid.VENDOR_INTEL)
    out = vcpu_cpuid(base, 0, 2, tsc_deadline=True)
    keys = [(e.function, e.index) for e in base]
    # Leaf 0xB gains its terminating subleaf 2; everything else keeps its place.
    keys.insert(keys.index((0xB, 1)) + 1, (0xB, 2))
    assert [(e.function, e.index) for e in out] == keys
    assert out[0] == base[0]
    assert find(out, 0x8000_0000) == find(base, 0x8000_0000)


@pytest.mark.parametrize(("vcpu_id", "num_vcpus"), [(0, 0), (2, 2), (-1, 2)])
def test_bad_vcpu_numbers(vcpu_id: int, num_vcpus: int) -> None:
    with pytest.raises(ValueError):
        vcpu_cpuid(supported(cpuid.VENDOR_INTEL), vcpu_id, num_vcpus, tsc_deadline=True)


def test_vendor_and_kvm_round_trip() -> None:
    base = supported(cpuid.VENDOR_AMD)
    assert cpuid.vendor(base) == b"AuthenticAMD"
    assert cpuid.vendor([]) == b""
    assert cpuid.from_kvm(cpuid.to_kvm(base)) == base


def test_has_mtrr() -> None:
    base = supported(cpuid.VENDOR_INTEL)
    assert cpuid.has_mtrr(base)  # leaf 1 EDX 0x1FCBFBFF has bit 12
    base[1] = CpuidEntry(1, 0, 0, 0, 0, 0, 0x1FCB_FBFF & ~cpuid.EDX_MTRR)
    assert not cpuid.has_mtrr(base)
    assert not cpuid.has_mtrr([])


@pytest.mark.parametrize("num_vcpus", [1, 3])
def test_amd_cache_topology_sharing(num_vcpus: int) -> None:
    base = supported(cpuid.VENDOR_AMD)
    out = vcpu_cpuid(base, 0, num_vcpus, tsc_deadline=True)
    caches = {e.index: e for e in out if e.function == 0x8000_001D}
    assert [(caches[i].eax >> 14) & 0xFFF for i in (0, 1, 2)] == [0, 0, num_vcpus - 1]
    for i in (0, 1, 2):
        original = find(base, 0x8000_001D, i)
        assert original is not None
        assert caches[i].eax & 0x3FFF == original.eax & 0x3FFF
        assert caches[i].eax >> 26 == original.eax >> 26  # no cores field on AMD
    assert caches[3].eax == 0


def test_no_nested_virtualization_is_offered() -> None:
    entries = [
        *supported(cpuid.VENDOR_AMD),
        CpuidEntry(0x8000_0001, 0, 0, 0, 0, 0x0000_0003 | cpuid.ECX_SVM, 0),
        CpuidEntry(0x8000_000A, 0, 0, 1, 0x8000, 0, 0x1FF),
    ]
    leaf1 = find(supported(cpuid.VENDOR_INTEL), 0x1)
    assert leaf1 is not None
    with_vmx = [CpuidEntry(0x1, 0, 0, leaf1.eax, leaf1.ebx, leaf1.ecx | cpuid.ECX_VMX, leaf1.edx)]
    intel = find(vcpu_cpuid(with_vmx, 0, 1, tsc_deadline=True), 0x1)
    assert intel is not None and not intel.ecx & cpuid.ECX_VMX
    result = vcpu_cpuid(entries, 0, 1, tsc_deadline=True)
    extended = find(result, 0x8000_0001)
    svm = find(result, 0x8000_000A)
    assert extended is not None and extended.ecx == 0x3
    assert svm is not None and (svm.eax, svm.ebx, svm.ecx, svm.edx) == (0, 0, 0, 0)
