"""The event monitor: one JSON object per line for each lifecycle and device event.

``nubis --event-monitor path=PATH`` lets a supervisor follow a VM without polling the API. The
record shape follows cloud-hypervisor's event monitor::

    {"timestamp": {"secs": 0, "nanos": 29054791}, "source": "vm", "event": "booted",
     "properties": null}

``timestamp`` is the time since the monitor was created (nubis creates it at process start), from
the monotonic clock, so it never jumps. ``source`` is ``"vmm"``, ``"vm"``, ``"virtio-device"`` or
``"guest"``; ``properties`` is ``null`` or an object of strings (a device's ``id``, say).

Each record is written unbuffered in one ``write`` (atomic on a FIFO, lines being shorter than
PIPE_BUF), so a reader sees whole lines as they happen. The path is opened in append mode: an existing log is extended, and a FIFO works
(the open waits for a reader, as opening a FIFO for writing does). A write that fails (the FIFO's
reader went away, the disk is full) is logged once and the monitor goes quiet; the VM never stops
because its observer did. :class:`NullEventMonitor` is the monitor when none is configured.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from nubis._log import getLogger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO, Final

log = getLogger(__name__)

SOURCE_VMM: Final = "vmm"
SOURCE_VM: Final = "vm"
SOURCE_DEVICE: Final = "virtio-device"
SOURCE_GUEST: Final = "guest"

# The events nubis emits, by source (the names are cloud-hypervisor's).
VMM_EVENTS: Final = frozenset({"starting", "shutdown"})
VM_EVENTS: Final = frozenset(
    {
        "created",
        "booting",
        "booted",
        "pausing",
        "paused",
        "resuming",
        "resumed",
        "shutdown",
        "rebooting",
        "rebooted",
        "power-button",
        "deleted",
    }
)
DEVICE_EVENTS: Final = frozenset({"activated", "reset"})
GUEST_EVENTS: Final = frozenset({"panic"})


def format_event(
    elapsed_ns: int, source: str, event: str, properties: Mapping[str, str] | None = None
) -> str:
    """One event record as a line of JSON (newline included)."""
    import json  # only with --event-monitor; json is not free to import at start

    secs, nanos = divmod(max(elapsed_ns, 0), 1_000_000_000)
    record = {
        "timestamp": {"secs": secs, "nanos": nanos},
        "source": source,
        "event": event,
        "properties": dict(properties) if properties is not None else None,
    }
    return json.dumps(record, separators=(",", ":")) + "\n"


class EventMonitor:
    """Writes events as JSON lines to a binary stream; safe to call from any thread."""

    def __init__(self, stream: BinaryIO | None, *, start_ns: int | None = None) -> None:
        self._stream = stream
        self._start_ns = time.monotonic_ns() if start_ns is None else start_ns
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str, *, start_ns: int | None = None) -> EventMonitor:
        """Open ``path`` for appending (blocks until a reader opens it if it is a FIFO).

        Raises ``OSError`` if the path cannot be opened; the caller reports it as a start-up
        failure.
        """
        stream = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        return cls(stream, start_ns=start_ns)

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        """Write one event record; it reaches the file before this returns."""
        line = format_event(time.monotonic_ns() - self._start_ns, source, event, properties)
        data = memoryview(line.encode())
        with self._lock:
            if self._stream is None:
                return
            try:
                while data:
                    written = self._stream.write(data)
                    data = data[written or 0 :]
            except (OSError, ValueError) as error:
                log.warning("event monitor stopped: writing an event failed (%s)", error)
                self._drop_stream()

    def vmm(self, event: str) -> None:
        """A VMM event: ``starting`` or ``shutdown``."""
        self.emit(SOURCE_VMM, event)

    def vm(self, event: str) -> None:
        """A VM lifecycle event: ``booting``, ``booted``, ``paused``, ``rebooted``, ..."""
        self.emit(SOURCE_VM, event)

    def device(self, event: str, device_id: str) -> None:
        """A virtio device event (``activated`` or ``reset``) for the device ``device_id``."""
        self.emit(SOURCE_DEVICE, event, {"id": device_id})

    def close(self) -> None:
        """Close the stream; later events are dropped."""
        with self._lock:
            self._drop_stream()

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


class NullEventMonitor(EventMonitor):
    """The monitor when ``--event-monitor`` is not given: every event is dropped unformatted."""

    def __init__(self) -> None:
        super().__init__(None)

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        """Drop the event."""


def open_event_monitor(path: str | None, *, start_ns: int | None = None) -> EventMonitor:
    """The monitor for ``--event-monitor``: a file monitor for a path, a no-op one for None."""
    if path is None:
        return NullEventMonitor()
    return EventMonitor.open(path, start_ns=start_ns)
