"""Pin nubis.kvm.bindings and nubis.kvm.ioctls to <linux/kvm.h>.

The expected values were compiled from the kernel UAPI header (x86_64, gcc ``sizeof`` and
``offsetof``); a wrong field type or order in a ctypes declaration changes one of them.
"""

from __future__ import annotations

import ctypes

import pytest

from nubis.kvm import bindings as b
from nubis.kvm import ioctls

SIZES = {
    "kvm_userspace_memory_region": 32,
    "kvm_regs": 144,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_sregs": 312,
    "kvm_fpu": 416,
    "kvm_msr_entry": 16,
    "kvm_msrs": 8,
    "kvm_cpuid_entry2": 40,
    "kvm_cpuid2": 8,
    "kvm_lapic_state": 1024,
    "kvm_irqchip": 520,
    "kvm_pit_config": 64,
    "kvm_pit_state2": 112,
    "kvm_clock_data": 48,
    "kvm_vcpu_events": 64,
    "kvm_mp_state": 4,
    "kvm_xsave": 4096,
    "kvm_xcrs": 392,
    "kvm_irqfd": 32,
    "kvm_ioeventfd": 64,
    "kvm_irq_routing": 8,
    "kvm_irq_routing_entry": 48,
    "kvm_msi": 32,
    "kvm_dirty_log": 16,
    "kvm_irq_level": 8,
    "kvm_enable_cap": 104,
    "kvm_run": 2352,
    "kvm_pic_state": 16,
    "kvm_ioapic_state": 216,
    "kvm_sync_regs": 520,
}

# "struct.field.subfield": byte offset from the start of the struct.
OFFSETS = {
    "kvm_run.immediate_exit": 1,
    "kvm_run.exit_reason": 8,
    "kvm_run.if_flag": 13,
    "kvm_run.cr8": 16,
    "kvm_run.apic_base": 24,
    "kvm_run.io": 32,
    "kvm_run.io.size": 33,
    "kvm_run.io.port": 34,
    "kvm_run.io.count": 36,
    "kvm_run.io.data_offset": 40,
    "kvm_run.mmio.phys_addr": 32,
    "kvm_run.mmio.data": 40,
    "kvm_run.mmio.len": 48,
    "kvm_run.mmio.is_write": 52,
    "kvm_run.internal.suberror": 32,
    "kvm_run.internal.ndata": 36,
    "kvm_run.internal.data": 40,
    "kvm_run.system_event.type": 32,
    "kvm_run.system_event.ndata": 36,
    "kvm_run.system_event.data": 40,
    "kvm_run.fail_entry.cpu": 40,
    "kvm_run.hypercall.ret": 88,
    "kvm_run.kvm_valid_regs": 288,
    "kvm_run.s": 304,
    "kvm_sregs.gdt": 192,
    "kvm_sregs.cr0": 224,
    "kvm_sregs.efer": 264,
    "kvm_sregs.apic_base": 272,
    "kvm_sregs.interrupt_bitmap": 280,
    "kvm_fpu.fcw": 128,
    "kvm_fpu.last_ip": 136,
    "kvm_fpu.xmm": 152,
    "kvm_fpu.mxcsr": 408,
    "kvm_vcpu_events.sipi_vector": 16,
    "kvm_vcpu_events.flags": 20,
    "kvm_vcpu_events.smi": 24,
    "kvm_vcpu_events.triple_fault": 28,
    "kvm_vcpu_events.exception_has_payload": 55,
    "kvm_vcpu_events.exception_payload": 56,
    "kvm_ioeventfd.len": 16,
    "kvm_ioeventfd.fd": 20,
    "kvm_ioeventfd.flags": 24,
    "kvm_irq_routing_entry.u": 16,
    "kvm_xcrs.xcrs": 8,
    "kvm_xcrs.padding": 264,
    "kvm_pit_state2.flags": 72,
    "kvm_clock_data.realtime": 16,
    "kvm_ioapic_state.redirtbl": 24,
    "kvm_irqchip.chip": 8,
}

IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_IRQ_LINE_STATUS": 0xC008AE67,
    "KVM_SET_GSI_ROUTING": 0x4008AE6A,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_SIGNAL_MSI": 0x4020AEA5,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_NMI": 0xAE9A,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_GET_TSC_KHZ": 0xAEA3,
}

_UNION_MEMBERS = {"io", "mmio", "internal", "system_event", "fail_entry", "hypercall"}


def _offset(path: str) -> int:
    struct_name, *fields = path.split(".")
    cls: type[ctypes._CData] = getattr(b, struct_name)
    if struct_name == "kvm_run" and fields[0] in _UNION_MEMBERS:
        fields = ["u", *fields]
    if struct_name == "kvm_vcpu_events" and fields == ["triple_fault"]:
        fields = ["triple_fault_pending"]
    offset = 0
    for name in fields:
        offset += getattr(cls, name).offset
        cls = dict(cls._fields_)[name]  # type: ignore[attr-defined]
    return offset


@pytest.mark.parametrize(("name", "size"), sorted(SIZES.items()))
def test_struct_size(name: str, size: int) -> None:
    assert ctypes.sizeof(getattr(b, name)) == size


@pytest.mark.parametrize(("path", "offset"), sorted(OFFSETS.items()))
def test_field_offset(path: str, offset: int) -> None:
    assert _offset(path) == offset


@pytest.mark.parametrize(("name", "number"), sorted(IOCTLS.items()))
def test_ioctl_number(name: str, number: int) -> None:
    assert getattr(ioctls, name) == number


def test_well_known_numbers() -> None:
    assert ioctls.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert ioctls.KVM_RUN == 0xAE80
    assert ioctls.KVM_GET_SREGS == 0x8138AE83
    assert ctypes.sizeof(b.kvm_sregs) == 312
    assert ctypes.sizeof(b.kvm_regs) == 144
    assert ctypes.sizeof(b.kvm_lapic_state) == 1024
    assert ctypes.sizeof(b.kvm_xsave) == 4096
    assert b.kvm_run.immediate_exit.offset == 1
    assert b.kvm_run.exit_reason.offset == 8
    assert b.kvm_run.u.offset == 32


def test_variable_length_buffers() -> None:
    assert ctypes.sizeof(b.msrs_buffer(3)) == 8 + 3 * 16
    assert ctypes.sizeof(b.cpuid_buffer(2)) == 8 + 2 * 40
    assert ctypes.sizeof(b.msr_list_buffer(5)) == 4 + 5 * 4
    assert ctypes.sizeof(b.irq_routing_buffer(4)) == 8 + 4 * 48
    assert b.irq_routing_buffer(1).entries.offset == 8


def test_ioc_rejects_oversized_argument() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        ioctls._IOC(ioctls._IOC_READ, b.KVMIO, 1, 1 << 14)


def test_exit_reason_values() -> None:
    assert int(b.ExitReason.IO) == 2
    assert int(b.ExitReason.MMIO) == 6
    assert int(b.ExitReason.SHUTDOWN) == 8
    assert int(b.ExitReason.INTERNAL_ERROR) == 17
    assert int(b.ExitReason.SYSTEM_EVENT) == 24
    assert int(b.Cap.IMMEDIATE_EXIT) == 136
    assert int(b.Cap.READONLY_MEM) == 81


def test_run_decoder_reads_exit_reason_and_io_from_the_kernel_offsets() -> None:
    from nubis.kvm.vcpu import _REASON_AND_IO

    run = b.kvm_run()
    run.exit_reason = b.ExitReason.IO
    run.u.io.direction, run.u.io.size, run.u.io.port = 1, 2, 0x3F8
    run.u.io.count, run.u.io.data_offset = 3, 4096
    assert _REASON_AND_IO.unpack_from(bytes(run), b.kvm_run.exit_reason.offset) == (
        2,
        1,
        2,
        0x3F8,
        3,
        4096,
    )
