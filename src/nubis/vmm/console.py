"""The host side of the guest's consoles: where output goes and where input comes from.

A console (the 16550 serial port or virtio-console) is configured as Off (no device), Null
(a device whose output is dropped), Tty (nubis's standard output, and standard input in raw
mode when it is a terminal) or File (output appended to a file). Device models only see a
writer with ``write``/``flush`` and receive input through a callback, so they stay sans-IO.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import tty
from collections.abc import Callable

from nubis._log import getLogger
from nubis.vmm.config import ConsoleConfig, ConsoleMode

_log = getLogger(__name__)


class NullOutput:
    """A console output that drops everything (``Null`` mode)."""

    def write(self, data: bytes, /) -> int:
        """Drop ``data``."""
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""


class FdOutput:
    """A console output writing to a file descriptor from its own thread.

    ``write`` only appends to a buffer and wakes the writer thread, so a vCPU thread that
    emits a console byte never waits for the terminal, a pipe or a slow file system; bytes
    written close together leave in one ``os.write``. ``close`` drains what is buffered.
    """

    def __init__(self, fd: int, *, owned: bool) -> None:
        self._fd = fd
        self._owned = owned
        self._buffer = bytearray()
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="console-output", daemon=True)
        self._thread.start()

    def write(self, data: bytes, /) -> int:
        """Queue ``data`` for output."""
        with self._cond:
            if not self._buffer:
                self._cond.notify()
            self._buffer += data
        return len(data)

    def flush(self) -> None:
        """Output leaves as soon as the writer thread runs; nothing to force."""

    def close(self) -> None:
        """Write out what is buffered, stop the thread, close the file if this object opened it."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=5.0)
        if self._owned:
            os.close(self._fd)
            self._owned = False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._buffer and not self._closing:
                    self._cond.wait()
                if not self._buffer:
                    return
                chunk = bytes(self._buffer)
                self._buffer.clear()
            self._write_all(chunk)

    def _write_all(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                select.select([], [self._fd], [], 1.0)
                continue
            except OSError as error:  # a closed terminal or pipe: drop output, keep the VM
                _log.debug("console output dropped: %s", error)
                return
            view = view[written:]


def open_output(config: ConsoleConfig) -> NullOutput | FdOutput | None:
    """The writer for a console's output, or None when the console is Off."""
    if config.mode is ConsoleMode.OFF:
        return None
    if config.mode is ConsoleMode.NULL:
        return NullOutput()
    if config.mode is ConsoleMode.TTY:
        return FdOutput(sys.stdout.fileno(), owned=False)
    assert config.file is not None
    fd = os.open(config.file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    return FdOutput(fd, owned=True)


class TerminalInput:
    """Forwards nubis's standard input to a console while the VM runs.

    When standard input is a terminal it is put in raw mode (so keys reach the guest as typed,
    Ctrl-C included) and restored on :meth:`stop`. ``sink`` takes bytes and returns how many it
    accepted; the rest is offered again shortly, so no keystroke is lost.
    """

    def __init__(self, sink: Callable[[bytes], int], fd: int | None = None) -> None:
        self._sink = sink
        self._fd = sys.stdin.fileno() if fd is None else fd
        self._saved: list[object] | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="console-input", daemon=True)

    def start(self) -> None:
        """Enter raw mode (on a terminal) and start forwarding."""
        if os.isatty(self._fd):
            try:
                self._saved = termios.tcgetattr(self._fd)
                tty.setraw(self._fd, termios.TCSANOW)
            except termios.error:
                pass
        self._thread.start()

    def stop(self) -> None:
        """Stop forwarding and restore the terminal."""
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        if self._saved is not None:
            try:
                termios.tcsetattr(self._fd, termios.TCSANOW, self._saved)  # type: ignore[arg-type]
            except termios.error:
                pass
            self._saved = None
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        pending = b""
        while True:
            timeout = 0.01 if pending else None
            try:
                ready, _, _ = select.select([self._fd, self._stop_r], [], [], timeout)
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            if not pending and self._fd in ready:
                try:
                    pending = os.read(self._fd, 256)
                except OSError:
                    return
                if not pending:
                    return  # end of input: the guest keeps running without it
            if pending:
                taken = self._sink(pending)
                pending = pending[taken:]
