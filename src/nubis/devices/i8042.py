"""An i8042 PS/2 keyboard controller model: enough for Linux to probe it, and the reset line.

A nubis VM has no keyboard or mouse, but the i8042's "pulse output port" command is the
classic way a PC reboots (Linux's ``reboot=k``, the last resort of its reboot sequence), and
Linux probes the controller when the platform says it exists. The model follows the IBM PC AT
technical reference (keyboard controller, "Commands (I/O address hex 64)") as Linux's
``drivers/input/serio/i8042.c`` uses it:

- port 0x64 read: status register; write: a controller command;
- port 0x60 read: the output buffer; write: a command's parameter, or a byte for the keyboard;
- 0x20 / 0x60 read and write the controller configuration byte (CTR), 0xAA self-test (0x55),
  0xAB / 0xA9 keyboard / auxiliary interface tests (0x00), 0xAD / 0xAE and 0xA7 / 0xA8 disable
  and enable the ports (CTR bits 4 and 5), 0xD2 / 0xD3 loop a byte back as if from the
  keyboard / auxiliary device, 0xD0 / 0xD1 read and write the output port, 0xFE pulses the
  reset line, which calls the injected ``reset`` callback (so does clearing output port bit 0).

No keyboard or mouse is attached: bytes sent to either device are answered at once with 0xFE
and the timeout status bit, so the guest's drivers give up quickly instead of waiting.
Bytes entering the output buffer raise the keyboard or auxiliary interrupt (IRQ 1 / 12) through
optional `Trigger` objects when the CTR enables it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from nubis._enum import IntEnum, IntFlag
from nubis._log import DEBUG, getLogger
from nubis.devices.interrupt import Trigger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["I8042", "Command", "Ctr", "Status"]

_log = getLogger(__name__)

_DATA_PORT: Final = 0x60
_COMMAND_PORT: Final = 0x64


class Status(IntFlag):
    """Status register bits (port 0x64 read)."""

    OUTPUT_FULL = 0x01
    INPUT_FULL = 0x02
    SYSTEM_FLAG = 0x04
    LAST_WAS_COMMAND = 0x08
    KEYLOCK_OFF = 0x10  # set: the keyboard is not inhibited by the key lock
    AUX_DATA = 0x20
    TIMEOUT = 0x40
    PARITY_ERROR = 0x80


class Ctr(IntFlag):
    """Controller configuration byte ("command byte") bits."""

    KEYBOARD_INTERRUPT = 0x01
    AUX_INTERRUPT = 0x02
    SYSTEM_FLAG = 0x04
    IGNORE_KEYLOCK = 0x08
    KEYBOARD_DISABLED = 0x10
    AUX_DISABLED = 0x20
    TRANSLATE = 0x40


class Command(IntEnum):
    """Controller commands written to port 0x64."""

    READ_CTR = 0x20
    WRITE_CTR = 0x60
    DISABLE_AUX = 0xA7
    ENABLE_AUX = 0xA8
    TEST_AUX = 0xA9
    SELF_TEST = 0xAA
    TEST_KEYBOARD = 0xAB
    DISABLE_KEYBOARD = 0xAD
    ENABLE_KEYBOARD = 0xAE
    READ_OUTPUT_PORT = 0xD0
    WRITE_OUTPUT_PORT = 0xD1
    WRITE_KEYBOARD_OUTPUT = 0xD2
    WRITE_AUX_OUTPUT = 0xD3
    WRITE_AUX = 0xD4
    PULSE_RESET = 0xFE


SELF_TEST_PASSED: Final = 0x55
INTERFACE_TEST_PASSED: Final = 0x00
DEVICE_NO_RESPONSE: Final = 0xFE
_OUTPUT_PORT_RESET: Final = 0x01  # output port bit 0: 0 holds the CPU in reset
_OUTPUT_PORT_A20: Final = 0x02
_DEFAULT_CTR: Final = Ctr.SYSTEM_FLAG | Ctr.TRANSLATE

_Callback = Callable[[], None]


class I8042:
    """The i8042 controller at ports 0x60 (data) and 0x64 (command/status).

    Insert it on the port bus as two one-byte ranges (0x60 and 0x64); the access's ``base``
    tells the ports apart. ``reset`` is called for every reset pulse the guest requests
    (Linux may pulse several times), so it must be idempotent.
    """

    def __init__(
        self,
        reset: _Callback,
        keyboard_interrupt: Trigger | None = None,
        aux_interrupt: Trigger | None = None,
    ) -> None:
        self._reset = reset
        self._keyboard_interrupt = keyboard_interrupt
        self._aux_interrupt = aux_interrupt
        self._lock = threading.Lock()
        self._ctr = int(_DEFAULT_CTR)
        self._output: collections.deque[tuple[int, int]] = collections.deque()  # (byte, flags)
        self._pending_command: int | None = None
        self._last_was_command = False
        self._output_port = _OUTPUT_PORT_RESET | _OUTPUT_PORT_A20
        self.reset_requests = 0

    def __repr__(self) -> str:
        return f"I8042(ctr={self._ctr:#x}, queued={len(self._output)})"

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """Read the status register (0x64) or the output buffer (0x60)."""
        with self._lock:
            value = self._status() if base + offset == _COMMAND_PORT else self._read_data()
        data[:] = bytes([value]) * len(data)

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """Write a command (0x64) or a data byte (0x60); only the first byte counts."""
        if not len(data):
            return
        value = data[0]
        with self._lock:
            if base + offset == _COMMAND_PORT:
                self._last_was_command = True
                pulse = self._command(value)
            else:
                self._last_was_command = False
                pulse = self._data(value)
        if pulse:
            self.reset_requests += 1
            _log.info("guest pulsed the i8042 reset line")
            self._reset()

    # --- model (lock held) ----------------------------------------------------------------

    def _status(self) -> int:
        status = Status.KEYLOCK_OFF
        if self._ctr & Ctr.SYSTEM_FLAG:
            status |= Status.SYSTEM_FLAG
        if self._last_was_command:
            status |= Status.LAST_WAS_COMMAND
        if self._output:
            status |= Status.OUTPUT_FULL | self._output[0][1]
        return int(status)

    def _read_data(self) -> int:
        if not self._output:
            return 0
        value, _ = self._output.popleft()
        if self._output:
            self._raise(self._output[0][1])
        return value

    def _push(self, value: int, flags: int = 0) -> None:
        self._output.append((value, flags))
        if len(self._output) == 1:
            self._raise(flags)

    def _raise(self, flags: int) -> None:
        if flags & Status.AUX_DATA:
            if self._ctr & Ctr.AUX_INTERRUPT and self._aux_interrupt is not None:
                self._aux_interrupt.trigger()
        elif self._ctr & Ctr.KEYBOARD_INTERRUPT and self._keyboard_interrupt is not None:
            self._keyboard_interrupt.trigger()

    def _command(self, command: int) -> bool:
        """Run a controller command; True if it pulses the reset line."""
        self._pending_command = None
        if command == Command.READ_CTR:
            self._push(self._ctr)
        elif command in (
            Command.WRITE_CTR,
            Command.WRITE_OUTPUT_PORT,
            Command.WRITE_KEYBOARD_OUTPUT,
            Command.WRITE_AUX_OUTPUT,
            Command.WRITE_AUX,
        ):
            self._pending_command = command
        elif command == Command.SELF_TEST:
            self._ctr |= Ctr.SYSTEM_FLAG
            self._push(SELF_TEST_PASSED)
        elif command in (Command.TEST_KEYBOARD, Command.TEST_AUX):
            self._push(INTERFACE_TEST_PASSED)
        elif command == Command.DISABLE_KEYBOARD:
            self._ctr |= Ctr.KEYBOARD_DISABLED
        elif command == Command.ENABLE_KEYBOARD:
            self._ctr &= ~Ctr.KEYBOARD_DISABLED
        elif command == Command.DISABLE_AUX:
            self._ctr |= Ctr.AUX_DISABLED
        elif command == Command.ENABLE_AUX:
            self._ctr &= ~Ctr.AUX_DISABLED
        elif command == Command.READ_OUTPUT_PORT:
            self._push(self._output_port)
        elif command == Command.PULSE_RESET:
            return True
        elif _log.isEnabledFor(DEBUG):
            _log.debug("ignoring unsupported i8042 command %#x", command)
        return False

    def _data(self, value: int) -> bool:
        """Take a byte written to port 0x60; True if it pulses the reset line."""
        command, self._pending_command = self._pending_command, None
        if command == Command.WRITE_CTR:
            self._ctr = value & 0x7F
        elif command == Command.WRITE_OUTPUT_PORT:
            self._output_port = value
            return not value & _OUTPUT_PORT_RESET
        elif command == Command.WRITE_KEYBOARD_OUTPUT:
            self._push(value)
        elif command == Command.WRITE_AUX_OUTPUT:
            self._push(value, Status.AUX_DATA)
        elif command == Command.WRITE_AUX:
            self._push(DEVICE_NO_RESPONSE, Status.AUX_DATA | Status.TIMEOUT)
        else:
            self._push(DEVICE_NO_RESPONSE, Status.TIMEOUT)  # no keyboard attached
        return False
