"""Tests for nubis.devices.serial against the PC16550D datasheet and Linux's 8250 driver."""

from __future__ import annotations

import io
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nubis.devices.bus import Bus
from nubis.devices.serial import FIFO_SIZE, Serial16550

BASE = 0x3F8
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7


class CountingTrigger:
    """Counts interrupts."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


class Uart:
    """The UART on a port bus, with byte-wide inb/outb as a guest driver uses them."""

    def __init__(self) -> None:
        self.irq = CountingTrigger()
        self.out = io.BytesIO()
        self.dev = Serial16550(self.irq, self.out)
        self.bus = Bus("pio")
        self.bus.insert(self.dev, BASE, 8)

    def inb(self, reg: int) -> int:
        data = memoryview(bytearray(1))
        assert self.bus.read(BASE + reg, data)
        return data[0]

    def outb(self, reg: int, value: int) -> None:
        assert self.bus.write(BASE + reg, memoryview(bytes([value])))


@pytest.fixture
def uart() -> Uart:
    return Uart()


def test_reset_state(uart: Uart) -> None:
    assert uart.inb(IER) == 0
    assert uart.inb(IIR) == 0x01
    assert uart.inb(LCR) == 0
    assert uart.inb(MCR) == 0
    assert uart.inb(LSR) == 0x60  # THRE | TEMT
    assert uart.inb(MSR) & 0xF0 == 0xB0  # DCD, DSR, CTS
    assert uart.irq.count == 0


def test_linux_8250_autoconfig_sequence(uart: Uart) -> None:
    """The register accesses of autoconfig() and autoconfig_16550a() in 8250_port.c."""
    # IER test: only the low four bits are implemented.
    scratch = uart.inb(IER)
    uart.outb(IER, 0)
    assert uart.inb(IER) & 0x0F == 0
    uart.outb(IER, 0x0F)
    assert uart.inb(IER) & 0x0F == 0x0F
    uart.outb(IER, scratch)
    # Loopback test: MCR = LOOP | OUT2 | RTS must read back as DCD | CTS.
    save_mcr = uart.inb(MCR)
    save_lcr = uart.inb(LCR)
    uart.outb(MCR, 0x10 | 0x0A)
    assert uart.inb(MSR) & 0xF0 == 0x90
    uart.outb(MCR, save_mcr)
    # FIFO detection: with FIFOs enabled IIR bits 7:6 are both set -> 16550A.
    uart.outb(LCR, 0xBF)
    uart.outb(2, 0)  # EFR on enhanced parts, FCR here
    uart.outb(LCR, 0)
    uart.outb(FCR, 0x01)
    assert uart.inb(IIR) >> 6 == 3
    # autoconfig_16550a: no EFR behind DLAB or LCR=0xBF (must not read 0).
    uart.outb(LCR, 0x80)
    assert uart.inb(2) != 0
    uart.outb(LCR, 0xBF)
    assert uart.inb(2) != 0
    # No NS SuperIO: bit 4 of "EXCR1" (IIR here) does not follow MCR.LOOP.
    uart.outb(LCR, 0)
    status1 = uart.inb(MCR)
    uart.outb(LCR, 0xE0)
    status2 = uart.inb(2)
    assert not (status1 ^ status2) & 0x10
    uart.outb(LCR, 0)
    uart.outb(MCR, status1 ^ 0x10)
    uart.outb(LCR, 0xE0)
    status2 = uart.inb(2)
    uart.outb(LCR, 0)
    uart.outb(MCR, status1)
    assert not (status2 ^ status1) & 0x10
    # Not a 16750: IIR bit 5 stays clear with the 64-byte FIFO bit, with and without DLAB.
    uart.outb(FCR, 0x01 | 0x20)
    assert uart.inb(IIR) & 0xE0 == 0xC0
    uart.outb(FCR, 0)
    uart.outb(LCR, 0x80)
    uart.outb(FCR, 0x01 | 0x20)
    assert uart.inb(IIR) & 0xE0 == 0xC0
    uart.outb(FCR, 0)
    uart.outb(LCR, 0)
    # Not an XScale UART: IER bit 6 (UUE) does not stick.
    ier = uart.inb(IER)
    uart.outb(IER, ier | 0x40)
    assert not uart.inb(IER) & 0x40
    uart.outb(IER, ier)
    # Scratch register holds a value (the 8250/16450 path tests it too).
    uart.outb(SCR, 0xA5)
    assert uart.inb(SCR) == 0xA5
    uart.outb(SCR, 0x5A)
    assert uart.inb(SCR) == 0x5A
    uart.outb(LCR, save_lcr)
    assert uart.out.getvalue() == b""


def test_linux_startup_thre_test(uart: Uart) -> None:
    """serial8250_do_startup: THRE must be re-asserted every time ETBEI is enabled."""
    uart.outb(FCR, 0x07)
    assert uart.inb(LSR) != 0xFF
    assert uart.inb(LSR) & 0x20
    uart.outb(IER, 0x02)
    assert uart.irq.count == 1
    iir1 = uart.inb(IIR)
    uart.outb(IER, 0)
    uart.outb(IER, 0x02)
    iir = uart.inb(IIR)
    uart.outb(IER, 0)
    assert iir1 == 0xC2
    assert iir == 0xC2
    assert uart.irq.count == 2
    # The TXEN test: enabling THRI gives an interrupt right away.
    uart.outb(IER, 0x02)
    lsr = uart.inb(LSR)
    iir = uart.inb(IIR)
    uart.outb(IER, 0)
    assert lsr & 0x40
    assert not iir & 0x01


def test_reading_iir_clears_thre_until_next_write(uart: Uart) -> None:
    uart.outb(FCR, 0x01)
    uart.outb(IER, 0x02)
    assert uart.inb(IIR) == 0xC2
    assert uart.inb(IIR) == 0xC1
    uart.outb(THR, ord("x"))
    assert uart.irq.count == 2
    assert uart.inb(IIR) == 0xC2
    assert uart.out.getvalue() == b"x"


def test_a_transmit_burst_raises_the_line_once(uart: Uart) -> None:
    """Linux's 8250 handler reads IIR, then fills the 16-byte FIFO: one edge, not sixteen."""
    uart.outb(FCR, 0x07)
    uart.outb(IER, 0x02)  # start_tx: THR is empty, so the line rises
    assert uart.irq.count == 1
    for burst in (b"0123456789abcdef", b"ghijklmnopqrstuv"):
        assert uart.inb(IIR) == 0xC2  # the handler's IIR read drops the line
        for byte in burst:
            uart.outb(THR, byte)
        assert uart.inb(LSR) == 0x60
    assert uart.irq.count == 3  # one rise per burst
    assert uart.inb(IIR) == 0xC2
    uart.outb(IER, 0)  # stop_tx with nothing left to send
    assert uart.inb(IIR) == 0xC1
    assert uart.irq.count == 3
    assert uart.out.getvalue() == b"0123456789abcdefghijklmnopqrstuv"


def test_a_condition_that_arrives_while_the_line_is_high_sends_no_edge(uart: Uart) -> None:
    uart.outb(FCR, 0x01)
    uart.outb(IER, 0x01)
    uart.dev.enqueue_input(b"a")
    assert uart.irq.count == 1
    uart.outb(IER, 0x03)  # THR empty as well: the line was already high
    uart.dev.enqueue_input(b"b")
    assert uart.irq.count == 1
    assert uart.inb(IIR) == 0xC4
    assert uart.inb(RBR) == ord("a")
    assert uart.inb(RBR) == ord("b")
    assert uart.inb(IIR) == 0xC2  # THR empty is still pending: the line never fell
    assert uart.irq.count == 1
    uart.outb(THR, ord("x"))  # the line fell at the IIR read; THR empty raises it again
    assert uart.irq.count == 2


def test_iir_without_fifo_has_no_high_bits(uart: Uart) -> None:
    uart.outb(IER, 0x02)
    assert uart.inb(IIR) == 0x02
    assert uart.inb(IIR) == 0x01


def test_transmit_writes_to_output(uart: Uart) -> None:
    for byte in b"hello\n":
        uart.outb(THR, byte)
    assert uart.out.getvalue() == b"hello\n"
    assert uart.inb(LSR) == 0x60
    assert uart.irq.count == 0  # THRI not enabled


def test_receive_raises_rda_and_reads_fifo_in_order(uart: Uart) -> None:
    uart.outb(FCR, 0x01)
    assert uart.dev.enqueue_input(b"ab") == 2
    assert uart.irq.count == 0  # RDI disabled
    assert uart.inb(LSR) == 0x61
    uart.outb(IER, 0x01)  # enabling RDI with data waiting raises it
    assert uart.irq.count == 1
    assert uart.inb(IIR) == 0xC4
    assert uart.inb(RBR) == ord("a")
    assert uart.inb(IIR) == 0xC4  # reading IIR does not clear RDA
    assert uart.inb(RBR) == ord("b")
    assert uart.inb(LSR) == 0x60
    assert uart.inb(IIR) == 0xC1
    uart.dev.enqueue_input(b"c")
    assert uart.irq.count == 2


def test_rda_has_priority_over_thre(uart: Uart) -> None:
    uart.outb(FCR, 0x01)
    uart.outb(IER, 0x03)
    uart.dev.enqueue_input(b"z")
    assert uart.inb(IIR) == 0xC4
    uart.inb(RBR)
    assert uart.inb(IIR) == 0xC2
    assert uart.inb(IIR) == 0xC1


def test_fifo_capacity_and_clear(uart: Uart) -> None:
    assert uart.dev.input_space == 1  # FIFOs disabled: a single holding register
    uart.outb(FCR, 0x01)
    assert uart.dev.input_space == FIFO_SIZE
    assert uart.dev.enqueue_input(bytes(FIFO_SIZE + 10)) == FIFO_SIZE
    assert uart.dev.enqueue_input(b"x") == 0
    uart.outb(FCR, 0x01 | 0x02)  # clear RX FIFO
    assert uart.inb(LSR) & 0x01 == 0
    assert uart.dev.enqueue_input(b"xy") == 2
    uart.outb(FCR, 0x00)  # leaving FIFO mode resets the FIFOs
    assert uart.inb(LSR) & 0x01 == 0
    assert uart.inb(RBR) == 0


def test_divisor_latch(uart: Uart) -> None:
    uart.outb(LCR, 0x83)
    assert (uart.inb(DLL), uart.inb(DLM)) == (12, 0)
    uart.outb(DLL, 0x01)
    uart.outb(DLM, 0x02)
    assert (uart.inb(DLL), uart.inb(DLM)) == (0x01, 0x02)
    uart.outb(LCR, 0x03)
    # DLL/DLM writes did not reach THR or IER
    assert uart.inb(IER) == 0
    assert uart.out.getvalue() == b""
    uart.outb(THR, ord("k"))
    assert uart.out.getvalue() == b"k"
    uart.outb(LCR, 0x83)
    assert uart.inb(DLL) == 0x01


def test_loopback_receives_transmitted_bytes(uart: Uart) -> None:
    uart.outb(FCR, 0x01)
    uart.outb(MCR, 0x10)
    uart.outb(IER, 0x01)
    uart.outb(THR, 0x42)
    assert uart.out.getvalue() == b""
    assert uart.inb(LSR) & 0x01
    assert uart.inb(RBR) == 0x42
    assert uart.irq.count == 1
    assert uart.dev.enqueue_input(b"host") == 0  # disconnected from the outside in loopback


def test_loopback_overrun_sets_oe_and_rls(uart: Uart) -> None:
    uart.outb(MCR, 0x10)  # FIFOs off: one-byte holding register
    uart.outb(IER, 0x04)
    uart.outb(THR, 1)
    uart.outb(THR, 2)
    assert uart.inb(IIR) == 0x06
    assert uart.inb(LSR) == 0x63
    assert uart.inb(LSR) == 0x61  # OE clears on read
    assert uart.inb(IIR) == 0x01


def test_loopback_modem_lines_and_deltas(uart: Uart) -> None:
    uart.inb(MSR)
    uart.outb(MCR, 0x10 | 0x01 | 0x04)  # LOOP | DTR | OUT1
    assert uart.inb(MSR) == 0x60 | 0x01 | 0x08  # DSR | RI; CTS and DCD dropped
    assert uart.inb(MSR) == 0x60
    uart.outb(IER, 0x08)
    uart.outb(MCR, 0x10 | 0x01)  # RI falls
    assert uart.irq.count == 1
    assert uart.inb(IIR) == 0x00
    assert uart.inb(MSR) == 0x20 | 0x04
    assert uart.inb(IIR) == 0x01


def test_output_error_does_not_escape() -> None:
    class Broken:
        def write(self, data: bytes) -> int:
            raise BrokenPipeError("closed")

        def flush(self) -> None:
            pass

    dev = Serial16550(CountingTrigger(), Broken())
    dev.write(BASE, THR, memoryview(b"x"))


def test_no_output_object_drops_bytes() -> None:
    dev = Serial16550(CountingTrigger())
    dev.write(BASE, THR, memoryview(b"x"))


def test_word_access_touches_successive_registers(uart: Uart) -> None:
    data = memoryview(bytearray(2))
    uart.bus.read(BASE + LSR, data)
    assert bytes(data) == bytes([0x60, 0xB0])


def test_concurrent_input_and_reads_lose_nothing(uart: Uart) -> None:
    uart.outb(FCR, 0x01)
    payload = bytes(range(256)) * 8
    received = bytearray()

    def feed() -> None:
        pending = payload
        while pending:
            pending = pending[uart.dev.enqueue_input(pending) :]

    feeder = threading.Thread(target=feed)
    feeder.start()
    while len(received) < len(payload):
        if uart.inb(LSR) & 0x01:
            received.append(uart.inb(RBR))
    feeder.join()
    assert bytes(received) == payload


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 7), st.integers(0, 255), st.booleans()),
        max_size=60,
    )
)
def test_random_register_traffic_keeps_invariants(ops: list[tuple[int, int, bool]]) -> None:
    uart = Uart()
    for reg, value, is_write in ops:
        if is_write:
            uart.outb(reg, value)
        else:
            uart.inb(reg)
        uart.dev.enqueue_input(b"i")
        lcr = uart.inb(LCR)
        uart.outb(LCR, lcr & 0x7F)
        assert uart.inb(LSR) & 0x60 == 0x60
        assert uart.inb(IER) & 0xF0 == 0
        iir = uart.inb(IIR)
        assert iir & 0x0F in (0x00, 0x01, 0x02, 0x04, 0x06)
        assert iir & 0x30 == 0
        uart.outb(LCR, lcr)


def _line(uart: Uart) -> bool:
    """The interrupt output's level, read without an access's side effects."""
    return uart.dev._pending().value != 0x01


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("in"), st.integers(0, 7)),
            st.tuples(st.just("out"), st.integers(0, 7), st.integers(0, 255)),
            st.tuples(st.just("input"), st.binary(min_size=1, max_size=4)),
        ),
        max_size=80,
    )
)
def test_an_interrupt_is_sent_exactly_on_each_rise_of_the_line(ops: list[tuple]) -> None:
    """A model of the edge-triggered ISA line: one interrupt per low-to-high change of IIR."""
    uart = Uart()
    rises = 0
    line = _line(uart)
    for op in ops:
        if op[0] == "in":
            uart.inb(op[1])
        elif op[0] == "out":
            uart.outb(op[1], op[2])
        else:
            uart.dev.enqueue_input(op[1])
        now = _line(uart)
        rises += now and not line
        line = now
        assert uart.irq.count == rises
