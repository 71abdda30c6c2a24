"""The vCPU run loop against a scripted fake vCPU fd: routing, rep I/O and every outcome."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import pytest

from nubis.kvm import (
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    KvmError,
    MmioRead,
    MmioWrite,
    OtherExit,
    Shutdown,
    SystemEvent,
    VcpuExit,
)
from nubis.vmm.vcpu import (
    GuestHalted,
    GuestPowerOff,
    GuestReset,
    Vcpu,
    VcpuEvent,
    VcpuFailure,
    VcpuState,
    VcpuStateError,
)

pytestmark = pytest.mark.timeout(30)


class FakeVcpuFd:
    """Plays back exits; raises the exception instead when an item is one."""

    def __init__(self, script: Iterable[VcpuExit | Exception]) -> None:
        self.id = 3
        self.script = list(script)
        self.immediate_exit = False

    def run(self) -> VcpuExit:
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def set_immediate_exit(self, value: bool) -> None:
        self.immediate_exit = value

    def register_dump(self) -> str:
        return "rip=0x1000"

    def at_reset_vector(self) -> bool:
        return self.reset_state

    reset_state = False


class Bus:
    def __init__(self, mapped: bool = True, fill: bytes = b"\x5a") -> None:
        self.mapped = mapped
        self.fill = fill
        self.log: list[tuple[str, int, bytes]] = []

    def read(self, addr: int, data: memoryview) -> bool:
        self.log.append(("r", addr, bytes(data)))
        if self.mapped:
            data[:] = self.fill * len(data)
        return self.mapped

    def write(self, addr: int, data: memoryview) -> bool:
        self.log.append(("w", addr, bytes(data)))
        return self.mapped


def io_out(port: int, data: bytes, size: int = 1) -> IoOut:
    exit_ = IoOut()
    exit_.port, exit_.size, exit_.count, exit_.data = (
        port,
        size,
        len(data) // size,
        memoryview(data),
    )
    return exit_


def io_in(port: int, buffer: bytearray, size: int = 1) -> IoIn:
    exit_ = IoIn()
    exit_.port, exit_.size, exit_.count = port, size, len(buffer) // size
    exit_.data = memoryview(buffer)
    return exit_


def mmio_read(address: int, buffer: bytearray) -> MmioRead:
    exit_ = MmioRead()
    exit_.address, exit_.data = address, memoryview(buffer)
    return exit_


def mmio_write(address: int, data: bytes) -> MmioWrite:
    exit_ = MmioWrite()
    exit_.address, exit_.data = address, memoryview(data)
    return exit_


def system_event(kind: int, *data: int) -> SystemEvent:
    exit_ = SystemEvent()
    exit_.type, exit_.data, exit_.flags = kind, data, data[0] if data else 0
    return exit_


def run(
    script: Iterable[VcpuExit | Exception], pio: Bus | None = None, mmio: Bus | None = None
) -> VcpuEvent | None:
    return run_fd(FakeVcpuFd(script), pio, mmio)


def run_fd(fd: FakeVcpuFd, pio: Bus | None = None, mmio: Bus | None = None) -> VcpuEvent | None:
    events: list[VcpuEvent] = []
    vcpu = Vcpu(fd, pio or Bus(), mmio or Bus(), events.append)  # type: ignore[arg-type]
    vcpu.start()
    assert vcpu.join(10)
    assert vcpu.state is VcpuState.EXITED
    assert len(events) <= 1
    return events[0] if events else None


def test_port_and_mmio_exits_go_to_their_buses() -> None:
    pio, mmio = Bus(), Bus(fill=b"\x11")
    port_buffer, mmio_buffer = bytearray(2), bytearray(4)
    event = run(
        [
            io_out(0x3F8, b"A"),
            io_in(0x60, port_buffer, size=2),
            mmio_write(0xD000_0000, b"\x01\x02"),
            mmio_read(0xD000_0010, mmio_buffer),
            Hlt(),
        ],
        pio,
        mmio,
    )
    assert event == GuestHalted(3)
    assert pio.log == [("w", 0x3F8, b"A"), ("r", 0x60, b"\0\0")]
    assert mmio.log == [("w", 0xD000_0000, b"\x01\x02"), ("r", 0xD000_0010, bytes(4))]
    assert port_buffer == b"\x5a\x5a"
    assert mmio_buffer == b"\x11" * 4


def test_rep_string_io_is_one_access_per_item() -> None:
    pio = Bus(fill=b"\x07")
    buffer = bytearray(6)
    run([io_out(0x10, b"aabbcc", size=2), io_in(0x20, buffer, size=2), Hlt()], pio)
    assert pio.log == [
        ("w", 0x10, b"aa"),
        ("w", 0x10, b"bb"),
        ("w", 0x10, b"cc"),
        ("r", 0x20, b"\0\0"),
        ("r", 0x20, b"\0\0"),
        ("r", 0x20, b"\0\0"),
    ]
    assert buffer == b"\x07" * 6


def test_unmapped_reads_return_all_ones() -> None:
    port_buffer, rep_buffer, mmio_buffer = bytearray(1), bytearray(4), bytearray(8)
    run(
        [
            io_in(0x99, port_buffer),
            io_in(0x99, rep_buffer, size=2),
            mmio_read(0x1234, mmio_buffer),
            Hlt(),
        ],
        Bus(mapped=False),
        Bus(mapped=False),
    )
    assert port_buffer == b"\xff"
    assert rep_buffer == b"\xff" * 4
    assert mmio_buffer == b"\xff" * 8


@pytest.mark.parametrize(
    ("exit_", "expected"),
    [
        (system_event(1), GuestPowerOff(3)),
        (system_event(2), GuestReset(3, "the guest requested a reset")),
        (Shutdown(), GuestReset(3, "the guest triple-faulted", "rip=0x1000")),
        (Hlt(), GuestHalted(3)),
    ],
)
def test_guest_outcomes(exit_: VcpuExit, expected: VcpuEvent) -> None:
    assert run([exit_]) == expected


def test_a_triple_fault_reported_after_a_reset_says_the_registers_are_gone() -> None:
    fd = FakeVcpuFd([Shutdown()])
    fd.reset_state = True
    event = run_fd(fd)
    assert isinstance(event, GuestReset)
    assert event.reason == "the guest triple-faulted"
    assert event.registers.startswith("unavailable (KVM reset the vCPU")
    assert "rip=" not in event.registers


def test_internal_error_reports_suberror_data_and_registers() -> None:
    error = InternalError()
    error.suberror, error.data = 1, (0x0F0B, 0x2)
    event = run([error])
    assert isinstance(event, VcpuFailure)
    assert "internal error EMULATION (1)" in event.message
    assert "0xf0b" in event.message
    assert event.registers == "rip=0x1000"
    assert "\n" not in event.message


def test_fail_entry_and_unknown_exits_are_failures() -> None:
    failed = FailEntry()
    failed.hardware_entry_failure_reason, failed.cpu = 0x80000021, 1
    event = run([failed])
    assert isinstance(event, VcpuFailure)
    assert "0x80000021" in event.message and "host CPU 1" in event.message
    event = run([OtherExit(29)])
    assert isinstance(event, VcpuFailure)
    assert "X86_RDMSR (29)" in event.message
    event = run([system_event(3, 0xAB)])
    assert isinstance(event, VcpuFailure)
    assert "CRASH (3)" in event.message and "0xab" in event.message


def test_kvm_run_failure_and_device_bugs_become_failures() -> None:
    event = run([KvmError("KVM_RUN", 14, "vCPU 3")])
    assert isinstance(event, VcpuFailure)
    assert "KVM_RUN failed (vCPU 3): Bad address" in event.message

    class Broken(Bus):
        def write(self, addr: int, data: memoryview) -> bool:
            raise ZeroDivisionError("oops")

    event = run([io_out(0x10, b"x")], Broken())
    assert isinstance(event, VcpuFailure)
    assert "ZeroDivisionError: oops" in event.message


def test_spurious_interruption_keeps_running() -> None:
    fd = FakeVcpuFd([Interrupted(), io_out(0x10, b"x"), Hlt()])
    events: list[VcpuEvent] = []
    vcpu = Vcpu(fd, Bus(), Bus(), events.append)  # type: ignore[arg-type]
    vcpu.start()
    assert vcpu.join(10)
    assert events == [GuestHalted(3)]
    assert fd.immediate_exit is False


def test_suspend_and_wakeup_events_keep_running() -> None:
    assert run([system_event(5), system_event(4), Hlt()]) == GuestHalted(3)


def test_control_requests_are_checked_against_the_state() -> None:
    vcpu = Vcpu(FakeVcpuFd([Hlt()]), Bus(), Bus(), lambda event: None)  # type: ignore[arg-type]
    with pytest.raises(VcpuStateError, match="cannot pause vCPU 3 because it is created"):
        vcpu.pause()
    with pytest.raises(VcpuStateError, match="cannot resume vCPU 3 because it is created"):
        vcpu.resume()
    vcpu.start()
    assert vcpu.join(10)
    with pytest.raises(VcpuStateError, match="cannot start vCPU 3 because it is exited"):
        vcpu.start()
    vcpu.pause()  # nothing to pause: returns at once
    with pytest.raises(VcpuStateError, match="has exited"):
        vcpu.resume()


def test_stop_before_start_needs_no_thread() -> None:
    vcpu = Vcpu(FakeVcpuFd([]), Bus(), Bus(), lambda event: None)  # type: ignore[arg-type]
    vcpu.stop()
    assert vcpu.state is VcpuState.EXITED
    assert vcpu.join(0)


def test_kick_handler_needs_the_main_thread() -> None:
    import signal

    from nubis.vmm import vcpu as vcpu_module

    previous = signal.signal(vcpu_module.KICK_SIGNAL, signal.SIG_DFL)
    errors: list[BaseException] = []

    def install() -> None:
        try:
            vcpu_module.install_kick_handler()
        except BaseException as exc:
            errors.append(exc)

    try:
        thread = threading.Thread(target=install)
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert "main thread" in str(errors[0])
        vcpu_module.install_kick_handler()
        assert callable(signal.getsignal(vcpu_module.KICK_SIGNAL))
    finally:
        signal.signal(vcpu_module.KICK_SIGNAL, signal.SIG_DFL if previous is None else previous)
