"""`VmFd`: a VM's file descriptor: memory slots, in-kernel irqchip and PIT, irqfd, ioeventfd,
GSI routing, MSI injection, dirty-page logging and vCPU creation (api.rst section 4).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

from nubis._frozen import Frozen
from nubis.kvm import bindings as b
from nubis.kvm import ioctls as io
from nubis.kvm.error import KvmError, ioctl_struct, kvm_ioctl
from nubis.kvm.vcpu import VcpuFd, enable_cap_struct

__all__ = ["IrqRoute", "IrqchipRoute", "MsiRoute", "VmFd"]

PAGE_SIZE = 4096


class IrqchipRoute(Frozen):
    """Route ``gsi`` to ``pin`` of in-kernel irqchip ``irqchip`` (KVM_IRQCHIP_*)."""

    __slots__ = ("gsi", "irqchip", "pin")

    gsi: int
    irqchip: int
    pin: int

    def __init__(self, gsi: int, irqchip: int, pin: int) -> None:
        object.__setattr__(self, "gsi", gsi)
        object.__setattr__(self, "irqchip", irqchip)
        object.__setattr__(self, "pin", pin)


class MsiRoute(Frozen):
    """Route ``gsi`` to an MSI message (64-bit ``address``, ``data``)."""

    __slots__ = ("address", "data", "devid", "gsi")

    gsi: int
    address: int
    data: int
    devid: int | None

    def __init__(self, gsi: int, address: int, data: int, devid: int | None = None) -> None:
        object.__setattr__(self, "gsi", gsi)
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "devid", devid)


IrqRoute = IrqchipRoute | MsiRoute


class VmFd:
    """A VM created by ``Kvm.create_vm``; close it (or use ``with``) when done.

    Close the vCPUs first: the kernel keeps the VM alive while any vCPU fd is open.
    """

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self._vcpu_mmap_size = vcpu_mmap_size
        self._closed = False

    def __enter__(self) -> VmFd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VmFd(fd={self.fd})"

    def close(self) -> None:
        """Close the VM fd (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (KVM_CAP_CHECK_EXTENSION_VM): 0 when unsupported."""
        return kvm_ioctl(self.fd, io.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    # --- memory -------------------------------------------------------------------------

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        *,
        readonly: bool = False,
        log_dirty_pages: bool = False,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION: map host memory at a guest physical range.

        A ``memory_size`` of 0 deletes the slot. Guest writes to a ``readonly`` slot exit to
        userspace as MMIO writes; ``log_dirty_pages`` enables ``get_dirty_log``.
        """
        flags = (b.KVM_MEM_READONLY if readonly else 0) | (
            b.KVM_MEM_LOG_DIRTY_PAGES if log_dirty_pages else 0
        )
        region = b.kvm_userspace_memory_region(
            slot, flags, guest_phys_addr, memory_size, userspace_addr
        )
        ioctl_struct(
            self.fd,
            io.KVM_SET_USER_MEMORY_REGION,
            region,
            "KVM_SET_USER_MEMORY_REGION",
            f"slot {slot} at {guest_phys_addr:#x} size {memory_size:#x}",
        )

    def get_dirty_bitmap(self, slot: int, memory_size: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's dirty bitmap (bit n = page n), cleared by the call."""
        pages = (memory_size + PAGE_SIZE - 1) // PAGE_SIZE
        # The kernel writes whole 64-bit words.
        bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()
        log = b.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap))
        ioctl_struct(self.fd, io.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG", f"slot {slot}")
        return bytes(bitmap)[: (pages + 7) // 8]

    def get_dirty_log(self, slot: int, memory_size: int) -> list[int]:
        """The page numbers (from the slot's start) the guest wrote since the last call."""
        bitmap = int.from_bytes(self.get_dirty_bitmap(slot, memory_size), "little")
        pages = []
        while bitmap:
            low = bitmap & -bitmap
            pages.append(low.bit_length() - 1)
            bitmap ^= low
        return pages

    def set_tss_address(self, address: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest physical space KVM may use (Intel VMX)."""
        kvm_ioctl(self.fd, io.KVM_SET_TSS_ADDR, address, "KVM_SET_TSS_ADDR", f"{address:#x}")

    def set_identity_map_address(self, address: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page KVM may use for real-mode EPT (Intel VMX)."""
        value = ctypes.c_uint64(address)
        ioctl_struct(self.fd, io.KVM_SET_IDENTITY_MAP_ADDR, value, "KVM_SET_IDENTITY_MAP_ADDR")

    # --- interrupt controllers ----------------------------------------------------------

    def create_irq_chip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and per-vCPU local APICs."""
        kvm_ioctl(self.fd, io.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = b.KVM_PIT_SPEAKER_DUMMY) -> None:
        """KVM_CREATE_PIT2: the in-kernel i8254 timer."""
        config = b.kvm_pit_config(flags)
        ioctl_struct(self.fd, io.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: bool) -> None:
        """KVM_IRQ_LINE: set GSI ``irq`` high or low."""
        line = b.kvm_irq_level(irq, 1 if level else 0)
        ioctl_struct(self.fd, io.KVM_IRQ_LINE, line, "KVM_IRQ_LINE", f"GSI {irq}")

    def get_irqchip(self, chip_id: int) -> b.kvm_irqchip:
        """KVM_GET_IRQCHIP: the state of PIC master (0), PIC slave (1) or IOAPIC (2)."""
        chip = b.kvm_irqchip()
        chip.chip_id = chip_id
        ioctl_struct(self.fd, io.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP", f"chip {chip_id}")
        return chip

    def set_irqchip(self, chip: b.kvm_irqchip) -> None:
        """KVM_SET_IRQCHIP."""
        ioctl_struct(self.fd, io.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP", f"chip {chip.chip_id}")

    def get_pit2(self) -> b.kvm_pit_state2:
        """KVM_GET_PIT2."""
        state = b.kvm_pit_state2()
        ioctl_struct(self.fd, io.KVM_GET_PIT2, state, "KVM_GET_PIT2")
        return state

    def set_pit2(self, state: b.kvm_pit_state2) -> None:
        """KVM_SET_PIT2."""
        ioctl_struct(self.fd, io.KVM_SET_PIT2, state, "KVM_SET_PIT2")

    def get_clock(self) -> b.kvm_clock_data:
        """KVM_GET_CLOCK: the kvmclock value."""
        clock = b.kvm_clock_data()
        ioctl_struct(self.fd, io.KVM_GET_CLOCK, clock, "KVM_GET_CLOCK")
        return clock

    def set_clock(self, clock: b.kvm_clock_data) -> None:
        """KVM_SET_CLOCK."""
        ioctl_struct(self.fd, io.KVM_SET_CLOCK, clock, "KVM_SET_CLOCK")

    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` raises ``gsi``.

        With ``resample_fd`` the GSI is level-triggered: KVM deasserts it on EOI and signals
        ``resample_fd`` so the device can re-raise it if still pending.
        """
        request = b.kvm_irqfd()
        request.fd = fd
        request.gsi = gsi
        if resample_fd is not None:
            request.flags = b.KVM_IRQFD_FLAG_RESAMPLE
            request.resamplefd = resample_fd
        ioctl_struct(self.fd, io.KVM_IRQFD, request, "KVM_IRQFD", f"fd {fd} to GSI {gsi}")

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        """KVM_IRQFD with KVM_IRQFD_FLAG_DEASSIGN."""
        request = b.kvm_irqfd()
        request.fd = fd
        request.gsi = gsi
        request.flags = b.KVM_IRQFD_FLAG_DEASSIGN
        ioctl_struct(
            self.fd, io.KVM_IRQFD, request, "KVM_IRQFD (deassign)", f"fd {fd} from GSI {gsi}"
        )

    def _ioeventfd(
        self, fd: int, addr: int, length: int, pio: bool, datamatch: int | None, flags: int
    ) -> b.kvm_ioeventfd:
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd length must be 0, 1, 2, 4 or 8, not {length}")
        request = b.kvm_ioeventfd()
        request.addr = addr
        request.len = length
        request.fd = fd
        request.flags = flags | (b.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            request.flags |= b.KVM_IOEVENTFD_FLAG_DATAMATCH
            request.datamatch = datamatch
        return request

    def register_ioevent(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
    ) -> None:
        """KVM_IOEVENTFD: a guest write of ``length`` bytes at ``addr`` signals eventfd ``fd``.

        The write completes in the kernel without an exit to userspace. ``length`` 0 matches
        any width (MMIO only); with ``datamatch`` only writes of that value match.
        """
        request = self._ioeventfd(fd, addr, length, pio, datamatch, 0)
        space = "port" if pio else "MMIO"
        ioctl_struct(self.fd, io.KVM_IOEVENTFD, request, "KVM_IOEVENTFD", f"{space} {addr:#x}")

    def unregister_ioevent(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
    ) -> None:
        """KVM_IOEVENTFD with KVM_IOEVENTFD_FLAG_DEASSIGN; the arguments must match the
        registration."""
        request = self._ioeventfd(fd, addr, length, pio, datamatch, b.KVM_IOEVENTFD_FLAG_DEASSIGN)
        space = "port" if pio else "MMIO"
        ioctl_struct(
            self.fd, io.KVM_IOEVENTFD, request, "KVM_IOEVENTFD (deassign)", f"{space} {addr:#x}"
        )

    def set_gsi_routing(self, routes: Sequence[IrqRoute]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole GSI routing table with ``routes``."""
        buf = b.irq_routing_buffer(len(routes))()
        buf.nr = len(routes)
        entries = buf.entries
        for i, route in enumerate(routes):
            entry = entries[i]
            entry.gsi = route.gsi
            if isinstance(route, IrqchipRoute):
                entry.type = b.KVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = route.irqchip
                entry.u.irqchip.pin = route.pin
            else:
                entry.type = b.KVM_IRQ_ROUTING_MSI
                entry.u.msi.address_lo = route.address & 0xFFFF_FFFF
                entry.u.msi.address_hi = route.address >> 32
                entry.u.msi.data = route.data
                if route.devid is not None:
                    entry.flags = 1  # KVM_MSI_VALID_DEVID
                    entry.u.msi.devid = route.devid
        ioctl_struct(
            self.fd, io.KVM_SET_GSI_ROUTING, buf, "KVM_SET_GSI_ROUTING", f"{len(routes)} routes"
        )

    def signal_msi(self, address: int, data: int) -> bool:
        """KVM_SIGNAL_MSI: inject an MSI; False when the guest blocked it (returned 0)."""
        msi = b.kvm_msi()
        msi.address_lo = address & 0xFFFF_FFFF
        msi.address_hi = address >> 32
        msi.data = data
        return ioctl_struct(self.fd, io.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI") > 0

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM (KVM_CAP_ENABLE_CAP_VM) with up to four arguments."""
        request = enable_cap_struct(cap, args, flags)
        ioctl_struct(self.fd, io.KVM_ENABLE_CAP, request, "KVM_ENABLE_CAP", f"capability {cap}")

    # --- vCPUs ----------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """KVM_CREATE_VCPU and map its ``kvm_run``."""
        fd = kvm_ioctl(self.fd, io.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU", f"id {vcpu_id}")
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            os.close(fd)
            raise KvmError("KVM_CREATE_VCPU", exc.errno or errno.EBADF) from exc
        return VcpuFd(fd, vcpu_id, self._vcpu_mmap_size)
