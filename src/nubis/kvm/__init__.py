"""The only code that issues KVM ioctls: ctypes structures of <linux/kvm.h>, `Kvm`, `VmFd`, `VcpuFd`, typed exits.

The kvm-bindings and kvm-ioctls counterpart (see the kernel's Documentation/virt/kvm/api.rst):
`nubis.kvm.bindings` declares the structures, `nubis.kvm.ioctls` the request numbers,
`Kvm` / `VmFd` / `VcpuFd` wrap the three kinds of fd, and `VcpuFd.run()` returns the exits of
`nubis.kvm.exits`.
"""

from nubis.kvm.bindings import Cap, ExitReason, MpState, SystemEventType
from nubis.kvm.error import KvmError, KvmUnsupportedError
from nubis.kvm.exits import (
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    OtherExit,
    Shutdown,
    SystemEvent,
    VcpuExit,
)
from nubis.kvm.system import REQUIRED_CAPABILITIES, Kvm
from nubis.kvm.vcpu import VcpuFd
from nubis.kvm.vm import IrqchipRoute, IrqRoute, MsiRoute, VmFd

__all__ = [
    "REQUIRED_CAPABILITIES",
    "Cap",
    "ExitReason",
    "FailEntry",
    "Hlt",
    "InternalError",
    "Interrupted",
    "IoIn",
    "IoOut",
    "IrqRoute",
    "IrqchipRoute",
    "Kvm",
    "KvmError",
    "KvmUnsupportedError",
    "MmioRead",
    "MmioWrite",
    "MpState",
    "MsiRoute",
    "OtherExit",
    "Shutdown",
    "SystemEvent",
    "SystemEventType",
    "VcpuExit",
    "VcpuFd",
    "VmFd",
]
