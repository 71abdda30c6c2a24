"""The contract between a virtio device model and its transport (virtio 1.2, section 2 and 4.1).

A device model (block, entropy, console, net) knows its device type, its feature bits, its
configuration space and what to do with descriptor chains. It knows nothing about PCI: the
transport (``nubis.virtio.pci``) negotiates features, lets the driver size and place the queues,
and activates the device with everything it needs once the driver sets DRIVER_OK.
"""

from __future__ import annotations

from collections.abc import Sequence

from nubis._enum import Enum, IntEnum, IntFlag
from nubis._frozen import Frozen
from nubis._typing import Protocol

TYPE_CHECKING = False

if TYPE_CHECKING:
    from nubis.memory import GuestMemory
    from nubis.virtio.queue import Queue


class DeviceType(IntEnum):
    """virtio device ids (virtio 1.2, section 5); the PCI device id is 0x1040 + the id."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    VSOCK = 19


class DeviceStatus(IntFlag):
    """Bits of the device status field (virtio 1.2, section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


# Transport-independent feature bits (virtio 1.2, section 6).
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33


class InterruptKind(Enum):
    """Why a device interrupts the driver: a used buffer on a queue, or a config change."""

    QUEUE = "queue"
    CONFIG = "config"


class VirtioInterrupt(Protocol):
    """How a device raises interrupts; the transport maps them to MSI-X vectors (irqfds)."""

    def trigger(self, kind: InterruptKind, queue_index: int = 0) -> None:
        """Signal the driver that queue ``queue_index`` has used buffers, or the config changed."""
        ...

    def set_needs_reset(self) -> None:
        """Set DEVICE_NEEDS_RESET in the device status and tell the driver (a config interrupt).

        A device calls this when the driver broke the queue rules; it then stops processing
        until the driver resets it.
        """
        ...


class ActivatedQueue(Frozen):
    """One queue handed to a device at activation: the ring state and its notification eventfd.

    ``notify_fd`` becomes readable when the driver notifies the queue (an ioeventfd the transport
    registered with KVM); the device's worker waits on it with epoll and reads it to clear it.
    """

    __slots__ = ("index", "notify_fd", "queue")

    index: int
    queue: Queue
    notify_fd: int

    def __init__(self, index: int, queue: Queue, notify_fd: int) -> None:
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "queue", queue)
        object.__setattr__(self, "notify_fd", notify_fd)


class VirtioDevice(Protocol):
    """A virtio device model driven by a transport."""

    @property
    def device_type(self) -> DeviceType:
        """The virtio device id."""
        ...

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        """The maximum size of each queue the device offers (powers of two, at most 32768)."""
        ...

    @property
    def avail_features(self) -> int:
        """Feature bits offered to the driver, including VIRTIO_F_VERSION_1."""
        ...

    def ack_features(self, features: int) -> None:
        """Record the features the driver accepted (always a subset of ``avail_features``)."""
        ...

    def read_config(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` from the device-specific configuration space at ``offset``.

        Out-of-range reads fill zeroes; the guest controls ``offset`` and ``len(data)``.
        """
        ...

    def write_config(self, offset: int, data: memoryview) -> None:
        """Apply a driver write to the device-specific configuration space (ignored if read-only)."""
        ...

    def activate(
        self,
        memory: GuestMemory,
        interrupt: VirtioInterrupt,
        queues: Sequence[ActivatedQueue],
    ) -> None:
        """Start processing: called once the driver sets DRIVER_OK.

        The device typically starts a worker thread that waits on the queues' ``notify_fd`` with
        epoll. Raises ``ValueError`` when the driver's setup cannot work (for example a queue the
        device needs was not enabled); the transport then sets DEVICE_NEEDS_RESET.
        """
        ...

    def reset(self) -> None:
        """Stop processing and return to the pre-activation state (driver wrote status 0).

        Requests already in flight finish first; no data that was acknowledged is lost.
        """
        ...

    def counters(self) -> dict[str, int]:
        """Per-device statistics for the API (bytes and operations read/written, frames...)."""
        ...

    def shutdown(self) -> None:
        """Drain queues, flush backing storage and release resources; the VM is stopping."""
        ...
