"""`Kvm`: the ``/dev/kvm`` system fd: API version, capabilities, CPUID and MSR lists, VMs.

nubis needs KVM API version 12 (api.rst 4.1) and the capabilities in `REQUIRED_CAPABILITIES`;
opening checks both and names whatever is missing, so an unsuitable host fails at start with
one sentence instead of in the middle of building a VM.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from nubis.kvm import bindings as b
from nubis.kvm import ioctls as io
from nubis.kvm.bindings import Cap
from nubis.kvm.error import KvmError, KvmUnsupportedError, ioctl_struct, kvm_ioctl
from nubis.kvm.vm import VmFd

__all__ = ["REQUIRED_CAPABILITIES", "Kvm"]

REQUIRED_CAPABILITIES: tuple[Cap, ...] = (
    Cap.IRQCHIP,
    Cap.HLT,
    Cap.USER_MEMORY,
    Cap.SET_TSS_ADDR,
    Cap.EXT_CPUID,
    Cap.MP_STATE,
    Cap.IRQ_ROUTING,
    Cap.IRQFD,
    Cap.IOEVENTFD,
    Cap.PIT2,
    Cap.SIGNAL_MSI,
    Cap.IMMEDIATE_EXIT,
    Cap.VCPU_EVENTS,
)

_MAX_MSR_INDICES = 1024


class Kvm:
    """An open ``/dev/kvm``; close it (or use ``with``) when done. VMs outlive it."""

    def __init__(
        self, path: str = "/dev/kvm", required: Iterable[Cap] = REQUIRED_CAPABILITIES
    ) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"opening {path}", exc.errno or errno.ENODEV) from None
        self._closed = False
        try:
            version = self.get_api_version()
            if version != b.KVM_API_VERSION:
                raise KvmUnsupportedError(
                    f"{path} speaks KVM API version {version}, but nubis needs "
                    f"version {b.KVM_API_VERSION}."
                )
            for cap in required:
                if not self.check_extension(cap):
                    raise KvmUnsupportedError(
                        f"{path} lacks KVM_CAP_{cap.name} (capability {int(cap)}), which "
                        "nubis needs."
                    )
            self._mmap_size = self.get_vcpu_mmap_size()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close ``/dev/kvm`` (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION (always 12 on a kernel nubis can use)."""
        return kvm_ioctl(self.fd, io.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when ``cap`` is unsupported, else a positive value."""
        return kvm_ioctl(self.fd, io.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to map from a vCPU fd (kvm_run plus the PIO page)."""
        return kvm_ioctl(self.fd, io.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def get_nr_vcpus(self) -> int:
        """The recommended maximum vCPUs per VM (KVM_CAP_NR_VCPUS, 4 if unreported)."""
        return self.check_extension(Cap.NR_VCPUS) or 4

    def get_max_vcpus(self) -> int:
        """The hard maximum vCPUs per VM (KVM_CAP_MAX_VCPUS, else the recommended one)."""
        return self.check_extension(Cap.MAX_VCPUS) or self.get_nr_vcpus()

    def get_nr_memslots(self) -> int:
        """The number of memory slots per VM (KVM_CAP_NR_MEMSLOTS)."""
        return self.check_extension(Cap.NR_MEMSLOTS)

    def get_supported_cpuid(self) -> list[b.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can offer a guest (api.rst 4.46)."""
        count = b.KVM_MAX_CPUID_ENTRIES
        while True:
            buf = b.cpuid_buffer(count)()
            buf.nent = count
            try:
                ioctl_struct(self.fd, io.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
            except KvmError as exc:
                if exc.errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise
            entries = buf.entries
            return [b.kvm_cpuid_entry2.from_buffer_copy(entries[i]) for i in range(buf.nent)]

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU."""
        buf = b.msr_list_buffer(_MAX_MSR_INDICES)()
        buf.nmsrs = _MAX_MSR_INDICES
        ioctl_struct(self.fd, io.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
        indices = buf.indices
        return [int(indices[i]) for i in range(buf.nmsrs)]

    def create_vm(self) -> VmFd:
        """KVM_CREATE_VM (machine type 0)."""
        fd = kvm_ioctl(self.fd, io.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        os.set_inheritable(fd, False)
        return VmFd(fd, self._mmap_size)
