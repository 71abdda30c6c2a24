"""Local APIC LINT0/LINT1 setup and the initial FPU state of a vCPU.

A PC routes the 8259 PIC's output to every local APIC's LINT0 pin as ExtINT and NMIs to LINT1
as NMI (the "virtual wire" mode of the MultiProcessor Specification 1.4 §3.6.2.2). KVM's
in-kernel APIC comes out of reset with both LVT entries masked, which is what the hardware does
(Intel SDM Vol. 3A §11.5.1, figure 11-8, "Local Vector Table"), so nubis programs the delivery
mode of each, as firmware would, through ``KVM_GET_LAPIC``/``KVM_SET_LAPIC`` (KVM API document
§4.57): bits 10:8 of LVT LINT0 (register offset 0x350) become ExtINT (0b111) and those of LVT
LINT1 (0x360) NMI (0b100). The rest of each register is kept.

The FPU starts as ``FNINIT`` and the power-on MXCSR leave it (SDM Vol. 1 §8.1.5 and §10.2.3.1):
control word 0x37f (all exceptions masked, 64-bit precision, round to nearest) and MXCSR 0x1f80
(all SIMD exceptions masked).
"""

from __future__ import annotations

import ctypes
import struct

from nubis._typing import Protocol
from nubis.kvm import bindings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

APIC_LVT_LINT0: Final = 0x350
APIC_LVT_LINT1: Final = 0x360
APIC_DELIVERY_MODE_MASK: Final = 0x700
APIC_MODE_NMI: Final = 0b100
APIC_MODE_EXTINT: Final = 0b111

FPU_CONTROL_WORD: Final = 0x37F
FPU_MXCSR: Final = 0x1F80

_U32: Final = struct.Struct("<I")


class LapicVcpu(Protocol):
    """The LAPIC and FPU ioctls of a vCPU (``nubis.kvm.VcpuFd`` has them)."""

    def get_lapic(self) -> bindings.kvm_lapic_state:
        """KVM_GET_LAPIC."""
        ...

    def set_lapic(self, lapic: bindings.kvm_lapic_state) -> None:
        """KVM_SET_LAPIC."""
        ...

    def set_fpu(self, fpu: bindings.kvm_fpu) -> None:
        """KVM_SET_FPU."""
        ...


def with_delivery_mode(lvt: int, mode: int) -> int:
    """The LVT register value ``lvt`` with its delivery mode (bits 10:8) set to ``mode``."""
    return (lvt & ~APIC_DELIVERY_MODE_MASK) | (mode & 0x7) << 8


def program_lint(regs: bytes) -> bytes:
    """The LAPIC register page ``regs`` with LINT0 as ExtINT and LINT1 as NMI delivery."""
    page = bytearray(regs)
    if len(page) < APIC_LVT_LINT1 + 4:
        raise ValueError(f"a LAPIC register page of {len(page)} bytes has no LVT LINT1")
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        (value,) = _U32.unpack_from(page, offset)
        _U32.pack_into(page, offset, with_delivery_mode(value, mode))
    return bytes(page)


def boot_fpu() -> bindings.kvm_fpu:
    """The initial x87/SSE state: control word 0x37f, MXCSR 0x1f80, everything else zero."""
    return bindings.kvm_fpu(fcw=FPU_CONTROL_WORD, mxcsr=FPU_MXCSR)


def setup_fpu(vcpu: LapicVcpu) -> None:
    """Load the initial FPU state into ``vcpu``."""
    vcpu.set_fpu(boot_fpu())


def setup_lint(vcpu: LapicVcpu) -> None:
    """Program ``vcpu``'s LVT LINT0 as ExtINT and LINT1 as NMI (needs the local APIC in KVM)."""
    state = vcpu.get_lapic()
    # The register page is a char array: read and write it as raw memory, because ctypes
    # turns a char array field into bytes that stop at the first NUL.
    regs = program_lint(ctypes.string_at(ctypes.addressof(state), ctypes.sizeof(state)))
    ctypes.memmove(ctypes.addressof(state), regs, len(regs))
    vcpu.set_lapic(state)
