"""How device models raise interrupts without knowing how they are delivered.

A register model (UART, RTC, a virtio transport) is handed a `Trigger` and calls
``trigger()`` when an interrupt condition becomes pending; it never touches an fd or KVM. In a
running VM the trigger is an `EventFdTrigger` whose eventfd is registered with KVM as an irqfd
(KVM_IRQFD, Linux Documentation/virt/kvm/api.rst, section 4.75), so signalling it injects the
interrupt without a trip through the vCPU thread. Tests pass a counting fake instead.
"""

from __future__ import annotations

import os

from nubis._typing import Protocol

TYPE_CHECKING = False

__all__ = ["EventFdTrigger", "Trigger"]


class Trigger(Protocol):
    """Something that raises one interrupt line or vector when called."""

    def trigger(self) -> None:
        """Raise the interrupt (edge: each call is one event)."""


class EventFdTrigger:
    """A `Trigger` backed by an eventfd, ready to be registered with KVM as an irqfd.

    The eventfd is non-blocking and close-on-exec. Signals that arrive while the counter is
    saturated are dropped, which loses nothing: the interrupt is already pending.
    """

    def __init__(self) -> None:
        self.fd: int = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def __repr__(self) -> str:
        return f"EventFdTrigger(fd={self.fd})"

    def __enter__(self) -> EventFdTrigger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def trigger(self) -> None:
        """Add 1 to the eventfd counter, which KVM turns into an interrupt."""
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass

    def consume(self) -> int:
        """Read and reset the counter (0 if it was not signalled); for non-KVM consumers."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        """Close the eventfd; closing twice is harmless."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
