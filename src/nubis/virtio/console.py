"""virtio-console: one console port without multiport support (virtio 1.2, 5.3).

Queue 0 (receiveq) carries bytes to the guest; queue 1 (transmitq) carries bytes from it. Bytes
the guest transmits go to an injected writer (stdout, a log file, or nowhere). Bytes for the guest
come from an injected input file descriptor (the terminal in tty mode), read by the device worker
when it becomes readable, or from :meth:`Console.feed` called on any thread. Input waits in a
bounded buffer until the driver posts receive buffers; while it waits the input fd is not polled,
so a full guest never makes the worker spin.

Configuration (5.3.4): cols and rows (VIRTIO_CONSOLE_F_SIZE, optional), max_nr_ports (unused
without MULTIPORT) and emerg_wr (VIRTIO_CONSOLE_F_EMERG_WRITE), a register the driver writes one
character to before the queues work.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Protocol

from nubis._log import getLogger
from nubis.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceType,
    InterruptKind,
)
from nubis.virtio.queue import DescriptorChain
from nubis.virtio.worker import QueueDevice, Worker, clear_eventfd

_log = getLogger(__name__)

# Feature bits (5.3.3).
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

RECEIVEQ = 0
TRANSMITQ = 1

#: struct virtio_console_config (5.3.4): le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr.
CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8

#: Input held for the guest while it has no receive buffers; more is dropped.
MAX_PENDING_INPUT = 64 * 1024
_READ_CHUNK = 4096


class ByteWriter(Protocol):
    """Where transmitted bytes go: a binary file object such as ``sys.stdout.buffer``."""

    def write(self, data: bytes, /) -> object:
        """Take ``data``."""
        ...

    def flush(self) -> object:
        """Push buffered bytes out."""
        ...


class Console(QueueDevice):
    """A single-port virtio console (5.3).

    ``output`` receives the guest's bytes (``None`` discards them); ``input_fd`` (not owned, best
    non-blocking) is read when readable and fed to the guest; ``size`` is ``(cols, rows)`` and,
    when given, offers VIRTIO_CONSOLE_F_SIZE.
    """

    def __init__(
        self,
        output: ByteWriter | None = None,
        input_fd: int | None = None,
        *,
        size: tuple[int, int] | None = None,
        queue_size: int = 256,
    ) -> None:
        """Create the console; nothing is read or written before activation."""
        super().__init__("console", [queue_size, queue_size])
        self.output = output
        self.input_fd = input_fd
        self._size = size
        self._pending = bytearray()
        self._pending_lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._input_open = input_fd is not None
        self._input_enabled = True
        self._counters = {
            "rx_bytes": 0,
            "tx_bytes": 0,
            "rx_dropped": 0,
            "tx_dropped": 0,
        }

    # --- VirtioDevice -------------------------------------------------------------------------

    @property
    def device_type(self) -> DeviceType:
        """virtio device id 3."""
        return DeviceType.CONSOLE

    @property
    def avail_features(self) -> int:
        """VERSION_1, EVENT_IDX, INDIRECT_DESC, EMERG_WRITE and SIZE when a size was given."""
        features = (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_RING_EVENT_IDX
            | 1 << VIRTIO_F_RING_INDIRECT_DESC
            | 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
        )
        if self._size is not None:
            features |= 1 << VIRTIO_CONSOLE_F_SIZE
        return features

    def read_config(self, offset: int, data: memoryview) -> None:
        """Copy from struct virtio_console_config; bytes beyond it read as zero."""
        cols, rows = self._size or (0, 0)
        config = CONFIG.pack(cols, rows, 1, 0)
        length = len(data)
        chunk = config[offset : offset + length] if 0 <= offset < len(config) else b""
        data[: len(chunk)] = chunk
        data[len(chunk) :] = bytes(length - len(chunk))

    def write_config(self, offset: int, data: memoryview) -> None:
        """A write to emerg_wr prints its character; everything else is read-only."""
        if offset == EMERG_WR_OFFSET and len(data) >= 1:
            self._emit(bytes(data[:1]))
            self._flush_output()

    def counters(self) -> dict[str, int]:
        """Bytes received by and transmitted from the guest, and bytes dropped either way."""
        return dict(self._counters)

    def set_size(self, cols: int, rows: int) -> None:
        """Change the console size (a terminal resize) and tell the driver if it cares."""
        if not (0 <= cols <= 0xFFFF and 0 <= rows <= 0xFFFF):
            raise ValueError(f"console size {cols}x{rows} does not fit in 16 bits")
        had_size = self._size is not None
        self._size = (cols, rows)
        interrupt = self.interrupt
        if had_size and interrupt is not None and self.acked_features >> VIRTIO_CONSOLE_F_SIZE & 1:
            interrupt.trigger(InterruptKind.CONFIG)

    def feed(self, data: bytes) -> None:
        """Queue ``data`` for the guest (from any thread); beyond the bound it is dropped."""
        with self._pending_lock:
            room = MAX_PENDING_INPUT - len(self._pending)
            self._pending += data[:room]
            if len(data) > room:
                self._counters["rx_dropped"] += len(data) - max(room, 0)
        os.eventfd_write(self._wake_fd, 1)

    # --- worker -------------------------------------------------------------------------------

    def setup_worker(self, worker: Worker) -> None:
        """Watch the feed eventfd and the input fd."""
        worker.add_fd(self._wake_fd, self._woken)
        if self.input_fd is not None and self._input_open:
            worker.add_fd(self.input_fd, self._input_ready)
            self._input_enabled = True

    def queue_notified(self, index: int) -> None:
        """receiveq: deliver waiting input; transmitq: send the guest's bytes out."""
        if index == RECEIVEQ:
            self._deliver()
        else:
            self.drain_queue(TRANSMITQ, self._transmit)
            self._flush_output()

    def drain_on_shutdown(self, index: int) -> None:
        """Send whatever the guest still has queued for output; input is left unread."""
        if index == TRANSMITQ:
            self.queue_notified(TRANSMITQ)

    def _woken(self) -> None:
        clear_eventfd(self._wake_fd)
        self._deliver()

    def _set_input_enabled(self, enabled: bool) -> None:
        worker = self._worker
        if (
            self.input_fd is not None
            and self._input_open
            and worker is not None
            and enabled != self._input_enabled
        ):
            worker.set_enabled(self.input_fd, enabled)
            self._input_enabled = enabled

    def _input_ready(self) -> None:
        memory = self.memory
        fd = self.input_fd
        if memory is None or fd is None:
            return
        with self._pending_lock:
            waiting = bool(self._pending)
        rxq = self.queues[RECEIVEQ].queue
        if waiting or not (rxq.has_available(memory) or rxq.enable_notification(memory)):
            # Nowhere to put more input: stop polling until the driver posts receive buffers.
            self._set_input_enabled(False)
            return
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            _log.warning("console: reading input failed, input closed: %s", exc)
            data = b""
        if not data:
            self._input_open = False
            worker = self._worker
            if worker is not None:
                worker.remove_fd(fd)
            return
        with self._pending_lock:
            self._pending += data
        self._deliver()

    def _deliver(self) -> None:
        """Copy waiting input into receive buffers, as many as it takes."""
        memory = self.memory
        if memory is None or self.failed:
            return
        rxq = self.queues[RECEIVEQ].queue
        used = False
        try:
            with self._pending_lock:
                while self._pending:
                    chain = rxq.pop_descriptor_chain(memory)
                    if chain is None:
                        if rxq.enable_notification(memory):
                            continue
                        break
                    count = self._fill(chain)
                    rxq.add_used(memory, chain.head_index, count)
                    used = True
                waiting = bool(self._pending)
        finally:
            if used:
                self.signal_used(RECEIVEQ)
        self._set_input_enabled(not waiting)

    def _fill(self, chain: DescriptorChain) -> int:
        memory = self.memory
        assert memory is not None
        pending = self._pending
        done = 0
        for desc in chain.writable():
            count = min(desc.len, len(pending) - done)
            if count <= 0:
                break
            memory.slice(desc.addr, count)[:] = pending[done : done + count]
            done += count
        del pending[:done]
        self._counters["rx_bytes"] += done
        return done

    def _transmit(self, index: int, chain: DescriptorChain) -> int:
        memory = self.memory
        assert memory is not None
        for desc in chain.readable():
            if desc.len:
                self._emit(memory.read(desc.addr, desc.len))
        return 0

    def _emit(self, data: bytes) -> None:
        output = self.output
        if output is None:
            self._counters["tx_dropped"] += len(data)
            return
        try:
            output.write(data)
        except (OSError, ValueError) as exc:
            _log.error("console: writing output failed, output discarded from now on: %s", exc)
            self.output = None
            self._counters["tx_dropped"] += len(data)
            return
        self._counters["tx_bytes"] += len(data)

    def _flush_output(self) -> None:
        output = self.output
        if output is not None:
            try:
                output.flush()
            except (OSError, ValueError) as exc:
                _log.error("console: flushing output failed, output discarded: %s", exc)
                self.output = None

    def on_shutdown(self) -> None:
        """Flush the output and release the feed eventfd."""
        self._flush_output()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
