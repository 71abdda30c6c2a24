"""`VcpuFd`: one vCPU's file descriptor, its mmapped ``kvm_run`` and its state ioctls.

``run()`` issues ``KVM_RUN`` and decodes ``struct kvm_run`` (api.rst section 5) into the typed
exits of `nubis.kvm.exits`, reading the mapping with precompiled ``struct.Struct`` objects and
refilling one reusable exit object per kind, so the exit path allocates little more than the
``memoryview`` window over the data.

How ``KVM_RUN`` is issued: with ``fcntl.ioctl(fd, KVM_RUN)``. CPython releases the GIL around
the ``ioctl(2)`` call, and (unlike ``fcntl.fcntl`` and most os functions) ``fcntl.ioctl`` is not
covered by PEP 475's retry-on-EINTR: an interrupted call raises ``InterruptedError`` at once.
That is what a kick needs. A retry loop would be wrong here twice over: in a non-main thread
``PyErr_CheckSignals()`` is a no-op, so the call would be re-issued, and with
``immediate_exit`` set it would fail with EINTR again, forever. ``fcntl.ioctl`` with an integer
argument is also the cheapest call path from Python (no ctypes argument conversion);
``tests/kvm/test_kvm_kick.py`` pins the EINTR behaviour.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterable, Mapping, Sequence

from nubis.kvm import bindings as b
from nubis.kvm import ioctls as io
from nubis.kvm.error import KvmError, ioctl_struct, kvm_ioctl
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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["VcpuFd"]

# Offsets inside struct kvm_run, taken from the ctypes declaration.
_RUN_IMMEDIATE_EXIT: Final = b.kvm_run.immediate_exit.offset
_RUN_EXIT_REASON: Final = b.kvm_run.exit_reason.offset
_RUN_UNION: Final = b.kvm_run.u.offset
_MMIO_DATA: Final = _RUN_UNION + b.kvm_run_mmio.data.offset

# exit_reason, then (past flags, cr8 and apic_base) kvm_run.io: direction u8, size u8,
# port u16, count u32, data_offset u64. One unpack serves the most common exit; for the others
# the io fields are meaningless and ignored.
_REASON_AND_IO = struct.Struct(f"<I{_RUN_UNION - _RUN_EXIT_REASON - 4}xBBHIQ")
# kvm_run.mmio: phys_addr u64, data u8[8], len u32, is_write u8.
_MMIO = struct.Struct("<Q8xIB")
# kvm_run.internal and kvm_run.system_event: a u32 code, u32 ndata, then up to 16 u64 words.
_CODE_NDATA = struct.Struct("<II")
_DATA_WORDS: Final = 16
_WORDS = struct.Struct(f"<{_DATA_WORDS}Q")
# kvm_run.fail_entry: hardware_entry_failure_reason u64, cpu u32.
_FAIL_ENTRY = struct.Struct("<QI")

_KVM_EXIT_IO: Final = int(b.ExitReason.IO)
_KVM_EXIT_MMIO: Final = int(b.ExitReason.MMIO)
_KVM_EXIT_HLT: Final = int(b.ExitReason.HLT)
_KVM_EXIT_SHUTDOWN: Final = int(b.ExitReason.SHUTDOWN)
_KVM_EXIT_SYSTEM_EVENT: Final = int(b.ExitReason.SYSTEM_EVENT)
_KVM_EXIT_INTERNAL_ERROR: Final = int(b.ExitReason.INTERNAL_ERROR)
_KVM_EXIT_FAIL_ENTRY: Final = int(b.ExitReason.FAIL_ENTRY)
_KVM_EXIT_INTR: Final = int(b.ExitReason.INTR)
_KVM_RUN: Final = io.KVM_RUN


class VcpuFd:
    """A vCPU created by ``VmFd.create_vcpu``; close it (or use ``with``) when done.

    ``run()`` must be called from one thread at a time (the vCPU's own thread); the state
    ioctls may be used while the vCPU is not in ``run()``. ``set_immediate_exit`` may be called
    from any thread: it is how another thread kicks the vCPU out of ``KVM_RUN``.
    """

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.fd = fd
        self.id = vcpu_id
        try:
            self._run_map = mmap.mmap(
                fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as exc:
            os.close(fd)
            raise KvmError("mmap of kvm_run", exc.errno or errno.EINVAL) from exc
        self._view = memoryview(self._run_map)
        self._mmio_view = self._view[_MMIO_DATA : _MMIO_DATA + 8]
        self._io_window: tuple[int, int, memoryview] = (-1, -1, self._view[0:0])
        self._io_in = IoIn()
        self._io_out = IoOut()
        self._mmio_read = MmioRead()
        self._mmio_write = MmioWrite()
        self._hlt = Hlt()
        self._shutdown = Shutdown()
        self._system_event = SystemEvent()
        self._internal_error = InternalError()
        self._fail_entry = FailEntry()
        self._interrupted = Interrupted()
        self._closed = False

    def __enter__(self) -> VcpuFd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VcpuFd(id={self.id}, fd={self.fd})"

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the vCPU fd; exit objects' data views become invalid."""
        if self._closed:
            return
        self._closed = True
        for exit_ in (self._io_in, self._io_out, self._mmio_read, self._mmio_write):
            exit_.data = memoryview(b"")
        self._io_window = (-1, -1, memoryview(b""))
        self._mmio_view.release()
        self._view.release()
        # A caller may still hold a data view; the mapping then goes away with it.
        try:
            self._run_map.close()
        except BufferError:
            pass
        os.close(self.fd)

    # --- the run loop's side ------------------------------------------------------------

    @property
    def kvm_run(self) -> memoryview:
        """The whole ``kvm_run`` mapping (struct kvm_run, then the PIO data page)."""
        return self._view

    def set_immediate_exit(self, value: bool) -> None:
        """Set or clear ``kvm_run.immediate_exit`` (KVM_CAP_IMMEDIATE_EXIT, api.rst 5).

        While set, ``KVM_RUN`` returns EINTR at once instead of entering the guest.
        """
        self._run_map[_RUN_IMMEDIATE_EXIT] = 1 if value else 0

    @property
    def immediate_exit(self) -> bool:
        """Whether ``kvm_run.immediate_exit`` is set."""
        return self._run_map[_RUN_IMMEDIATE_EXIT] != 0

    def run(self) -> VcpuExit:
        """Run the vCPU until it exits to userspace; return why (valid until the next run).

        Returns `Interrupted` when a signal or ``immediate_exit`` stopped it; raises `KvmError`
        for any other failure of ``KVM_RUN``.
        """
        try:
            fcntl.ioctl(self.fd, _KVM_RUN)
        except OSError as exc:
            if exc.errno == errno.EINTR or exc.errno == errno.EAGAIN:
                # EAGAIN: an application processor that was waiting for INIT/SIPI received
                # them inside KVM_RUN; KVM returns so userspace can look, and the vCPU runs
                # from its new state on the next call (api.rst, KVM_RUN).
                return self._interrupted
            raise KvmError("KVM_RUN", exc.errno or errno.EINVAL, f"vCPU {self.id}") from None
        run_map = self._run_map
        reason, direction, size, port, count, offset = _REASON_AND_IO.unpack_from(
            run_map, _RUN_EXIT_REASON
        )
        if reason == _KVM_EXIT_IO:
            io_exit = self._io_out if direction else self._io_in
            io_exit.port = port
            io_exit.size = size
            io_exit.count = count
            length = size * count
            window = self._io_window
            if window[0] != offset or window[1] != length:
                window = (offset, length, self._view[offset : offset + length])
                self._io_window = window
            io_exit.data = window[2]
            return io_exit
        if reason == _KVM_EXIT_MMIO:
            address, length, is_write = _MMIO.unpack_from(run_map, _RUN_UNION)
            mmio_exit = self._mmio_write if is_write else self._mmio_read
            mmio_exit.address = address
            mmio_exit.data = self._mmio_view if length == 8 else self._mmio_view[: min(length, 8)]
            return mmio_exit
        return self._decode_slow(reason)

    def _decode_slow(self, reason: int) -> VcpuExit:
        run_map = self._run_map
        if reason == _KVM_EXIT_HLT:
            return self._hlt
        if reason == _KVM_EXIT_SHUTDOWN:
            return self._shutdown
        if reason == _KVM_EXIT_SYSTEM_EVENT:
            event_type, ndata = _CODE_NDATA.unpack_from(run_map, _RUN_UNION)
            words = _WORDS.unpack_from(run_map, _RUN_UNION + 8)
            event = self._system_event
            event.type = event_type
            event.data = words[: min(ndata, _DATA_WORDS)]
            event.flags = words[0]
            return event
        if reason == _KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = _CODE_NDATA.unpack_from(run_map, _RUN_UNION)
            words = _WORDS.unpack_from(run_map, _RUN_UNION + 8)
            error = self._internal_error
            error.suberror = suberror
            error.data = words[: min(ndata, _DATA_WORDS)]
            return error
        if reason == _KVM_EXIT_FAIL_ENTRY:
            hw_reason, cpu = _FAIL_ENTRY.unpack_from(run_map, _RUN_UNION)
            failed = self._fail_entry
            failed.hardware_entry_failure_reason = hw_reason
            failed.cpu = cpu
            return failed
        if reason == _KVM_EXIT_INTR:
            return self._interrupted
        return OtherExit(reason)

    # --- register state -----------------------------------------------------------------

    def get_regs(self) -> b.kvm_regs:
        """KVM_GET_REGS: the general-purpose registers."""
        regs = b.kvm_regs()
        ioctl_struct(self.fd, io.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: b.kvm_regs) -> None:
        """KVM_SET_REGS."""
        ioctl_struct(self.fd, io.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> b.kvm_sregs:
        """KVM_GET_SREGS: segment, control and descriptor-table registers."""
        sregs = b.kvm_sregs()
        ioctl_struct(self.fd, io.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: b.kvm_sregs) -> None:
        """KVM_SET_SREGS."""
        ioctl_struct(self.fd, io.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> b.kvm_fpu:
        """KVM_GET_FPU: x87 and SSE state."""
        fpu = b.kvm_fpu()
        ioctl_struct(self.fd, io.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: b.kvm_fpu) -> None:
        """KVM_SET_FPU."""
        ioctl_struct(self.fd, io.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS: the values of the MSRs ``indices``.

        Raises `KvmError` when KVM could not read all of them (it stops at the first it
        cannot); the message names the first MSR it could not read.
        """
        wanted = list(indices)
        buf = b.msrs_buffer(len(wanted))()
        buf.nmsrs = len(wanted)
        entries = buf.entries
        for i, index in enumerate(wanted):
            entries[i].index = index
        done = ioctl_struct(self.fd, io.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        if done != len(wanted):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"MSR {wanted[done]:#x} is not readable")
        return {entries[i].index: entries[i].data for i in range(done)}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """KVM_SET_MSRS: write every MSR in ``values`` (index to value), or raise `KvmError`."""
        items = list(values.items())
        buf = b.msrs_buffer(len(items))()
        buf.nmsrs = len(items)
        entries = buf.entries
        for i, (index, value) in enumerate(items):
            entries[i].index = index
            entries[i].data = value
        done = ioctl_struct(self.fd, io.KVM_SET_MSRS, buf, "KVM_SET_MSRS")
        if done != len(items):
            raise KvmError(
                "KVM_SET_MSRS", errno.EINVAL, f"MSR {items[done][0]:#x} rejected the value"
            )

    def set_cpuid2(self, entries: Sequence[b.kvm_cpuid_entry2]) -> None:
        """KVM_SET_CPUID2: the CPUID leaves the guest sees."""
        buf = b.cpuid_buffer(len(entries))()
        buf.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        ioctl_struct(self.fd, io.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_lapic(self) -> b.kvm_lapic_state:
        """KVM_GET_LAPIC: the local APIC register page (needs the in-kernel irqchip)."""
        lapic = b.kvm_lapic_state()
        ioctl_struct(self.fd, io.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        return lapic

    def set_lapic(self, lapic: b.kvm_lapic_state) -> None:
        """KVM_SET_LAPIC."""
        ioctl_struct(self.fd, io.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: an ``MpState`` value."""
        state = b.kvm_mp_state()
        ioctl_struct(self.fd, io.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE."""
        state = b.kvm_mp_state(mp_state)
        ioctl_struct(self.fd, io.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> b.kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS: pending exceptions, interrupts and NMIs."""
        events = b.kvm_vcpu_events()
        ioctl_struct(self.fd, io.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        return events

    def set_vcpu_events(self, events: b.kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS."""
        ioctl_struct(self.fd, io.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_xsave(self) -> b.kvm_xsave:
        """KVM_GET_XSAVE: the legacy 4096-byte XSAVE area."""
        xsave = b.kvm_xsave()
        ioctl_struct(self.fd, io.KVM_GET_XSAVE, xsave, "KVM_GET_XSAVE")
        return xsave

    def set_xsave(self, xsave: b.kvm_xsave) -> None:
        """KVM_SET_XSAVE."""
        ioctl_struct(self.fd, io.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE")

    def get_xcrs(self) -> b.kvm_xcrs:
        """KVM_GET_XCRS: the extended control registers (XCR0)."""
        xcrs = b.kvm_xcrs()
        ioctl_struct(self.fd, io.KVM_GET_XCRS, xcrs, "KVM_GET_XCRS")
        return xcrs

    def set_xcrs(self, xcrs: b.kvm_xcrs) -> None:
        """KVM_SET_XCRS."""
        ioctl_struct(self.fd, io.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency."""
        return kvm_ioctl(self.fd, io.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on this vCPU with up to four arguments."""
        request = enable_cap_struct(cap, args, flags)
        ioctl_struct(self.fd, io.KVM_ENABLE_CAP, request, "KVM_ENABLE_CAP", f"capability {cap}")

    def at_reset_vector(self) -> bool:
        """Whether the vCPU is in its power-on/INIT state: cs base 0xffff0000, rip 0xfff0.

        After a triple fault on AMD hosts KVM has already reset the vCPU when it reports the
        SHUTDOWN exit (the VMCB is undefined after a shutdown intercept), so its registers no
        longer tell where the guest was. False when the registers cannot be read.
        """
        try:
            regs = self.get_regs()
            sregs = self.get_sregs()
        except KvmError:
            return False
        return bool(
            regs.rip == 0xFFF0 and sregs.cs.selector == 0xF000 and sregs.cs.base == 0xFFFF0000
        )

    def register_dump(self) -> str:
        """One line with rip, rflags, the GPRs and the control registers, for error reports."""
        try:
            regs = self.get_regs()
            sregs = self.get_sregs()
        except KvmError as exc:
            return f"registers unavailable: {exc}"
        gprs = " ".join(
            f"{name}={getattr(regs, name):#x}"
            for name in ("rip", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp")
        )
        return (
            f"{gprs} cs={sregs.cs.selector:#x}:{sregs.cs.base:#x} cr0={sregs.cr0:#x} "
            f"cr2={sregs.cr2:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} efer={sregs.efer:#x} "
            f"idt={sregs.idt.base:#x}+{sregs.idt.limit:#x} gdt={sregs.gdt.base:#x}+{sregs.gdt.limit:#x}"
        )


def enable_cap_struct(cap: int, args: Sequence[int], flags: int) -> b.kvm_enable_cap:
    """Build the KVM_ENABLE_CAP argument (shared by vCPU and VM fds)."""
    if len(args) > 4:
        raise ValueError(f"KVM_ENABLE_CAP takes at most 4 arguments, got {len(args)}")
    request = b.kvm_enable_cap()
    request.cap = cap
    request.flags = flags
    for i, value in enumerate(args):
        request.args[i] = value
    return request
