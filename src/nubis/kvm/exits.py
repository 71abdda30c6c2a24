"""Typed results of ``VcpuFd.run()``: why the vCPU left ``KVM_RUN`` (api.rst section 5).

The exit path is hot, so each `VcpuFd` owns one instance of each exit class and refills it on
every exit instead of allocating: an exit object (and the ``data`` memoryview it carries, a
zero-copy window into the vCPU's ``kvm_run`` mapping) is valid until the next ``run()`` on the
same vCPU. A handler that fills ``data`` for a read (port IN, MMIO read) must do so before the
next ``run()``, which is when KVM copies it into the guest.
"""

from __future__ import annotations

__all__ = [
    "FailEntry",
    "Hlt",
    "InternalError",
    "Interrupted",
    "IoIn",
    "IoOut",
    "MmioRead",
    "MmioWrite",
    "OtherExit",
    "Shutdown",
    "SystemEvent",
    "VcpuExit",
]

_EMPTY = memoryview(b"")


class VcpuExit:
    """Base of every exit; ``reason`` is the raw ``kvm_run.exit_reason`` (``ExitReason``)."""

    __slots__ = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for cls in type(self).__mro__
            for name in getattr(cls, "__slots__", ())
            if name != "data"
        )
        return f"{type(self).__name__}({fields})"


class IoIn(VcpuExit):
    """The guest read ``count`` items of ``size`` bytes from ``port``: fill ``data`` with them.

    ``len(data) == size * count``; ``count > 1`` for ``rep ins``.
    """

    __slots__ = ("count", "data", "port", "size")

    def __init__(self) -> None:
        super().__init__(2)
        self.port = 0
        self.size = 0
        self.count = 0
        self.data: memoryview = _EMPTY


class IoOut(VcpuExit):
    """The guest wrote ``count`` items of ``size`` bytes (``data``) to ``port``."""

    __slots__ = ("count", "data", "port", "size")

    def __init__(self) -> None:
        super().__init__(2)
        self.port = 0
        self.size = 0
        self.count = 0
        self.data: memoryview = _EMPTY


class MmioRead(VcpuExit):
    """The guest read ``len(data)`` bytes at guest physical ``address``: fill ``data``."""

    __slots__ = ("address", "data")

    def __init__(self) -> None:
        super().__init__(6)
        self.address = 0
        self.data: memoryview = _EMPTY


class MmioWrite(VcpuExit):
    """The guest wrote ``data`` at guest physical ``address``."""

    __slots__ = ("address", "data")

    def __init__(self) -> None:
        super().__init__(6)
        self.address = 0
        self.data: memoryview = _EMPTY


class Hlt(VcpuExit):
    """The guest executed HLT and there is no in-kernel irqchip to wait for an interrupt."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(5)


class Shutdown(VcpuExit):
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted; x86 hardware would reset."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(8)


class SystemEvent(VcpuExit):
    """KVM_EXIT_SYSTEM_EVENT: ``type`` is a ``SystemEventType``; ``data`` its payload words.

    ``flags`` is ``data[0]`` (the field's older name), or 0 when there is no payload.
    """

    __slots__ = ("data", "flags", "type")

    def __init__(self) -> None:
        super().__init__(24)
        self.type = 0
        self.flags = 0
        self.data: tuple[int, ...] = ()


class InternalError(VcpuExit):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not continue (``suberror``, e.g. emulation failure)."""

    __slots__ = ("data", "suberror")

    def __init__(self) -> None:
        super().__init__(17)
        self.suberror = 0
        self.data: tuple[int, ...] = ()


class FailEntry(VcpuExit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    __slots__ = ("cpu", "hardware_entry_failure_reason")

    def __init__(self) -> None:
        super().__init__(9)
        self.hardware_entry_failure_reason = 0
        self.cpu = 0


class Interrupted(VcpuExit):
    """KVM_RUN returned EINTR: a signal arrived or ``immediate_exit`` was set (a kick)."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(10)


class OtherExit(VcpuExit):
    """Any exit nubis does not model; ``reason`` says which."""

    __slots__ = ()
