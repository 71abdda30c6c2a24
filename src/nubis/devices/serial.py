"""A 16550A UART register model, the guest's serial console (ttyS0 at COM1, port 0x3f8).

The register layout and behaviour follow the National Semiconductor / TI PC16550D datasheet
(section 8, "Registers"): eight byte registers, with the divisor latch (DLL/DLM) taking the
place of RBR/THR and IER while LCR bit 7 (DLAB) is set.

The model is sans-IO, as vm-superio's: output goes to an injected writer object, input arrives
through `Serial16550.enqueue_input` from whichever thread reads the host side, and interrupts
leave through an injected `Trigger` (an irqfd on IRQ 4 in a VM). Transmission is instantaneous:
a byte written to THR reaches the writer at once, so THR and the transmitter are always empty
(LSR THRE and TEMT stay set) and the "THR empty" interrupt is raised again after every byte.

The UART's interrupt output is a level: high while IIR reports an enabled condition (received
data, THR empty, an overrun, a modem status change), low otherwise. COM1's IRQ 4 is an
edge-triggered ISA line, so what reaches the interrupt controller is the rising edge: `Trigger`
fires when the level goes from low to high, after whichever access or input raised it, and not
again while it stays high. That is how a PC's interrupt controller sees a real 16550 (and what
QEMU's model does), and what Linux's 8250 driver is written for: its handler loops until IIR
says "no interrupt", and when it fills the transmit FIFO after reading IIR, the byte that makes
THR "empty" again raises the line once, not once per byte. Enabling in IER a condition that is
already present raises the line too: Linux starts transmitting by setting IER.ETBEI and
expects an interrupt because THR is empty, and its start-up test reads IIR right after enabling
ETBEI and expects 0xC2 ("THR empty").

Enough of loopback mode (MCR bit 4) is modelled for the 8250 driver's autoconfiguration: the
modem control outputs are wired back to the modem status inputs (DTR to DSR, RTS to CTS, OUT1
to RI, OUT2 to DCD) and transmitted bytes are received instead of being written out.
"""

from __future__ import annotations

import collections
import threading

from nubis._enum import IntEnum, IntFlag
from nubis._log import getLogger
from nubis._typing import Protocol
from nubis.devices.interrupt import Trigger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "FIFO_SIZE",
    "Iir",
    "Lsr",
    "Register",
    "Serial16550",
    "SerialOutput",
]

_log = getLogger(__name__)

FIFO_SIZE: Final = 64
"""Receive FIFO capacity. A 16550A has 16 bytes; more lets bursts from the host through."""


class Register(IntEnum):
    """Register offsets from the UART's base port (PC16550D, table II)."""

    DATA = 0  # RBR on read, THR on write; DLL when LCR.DLAB is set
    IER = 1  # interrupt enable; DLM when LCR.DLAB is set
    IIR_FCR = 2  # interrupt identification on read, FIFO control on write
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


class Ier(IntFlag):
    """Interrupt enable register bits."""

    RDI = 0x01  # received data available
    THRI = 0x02  # transmitter holding register empty
    RLSI = 0x04  # receiver line status
    MSI = 0x08  # modem status


class Iir(IntEnum):
    """Interrupt identification values (bits 3:0), highest priority first."""

    RECEIVER_LINE_STATUS = 0x06
    RECEIVED_DATA = 0x04
    THR_EMPTY = 0x02
    MODEM_STATUS = 0x00
    NO_INTERRUPT = 0x01


IIR_FIFO_ENABLED: Final = 0xC0
"""IIR bits 7:6, both set while FCR bit 0 has the FIFOs enabled."""


class Fcr(IntFlag):
    """FIFO control register bits (bits 7:6 are the receive trigger level, not modelled)."""

    ENABLE = 0x01
    CLEAR_RX = 0x02
    CLEAR_TX = 0x04


class Lcr(IntFlag):
    """Line control register bits that change register decoding."""

    DLAB = 0x80


class Mcr(IntFlag):
    """Modem control register bits."""

    DTR = 0x01
    RTS = 0x02
    OUT1 = 0x04
    OUT2 = 0x08
    LOOP = 0x10


class Lsr(IntFlag):
    """Line status register bits."""

    DATA_READY = 0x01
    OVERRUN = 0x02
    PARITY = 0x04
    FRAMING = 0x08
    BREAK = 0x10
    THR_EMPTY = 0x20
    TRANSMITTER_EMPTY = 0x40
    FIFO_ERROR = 0x80


class Msr(IntFlag):
    """Modem status register bits: deltas in 3:0, line states in 7:4."""

    DELTA_CTS = 0x01
    DELTA_DSR = 0x02
    TRAILING_RI = 0x04
    DELTA_DCD = 0x08
    CTS = 0x10
    DSR = 0x20
    RI = 0x40
    DCD = 0x80


_IER_MASK: Final = 0x0F
_MCR_MASK: Final = 0x1F
_MSR_DELTAS: Final = 0x0F
# Outside loopback the host side looks like a connected, ready modem.
_MSR_CONNECTED: Final = Msr.CTS | Msr.DSR | Msr.DCD
_DEFAULT_DIVISOR: Final = 12  # 9600 baud from the 1.8432 MHz clock
_BYTES: Final = tuple(bytes([value]) for value in range(256))


class SerialOutput(Protocol):
    """Where transmitted bytes go (a file, a pty, a log buffer)."""

    def write(self, data: bytes, /) -> object:
        """Take ``data``."""

    def flush(self) -> object:
        """Push buffered bytes out."""


class Serial16550:
    """A 16550A UART on a bus; ``interrupt`` is its IRQ line, ``output`` gets transmitted bytes.

    Thread-safe: `read`, `write` (vCPU threads) and `enqueue_input` (an input thread) share a lock.
    """

    def __init__(self, interrupt: Trigger, output: SerialOutput | None = None) -> None:
        self._interrupt = interrupt
        self._output = output
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self._divisor = _DEFAULT_DIVISOR
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._fifo_enabled = False
        self._overrun = False
        self._thr_interrupt = False  # the THR-empty condition, cleared by reading IIR or THR
        self._msr = int(_MSR_CONNECTED)
        self._line = False  # the interrupt output's level, as of the last access

    def __repr__(self) -> str:
        return f"Serial16550(ier={self._ier:#x}, lcr={self._lcr:#x}, mcr={self._mcr:#x})"

    # --- host side ------------------------------------------------------------------------

    @property
    def input_space(self) -> int:
        """How many more input bytes the receive FIFO accepts now."""
        with self._lock:
            return self._capacity() - len(self._rx)

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes from the host for the guest to read; returns how many fit in the FIFO.

        Bytes that do not fit are not taken (the caller keeps them for later), so no input is
        lost. Raises the received-data interrupt if it is enabled and anything was queued.
        """
        with self._lock:
            if self._mcr & Mcr.LOOP:
                return 0  # in loopback the receiver is disconnected from the outside
            accepted = min(len(data), self._capacity() - len(self._rx))
            if accepted <= 0:
                return 0
            self._rx.extend(data[:accepted])
            self._update_line()
            return accepted

    # --- bus side -------------------------------------------------------------------------

    def read(self, base: int, offset: int, data: memoryview) -> None:
        """Read register(s) starting at ``offset``; wider accesses read successive registers."""
        with self._lock:
            for index in range(len(data)):
                data[index] = self._read_register(offset + index)
            self._update_line()

    def write(self, base: int, offset: int, data: memoryview) -> None:
        """Write register(s) starting at ``offset``; wider accesses write successive registers."""
        with self._lock:
            for index, value in enumerate(data):
                self._write_register(offset + index, value)
            self._update_line()

    # --- register model (called with the lock held) ------------------------------------------

    def _update_line(self) -> None:
        """Recompute the interrupt output and send an edge if it rose."""
        line = self._pending() is not Iir.NO_INTERRUPT
        if line and not self._line:
            self._interrupt.trigger()
        self._line = line

    def _capacity(self) -> int:
        return FIFO_SIZE if self._fifo_enabled else 1

    def _lsr(self) -> int:
        lsr = Lsr.THR_EMPTY | Lsr.TRANSMITTER_EMPTY
        if self._rx:
            lsr |= Lsr.DATA_READY
        if self._overrun:
            lsr |= Lsr.OVERRUN
        return int(lsr)

    def _pending(self) -> Iir:
        """The highest-priority enabled interrupt condition (PC16550D, table IV)."""
        ier = self._ier
        if ier & Ier.RLSI and self._overrun:
            return Iir.RECEIVER_LINE_STATUS
        if ier & Ier.RDI and self._rx:
            return Iir.RECEIVED_DATA
        if ier & Ier.THRI and self._thr_interrupt:
            return Iir.THR_EMPTY
        if ier & Ier.MSI and self._msr & _MSR_DELTAS:
            return Iir.MODEM_STATUS
        return Iir.NO_INTERRUPT

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & Lcr.DLAB
        if offset == Register.DATA:
            if dlab:
                return self._divisor & 0xFF
            if self._rx:
                return self._rx.popleft()
            return 0
        if offset == Register.IER:
            return (self._divisor >> 8) if dlab else self._ier
        if offset == Register.IIR_FCR:
            pending = self._pending()
            if pending is Iir.THR_EMPTY:
                self._thr_interrupt = False  # reading IIR clears the THR-empty interrupt
            return int(pending) | (IIR_FIFO_ENABLED if self._fifo_enabled else 0)
        if offset == Register.LCR:
            return self._lcr
        if offset == Register.MCR:
            return self._mcr
        if offset == Register.LSR:
            lsr = self._lsr()
            self._overrun = False  # error bits clear when LSR is read
            return lsr
        if offset == Register.MSR:
            msr = self._msr
            self._msr &= ~_MSR_DELTAS
            return msr
        if offset == Register.SCR:
            return self._scr
        return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self._lcr & Lcr.DLAB
        if offset == Register.DATA:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == Register.IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value & _IER_MASK)
        elif offset == Register.IIR_FCR:
            self._write_fcr(value)
        elif offset == Register.LCR:
            self._lcr = value
        elif offset == Register.MCR:
            self._write_mcr(value & _MCR_MASK)
        elif offset == Register.SCR:
            self._scr = value
        # LSR and MSR are read-only; writes to them (factory test registers) are ignored.

    def _transmit(self, value: int) -> None:
        if self._mcr & Mcr.LOOP:
            if len(self._rx) < self._capacity():
                self._rx.append(value)
            else:
                self._overrun = True
        elif self._output is not None:
            try:
                self._output.write(_BYTES[value])
                self._output.flush()
            except OSError as error:
                _log.warning("serial output failed, dropping a byte: %s", error)
        # The byte left at once: THR is empty again.
        self._thr_interrupt = True

    def _write_ier(self, ier: int) -> None:
        enabled = ier & ~self._ier
        self._ier = ier
        if enabled & Ier.THRI:
            self._thr_interrupt = True  # THR is always empty

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & Fcr.ENABLE)
        if enable != self._fifo_enabled:
            self._rx.clear()  # switching FIFO mode resets both FIFOs
            self._fifo_enabled = enable
        if value & Fcr.CLEAR_RX:
            self._rx.clear()
        # The transmit FIFO is always empty, so CLEAR_TX has nothing to do.

    def _write_mcr(self, mcr: int) -> None:
        self._mcr = mcr
        if mcr & Mcr.LOOP:
            lines = 0
            if mcr & Mcr.RTS:
                lines |= Msr.CTS
            if mcr & Mcr.DTR:
                lines |= Msr.DSR
            if mcr & Mcr.OUT1:
                lines |= Msr.RI
            if mcr & Mcr.OUT2:
                lines |= Msr.DCD
        else:
            lines = int(_MSR_CONNECTED)
        old_lines = self._msr & 0xF0
        changed = old_lines ^ lines
        deltas = 0
        if changed & Msr.CTS:
            deltas |= Msr.DELTA_CTS
        if changed & Msr.DSR:
            deltas |= Msr.DELTA_DSR
        if changed & Msr.DCD:
            deltas |= Msr.DELTA_DCD
        if old_lines & Msr.RI and not lines & Msr.RI:
            deltas |= Msr.TRAILING_RI
        had_deltas = self._msr & _MSR_DELTAS
        self._msr = lines | had_deltas | deltas
