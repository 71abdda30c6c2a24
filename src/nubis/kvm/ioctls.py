"""KVM ioctl request numbers, computed the way ``<asm-generic/ioctl.h>`` computes them.

A request number packs direction, argument size, type (``KVMIO`` = 0xAE) and command number::

    bits 31-30 direction (_IOC_WRITE = 1, _IOC_READ = 2), bits 29-16 size, 15-8 type, 7-0 nr

Sizes come from the ctypes structures in ``nubis.kvm.bindings`` (``ctypes.sizeof``), never from
literal numbers, so a layout mistake shows up as a wrong request number in the unit tests. The
command numbers are those of ``include/uapi/linux/kvm.h`` (api.rst section 4 lists each ioctl).
"""

from __future__ import annotations

import ctypes

from nubis.kvm import bindings as b

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """Pack an ioctl request number from its four fields."""
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    """An ioctl with no argument struct."""
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, argtype: type[ctypes._CData]) -> int:
    """An ioctl whose argument the kernel writes (userspace reads)."""
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(argtype))


def _IOW(type_: int, nr: int, argtype: type[ctypes._CData]) -> int:
    """An ioctl whose argument the kernel reads (userspace writes)."""
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(argtype))


def _IOWR(type_: int, nr: int, argtype: type[ctypes._CData]) -> int:
    """An ioctl whose argument goes both ways."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(argtype))


KVMIO: Final = b.KVMIO

# /dev/kvm (system) ioctls.
KVM_GET_API_VERSION: Final = _IO(KVMIO, 0x00)
KVM_CREATE_VM: Final = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST: Final = _IOWR(KVMIO, 0x02, b.kvm_msr_list)
KVM_CHECK_EXTENSION: Final = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID: Final = _IOWR(KVMIO, 0x05, b.kvm_cpuid2)

# VM ioctls.
KVM_CREATE_VCPU: Final = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG: Final = _IOW(KVMIO, 0x42, b.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION: Final = _IOW(KVMIO, 0x46, b.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR: Final = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = _IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP: Final = _IO(KVMIO, 0x60)
KVM_IRQ_LINE: Final = _IOW(KVMIO, 0x61, b.kvm_irq_level)
KVM_GET_IRQCHIP: Final = _IOWR(KVMIO, 0x62, b.kvm_irqchip)
KVM_SET_IRQCHIP: Final = _IOR(KVMIO, 0x63, b.kvm_irqchip)
KVM_IRQ_LINE_STATUS: Final = _IOWR(KVMIO, 0x67, b.kvm_irq_level)
KVM_SET_GSI_ROUTING: Final = _IOW(KVMIO, 0x6A, b.kvm_irq_routing)
KVM_IRQFD: Final = _IOW(KVMIO, 0x76, b.kvm_irqfd)
KVM_CREATE_PIT2: Final = _IOW(KVMIO, 0x77, b.kvm_pit_config)
KVM_IOEVENTFD: Final = _IOW(KVMIO, 0x79, b.kvm_ioeventfd)
KVM_SET_CLOCK: Final = _IOW(KVMIO, 0x7B, b.kvm_clock_data)
KVM_GET_CLOCK: Final = _IOR(KVMIO, 0x7C, b.kvm_clock_data)
KVM_GET_PIT2: Final = _IOR(KVMIO, 0x9F, b.kvm_pit_state2)
KVM_SET_PIT2: Final = _IOW(KVMIO, 0xA0, b.kvm_pit_state2)
KVM_SIGNAL_MSI: Final = _IOW(KVMIO, 0xA5, b.kvm_msi)

# VM and vCPU ioctls.
KVM_ENABLE_CAP: Final = _IOW(KVMIO, 0xA3, b.kvm_enable_cap)

# vCPU ioctls.
KVM_RUN: Final = _IO(KVMIO, 0x80)
KVM_GET_REGS: Final = _IOR(KVMIO, 0x81, b.kvm_regs)
KVM_SET_REGS: Final = _IOW(KVMIO, 0x82, b.kvm_regs)
KVM_GET_SREGS: Final = _IOR(KVMIO, 0x83, b.kvm_sregs)
KVM_SET_SREGS: Final = _IOW(KVMIO, 0x84, b.kvm_sregs)
KVM_GET_MSRS: Final = _IOWR(KVMIO, 0x88, b.kvm_msrs)
KVM_SET_MSRS: Final = _IOW(KVMIO, 0x89, b.kvm_msrs)
KVM_GET_FPU: Final = _IOR(KVMIO, 0x8C, b.kvm_fpu)
KVM_SET_FPU: Final = _IOW(KVMIO, 0x8D, b.kvm_fpu)
KVM_GET_LAPIC: Final = _IOR(KVMIO, 0x8E, b.kvm_lapic_state)
KVM_SET_LAPIC: Final = _IOW(KVMIO, 0x8F, b.kvm_lapic_state)
KVM_SET_CPUID2: Final = _IOW(KVMIO, 0x90, b.kvm_cpuid2)
KVM_GET_CPUID2: Final = _IOWR(KVMIO, 0x91, b.kvm_cpuid2)
KVM_GET_MP_STATE: Final = _IOR(KVMIO, 0x98, b.kvm_mp_state)
KVM_SET_MP_STATE: Final = _IOW(KVMIO, 0x99, b.kvm_mp_state)
KVM_NMI: Final = _IO(KVMIO, 0x9A)
KVM_GET_VCPU_EVENTS: Final = _IOR(KVMIO, 0x9F, b.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS: Final = _IOW(KVMIO, 0xA0, b.kvm_vcpu_events)
KVM_GET_XSAVE: Final = _IOR(KVMIO, 0xA4, b.kvm_xsave)
KVM_SET_XSAVE: Final = _IOW(KVMIO, 0xA5, b.kvm_xsave)
KVM_GET_XCRS: Final = _IOR(KVMIO, 0xA6, b.kvm_xcrs)
KVM_SET_XCRS: Final = _IOW(KVMIO, 0xA7, b.kvm_xcrs)
KVM_GET_TSC_KHZ: Final = _IO(KVMIO, 0xA3)
