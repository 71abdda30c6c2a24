"""virtio-rng: an entropy device fed from a host source, /dev/urandom by default (virtio 1.2, 5.4).

The device has one queue, requestq. The driver posts device-writable buffers; the device fills
them with random bytes read straight from the source into guest memory (``os.readv`` on
memoryview slices) and returns them with the number of bytes written. Each request is capped at
``max_bytes`` so one huge guest buffer cannot keep the worker busy or drain the host's pool.
"""

from __future__ import annotations

import os

from nubis.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceType,
)
from nubis.virtio.queue import DescriptorChain
from nubis.virtio.worker import QueueDevice

#: The default cap on bytes returned for one request.
DEFAULT_MAX_BYTES = 64 * 1024


class Rng(QueueDevice):
    """A virtio entropy device (5.4) reading from ``source`` (a file or character device)."""

    def __init__(
        self,
        source: str | os.PathLike[str] = "/dev/urandom",
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        queue_size: int = 256,
    ) -> None:
        """Open ``source``; raises OSError with the path when it cannot be opened."""
        if max_bytes <= 0:
            raise ValueError(f"entropy request cap {max_bytes} is not positive")
        super().__init__("rng", [queue_size])
        self.source = os.fspath(source)
        self.max_bytes = max_bytes
        self._fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
        self._counters = {"bytes": 0, "requests": 0, "source_errors": 0}

    @property
    def device_type(self) -> DeviceType:
        """virtio device id 4."""
        return DeviceType.ENTROPY

    @property
    def avail_features(self) -> int:
        """VERSION_1, EVENT_IDX and INDIRECT_DESC; the device has no feature bits of its own."""
        return (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_RING_EVENT_IDX
            | 1 << VIRTIO_F_RING_INDIRECT_DESC
        )

    def read_config(self, offset: int, data: memoryview) -> None:
        """The device has no configuration space: everything reads as zero."""
        data[:] = bytes(len(data))

    def write_config(self, offset: int, data: memoryview) -> None:
        """The device has no configuration space: writes are ignored."""

    def counters(self) -> dict[str, int]:
        """Bytes delivered and requests served."""
        return dict(self._counters)

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        """Fill the chain's writable buffers (up to ``max_bytes``) with bytes from the source."""
        memory = self.memory
        assert memory is not None
        budget = self.max_bytes
        views = []
        for desc in chain.writable():
            if budget <= 0:
                break
            size = min(desc.len, budget)
            if size:
                views.append(memory.slice(desc.addr, size))
                budget -= size
        self._counters["requests"] += 1
        if not views:
            return 0
        try:
            count = os.readv(self._fd, views)
        except OSError:
            # A broken source delivers nothing; the guest sees an empty answer and asks again.
            self._counters["source_errors"] += 1
            count = 0
        finally:
            for view in views:
                view.release()
        self._counters["bytes"] += count
        return count

    def on_shutdown(self) -> None:
        """Close the source."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
