"""Device worker threads: epoll over queue notifications and device fds (virtio 1.2, 2.7.13, 2.1.2).

A virtqueue notification never enters a vCPU thread: the driver's write to the notify register
hits an ioeventfd, and the device's :class:`Worker` thread, blocked in ``epoll_wait`` on those
eventfds (plus any fd the device reads from, such as a console input), wakes up and processes the
queue. A stop eventfd ends the thread; the request being processed always finishes first.

:class:`QueueDevice` is the part every queue-based device shares: activation and its checks, the
pop/complete/notify loop with notification suppression (2.7.10), interrupts through the
transport's :class:`~nubis.virtio.device.VirtioInterrupt`, and failure handling. When the driver
breaks the queue rules (a :class:`~nubis.virtio.queue.QueueError`) or the backend fails
unexpectedly, the device logs once, stops processing and reports DEVICE_NEEDS_RESET through the
``set_needs_reset()`` method of the interrupt object the transport passed at activation (2.1.2);
nubis itself keeps running.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from nubis._log import getLogger
from nubis._thread import name_os_thread
from nubis.virtio.device import ActivatedQueue, InterruptKind, VirtioInterrupt
from nubis.virtio.queue import DescriptorChain, QueueError

if TYPE_CHECKING:
    from nubis.memory import GuestMemory

_log = getLogger(__name__)

_READABLE = select.EPOLLIN
# An eventfd that counts events (a queue's ioeventfd, an AIO completion eventfd) is watched
# edge-triggered: epoll reports it once for every write after the last report, so its counter
# never needs reading, and each wake-up saves the read(2) that would reset it. Its callback
# must then take everything there is (a whole queue, every completion), since a write during
# the callback is reported again but the counter itself says nothing.
_EDGE = select.EPOLLIN | select.EPOLLET


class Worker:
    """A thread that waits with epoll on file descriptors and runs their callbacks.

    Callbacks run on the worker thread, one at a time. If a callback raises, the worker calls
    ``on_error`` with the exception and ends; nothing propagates further.
    """

    def __init__(self, name: str, on_error: Callable[[BaseException], None]) -> None:
        """Prepare a stopped worker; ``name`` names the thread."""
        self.name = name
        self._on_error = on_error
        self._epoll = select.epoll()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._stop_fd, _READABLE)
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._masks: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._on_start: Callable[[], None] | None = None
        self._closed = False

    def add_fd(
        self, fd: int, callback: Callable[[], None], *, enabled: bool = True, edge: bool = False
    ) -> None:
        """Run ``callback`` whenever ``fd`` is readable (while enabled).

        With ``edge``, for an eventfd whose counter nobody reads, ``callback`` runs once for the
        writes made since it last ran (see `_EDGE`) instead of while the counter is not zero.
        """
        mask = _EDGE if edge else _READABLE
        self._callbacks[fd] = callback
        self._masks[fd] = mask
        self._epoll.register(fd, mask if enabled else 0)

    def set_enabled(self, fd: int, enabled: bool) -> None:
        """Start or pause watching ``fd``, e.g. while a device has nowhere to put its input."""
        if fd in self._callbacks and not self._closed:
            self._epoll.modify(fd, self._masks[fd] if enabled else 0)

    def remove_fd(self, fd: int) -> None:
        """Stop watching ``fd`` for good (it reached end of file, say)."""
        self._masks.pop(fd, None)
        if self._callbacks.pop(fd, None) is not None and not self._closed:
            self._epoll.unregister(fd)

    def start(self, on_start: Callable[[], None] | None = None) -> None:
        """Start the thread; ``on_start`` runs first on it (e.g. to process queues once)."""
        if self._thread is not None:
            raise RuntimeError(f"worker {self.name} was already started")
        self._on_start = on_start
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Ask the thread to end after the callback in progress, wait for it and free the fds.

        Safe to call more than once, and from the worker thread itself (then it does not wait).
        """
        if self._closed:
            return
        os.eventfd_write(self._stop_fd, 1)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
            self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._epoll.close()
            os.close(self._stop_fd)

    def _run(self) -> None:
        name_os_thread()
        try:
            if self._on_start is not None:
                self._on_start()
            stopping = False
            while not stopping:
                for fd, _mask in self._epoll.poll():
                    if fd == self._stop_fd:
                        stopping = True
                        continue
                    callback = self._callbacks.get(fd)
                    if callback is not None:
                        callback()
        except BaseException as exc:
            self._on_error(exc)


def clear_eventfd(fd: int) -> None:
    """Reset an eventfd's counter so epoll stops reporting it (a no-op if already zero)."""
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 8)


class QueueDevice:
    """Shared activation, queue processing and failure handling of a queue-based device.

    Subclasses set ``device_type``, offer features through ``avail_features`` and implement
    :meth:`handle_chain` (or override :meth:`queue_notified`). A device is either idle (before
    activation, after reset) or active with a running worker; after a failure it stays inert until
    the driver resets it.
    """

    def __init__(self, name: str, queue_max_sizes: Sequence[int]) -> None:
        """``name`` is used for the thread and in log messages."""
        self.name = name
        self._queue_max_sizes = tuple(queue_max_sizes)
        self.acked_features = 0
        self.memory: GuestMemory | None = None
        self.interrupt: VirtioInterrupt | None = None
        self.queues: tuple[ActivatedQueue, ...] = ()
        self._worker: Worker | None = None
        self.failed = False
        self._lock = threading.RLock()

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        """The maximum size of each queue the device offers."""
        return self._queue_max_sizes

    @property
    def avail_features(self) -> int:
        """Feature bits offered to the driver; subclasses override."""
        raise NotImplementedError

    @property
    def active(self) -> bool:
        """Whether the device was activated and not reset since."""
        return self.memory is not None

    def ack_features(self, features: int) -> None:
        """Record the features the driver accepted (masked to what the device offers)."""
        self.acked_features = features & self.avail_features

    def activate(
        self,
        memory: GuestMemory,
        interrupt: VirtioInterrupt,
        queues: Sequence[ActivatedQueue],
    ) -> None:
        """Check the driver's queue setup and start the worker thread."""
        with self._lock:
            if self.active:
                raise ValueError(f"{self.name} is already active")
            if len(queues) != len(self._queue_max_sizes):
                raise ValueError(
                    f"{self.name} needs {len(self._queue_max_sizes)} queues, got {len(queues)}"
                )
            for expected, activated in enumerate(queues):
                if activated.index != expected or not activated.queue.ready:
                    raise ValueError(f"{self.name} queue {expected} is not enabled")
                try:
                    activated.queue.validate(memory)
                except QueueError as exc:
                    raise ValueError(f"{self.name} queue {expected}: {exc}") from exc
            self.memory = memory
            self.interrupt = interrupt
            self.queues = tuple(queues)
            self.failed = False
            worker = Worker(f"nubis-{self.name}", self._worker_failed)
            for activated in self.queues:
                worker.add_fd(activated.notify_fd, self._notify_callback(activated), edge=True)
            self.setup_worker(worker)
            self._worker = worker
            worker.start(self._process_all)

    def _notify_callback(self, activated: ActivatedQueue) -> Callable[[], None]:
        # Edge-triggered, never read: queue_notified takes every available chain.
        return functools.partial(self.queue_notified, activated.index)

    def _process_all(self) -> None:
        for activated in self.queues:
            self.queue_notified(activated.index)

    def setup_worker(self, worker: Worker) -> None:
        """Hook: register extra fds (console input, tap) before the worker starts."""

    def queue_notified(self, index: int) -> None:
        """The driver notified queue ``index``; by default complete every available chain."""
        self.drain_queue(index, self.handle_chain)

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        """Process one chain from queue ``index``; return the bytes written to it."""
        raise NotImplementedError

    def drain_queue(
        self, index: int, handler: Callable[[int, DescriptorChain], int], limit: int = -1
    ) -> int:
        """Pop, handle and complete chains of queue ``index`` until none is left (or ``limit``).

        Notifications stay suppressed while the device works (2.7.10); one interrupt covers every
        chain completed here. Returns the number of chains completed.
        """
        memory = self.memory
        if memory is None or self.failed:
            return 0
        queue = self.queues[index].queue
        done = 0
        try:
            while True:
                queue.disable_notification(memory)
                while done != limit and (chain := queue.pop_descriptor_chain(memory)) is not None:
                    queue.add_used(memory, chain.head_index, handler(index, chain))
                    done += 1
                if done == limit or not queue.enable_notification(memory):
                    break
        finally:
            if done:
                self.signal_used(index)
        return done

    def signal_used(self, index: int) -> None:
        """Interrupt the driver for queue ``index`` if it asked to be told about used buffers."""
        memory, interrupt = self.memory, self.interrupt
        if (
            memory is not None
            and interrupt is not None
            and self.queues[index].queue.needs_notification(memory)
        ):
            interrupt.trigger(InterruptKind.QUEUE, index)

    def _worker_failed(self, exc: BaseException) -> None:
        self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """Stop processing after ``exc``, log it once and report DEVICE_NEEDS_RESET."""
        if self.failed:
            return
        self.failed = True
        if isinstance(exc, QueueError):
            _log.error(
                "%s: the driver broke the queue rules: %s; the device needs a reset", self.name, exc
            )
        else:
            _log.error("%s: the device failed; it needs a reset", self.name, exc_info=exc)
        # The transport's interrupt object sets the status bit and raises the config interrupt.
        callback = getattr(self.interrupt, "set_needs_reset", None)
        if callback is not None:
            try:
                callback()
            except Exception:
                _log.exception("%s: reporting DEVICE_NEEDS_RESET failed", self.name)

    def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()

    def reset(self) -> None:
        """Stop the worker once its current request is done and return to the idle state."""
        with self._lock:
            self._stop_worker()
            self.on_reset()
            for activated in self.queues:
                activated.queue.release_memory()
            self.memory = None
            self.interrupt = None
            self.queues = ()
            self.acked_features = 0
            self.failed = False

    def on_reset(self) -> None:
        """Hook: forget device state that a driver reset clears."""

    def shutdown(self) -> None:
        """Stop the worker, complete the chains still available, then release the backend."""
        with self._lock:
            self._stop_worker()
            if self.active and not self.failed:
                try:
                    for activated in self.queues:
                        self.drain_on_shutdown(activated.index)
                except Exception as exc:
                    self.fail(exc)
            for activated in self.queues:
                activated.queue.release_memory()
            self.on_shutdown()

    def drain_on_shutdown(self, index: int) -> None:
        """Hook: finish queue ``index``'s outstanding work as the VM stops (default: process it)."""
        self.queue_notified(index)

    def on_shutdown(self) -> None:
        """Hook: flush and close the backend."""
