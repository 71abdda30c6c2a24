"""vCPU and VM state round-trips through the KVM ioctls, system queries and error messages."""

from __future__ import annotations

import ctypes
import os

import pytest
from kvm_guest import TinyVm

from nubis.kvm import (
    Cap,
    IrqchipRoute,
    IrqRoute,
    Kvm,
    KvmError,
    KvmUnsupportedError,
    MpState,
    MsiRoute,
)
from nubis.kvm import bindings as b

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(30)]

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_TSC = 0x10
APIC_LVT0 = 0x350


def test_api_version_and_queries(kvm: Kvm) -> None:
    assert kvm.get_api_version() == 12
    assert kvm.get_vcpu_mmap_size() >= ctypes.sizeof(b.kvm_run)
    assert kvm.get_nr_vcpus() >= 1
    assert kvm.get_max_vcpus() >= kvm.get_nr_vcpus()
    assert kvm.check_extension(Cap.USER_MEMORY)
    leaves = {entry.function for entry in kvm.get_supported_cpuid()}
    assert 0 in leaves and 1 in leaves
    assert MSR_IA32_SYSENTER_CS in kvm.get_msr_index_list()


def test_missing_capability_is_named(kvm: Kvm) -> None:
    class FakeCap(int):
        name = "NUBIS_TEST_CAPABILITY"

    with pytest.raises(KvmUnsupportedError, match="KVM_CAP_NUBIS_TEST_CAPABILITY"):
        Kvm(required=[FakeCap(100_000)])  # type: ignore[list-item]


def test_opening_a_missing_device_says_which() -> None:
    with pytest.raises(KvmError, match="opening /nonexistent/kvm"):
        Kvm("/nonexistent/kvm")


def test_regs_round_trip(tiny_vm: TinyVm) -> None:
    regs = tiny_vm.vcpu.get_regs()
    regs.rax, regs.r15, regs.rip, regs.rflags = 0x1122334455667788, 0xDEAD, 0x1234, 0x202
    tiny_vm.vcpu.set_regs(regs)
    again = tiny_vm.vcpu.get_regs()
    assert (again.rax, again.r15, again.rip, again.rflags) == (
        0x1122334455667788,
        0xDEAD,
        0x1234,
        0x202,
    )


def test_sregs_round_trip(tiny_vm: TinyVm) -> None:
    sregs = tiny_vm.vcpu.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = 0x500, 0x1F
    sregs.ds.base, sregs.ds.selector = 0x30000, 0x3000
    tiny_vm.vcpu.set_sregs(sregs)
    again = tiny_vm.vcpu.get_sregs()
    assert (again.gdt.base, again.gdt.limit) == (0x500, 0x1F)
    assert (again.ds.base, again.ds.selector) == (0x30000, 0x3000)


def test_a_fresh_vcpu_is_at_the_reset_vector_until_moved(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        try:
            assert vcpu.at_reset_vector()
            regs = vcpu.get_regs()
            regs.rip = 0x1000
            vcpu.set_regs(regs)
            assert not vcpu.at_reset_vector()
        finally:
            vcpu.close()
    finally:
        vm.close()


def test_fpu_round_trip(tiny_vm: TinyVm) -> None:
    fpu = tiny_vm.vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.xmm[3][0] = 0xAB
    tiny_vm.vcpu.set_fpu(fpu)
    again = tiny_vm.vcpu.get_fpu()
    assert (again.fcw, again.xmm[3][0]) == (0x37F, 0xAB)


def test_msrs_round_trip(tiny_vm: TinyVm) -> None:
    tiny_vm.vcpu.set_msrs({MSR_IA32_SYSENTER_CS: 0x10, MSR_IA32_SYSENTER_ESP: 0x8000})
    values = tiny_vm.vcpu.get_msrs([MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP])
    assert values == {MSR_IA32_SYSENTER_CS: 0x10, MSR_IA32_SYSENTER_ESP: 0x8000}


def test_unknown_msr_is_named(tiny_vm: TinyVm) -> None:
    with pytest.raises(KvmError, match="MSR 0xdeadbeef"):
        tiny_vm.vcpu.get_msrs([MSR_IA32_TSC, 0xDEADBEEF])


def test_cpuid_can_be_set_from_the_supported_list(kvm: Kvm, tiny_vm: TinyVm) -> None:
    tiny_vm.vcpu.set_cpuid2(kvm.get_supported_cpuid())


def test_lapic_round_trip(tiny_vm_irqchip: TinyVm) -> None:
    lapic = tiny_vm_irqchip.vcpu.get_lapic()
    raw = bytearray(bytes(lapic.regs))
    raw[APIC_LVT0 : APIC_LVT0 + 4] = (0x700).to_bytes(4, "little")  # ExtINT, unmasked
    tiny_vm_irqchip.vcpu.set_lapic(b.kvm_lapic_state.from_buffer_copy(raw))
    again = bytes(tiny_vm_irqchip.vcpu.get_lapic().regs)
    assert int.from_bytes(again[APIC_LVT0 : APIC_LVT0 + 4], "little") & 0x1_07FF == 0x700


def test_mp_state_round_trip(tiny_vm_irqchip: TinyVm) -> None:
    assert tiny_vm_irqchip.vcpu.get_mp_state() == MpState.RUNNABLE
    tiny_vm_irqchip.vcpu.set_mp_state(MpState.HALTED)
    assert tiny_vm_irqchip.vcpu.get_mp_state() == MpState.HALTED


def test_vcpu_events_round_trip(tiny_vm: TinyVm) -> None:
    events = tiny_vm.vcpu.get_vcpu_events()
    events.nmi.pending = 1
    events.flags = b.KVM_VCPUEVENT_VALID_NMI_PENDING
    tiny_vm.vcpu.set_vcpu_events(events)
    assert tiny_vm.vcpu.get_vcpu_events().nmi.pending == 1


def test_xsave_and_xcrs_round_trip(tiny_vm: TinyVm) -> None:
    xsave = tiny_vm.vcpu.get_xsave()
    tiny_vm.vcpu.set_xsave(xsave)
    assert bytes(tiny_vm.vcpu.get_xsave())[:512] == bytes(xsave)[:512]
    xcrs = tiny_vm.vcpu.get_xcrs()
    assert xcrs.nr_xcrs >= 1
    assert xcrs.xcrs[0].value & 1  # x87 state is always enabled in XCR0
    tiny_vm.vcpu.set_xcrs(xcrs)


def test_irqchip_pit_and_clock_round_trip(tiny_vm_irqchip: TinyVm) -> None:
    vm = tiny_vm_irqchip.vm
    vm.create_pit2()
    ioapic = vm.get_irqchip(b.KVM_IRQCHIP_IOAPIC)
    ioapic.chip.ioapic.redirtbl[4] = 0x30  # vector 0x30, unmasked
    vm.set_irqchip(ioapic)
    assert vm.get_irqchip(b.KVM_IRQCHIP_IOAPIC).chip.ioapic.redirtbl[4] & 0x1_00FF == 0x30
    pit = vm.get_pit2()
    vm.set_pit2(pit)
    clock = vm.get_clock()
    clock.clock += 1_000_000_000
    clock.flags = 0
    vm.set_clock(clock)
    assert vm.get_clock().clock >= clock.clock


def test_gsi_routing_and_msi(tiny_vm_irqchip: TinyVm) -> None:
    vm = tiny_vm_irqchip.vm
    routes: list[IrqRoute] = [IrqchipRoute(gsi, b.KVM_IRQCHIP_IOAPIC, gsi) for gsi in range(24)]
    routes.append(MsiRoute(24, 0xFEE0_0000, 0x41))
    vm.set_gsi_routing(routes)
    irq_fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        vm.register_irqfd(irq_fd, 24)
        os.eventfd_write(irq_fd, 1)
        vm.unregister_irqfd(irq_fd, 24)
    finally:
        os.close(irq_fd)
    vm.signal_msi(0xFEE0_0000, 0x42)


def test_resample_irqfd_registers(tiny_vm_irqchip: TinyVm) -> None:
    irq_fd = os.eventfd(0, os.EFD_CLOEXEC)
    resample_fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        tiny_vm_irqchip.vm.register_irqfd(irq_fd, 10, resample_fd=resample_fd)
        tiny_vm_irqchip.vm.unregister_irqfd(irq_fd, 10)
    finally:
        os.close(irq_fd)
        os.close(resample_fd)


def test_errors_name_the_ioctl_and_errno(tiny_vm: TinyVm) -> None:
    with pytest.raises(KvmError) as info:
        tiny_vm.vcpu.get_lapic()  # no irqchip
    assert "KVM_GET_LAPIC failed" in str(info.value)
    assert info.value.errno is not None and info.value.errno > 0
    with pytest.raises(KvmError, match=r"KVM_SET_USER_MEMORY_REGION failed \(slot 0"):
        tiny_vm.vm.set_user_memory_region(0, 0x1001, 0x1000, 0)


def test_identity_map_and_tss_address(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.set_identity_map_address(0xFFFB_C000)
        vm.set_tss_address(0xFFFB_D000)
