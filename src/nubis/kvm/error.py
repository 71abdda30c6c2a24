"""`KvmError` and the one helper every KVM ioctl in nubis goes through.

The ioctls are issued with libc's ``ioctl`` through ctypes rather than ``fcntl.ioctl``: many KVM
ioctls take an unsigned long argument that does not fit the C ``int`` ``fcntl.ioctl`` converts
integers to (``KVM_SET_TSS_ADDR`` takes 0xfffbd000), and passing ``ctypes.addressof`` of the
argument structure lets the kernel read and write it in place. ctypes releases the GIL around
the call. The hot ``KVM_RUN`` path is in ``nubis.kvm.vcpu`` and explains its own choice.
"""

from __future__ import annotations

import ctypes
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

_libc: Final = ctypes.CDLL(None, use_errno=True)
_libc_ioctl: Final = _libc.ioctl
_libc_ioctl.restype = ctypes.c_int
_libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


class KvmError(OSError):
    """A KVM ioctl failed; the message names the ioctl and the errno the kernel returned."""

    def __init__(self, operation: str, errno: int, detail: str = "") -> None:
        reason = os.strerror(errno)
        message = f"{operation} failed: {reason}"
        if detail:
            message = f"{operation} failed ({detail}): {reason}"
        super().__init__(errno, message)
        self.operation = operation


class KvmUnsupportedError(RuntimeError):
    """The host's KVM lacks something nubis needs (API version or a capability)."""


def kvm_ioctl(fd: int, request: int, arg: int | None, name: str, detail: str = "") -> int:
    """Issue ``ioctl(fd, request, arg)``; raise `KvmError` naming ``name`` on failure.

    ``arg`` is an integer argument or the address of an argument structure
    (``ctypes.addressof``); the caller keeps that structure alive across the call.
    """
    ret: int = _libc_ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(name, ctypes.get_errno(), detail)
    return ret


def ioctl_struct(fd: int, request: int, obj: ctypes._CData, name: str, detail: str = "") -> int:
    """Issue an ioctl whose argument is a pointer to ``obj``, read and/or written in place."""
    return kvm_ioctl(fd, request, ctypes.addressof(obj), name, detail)
