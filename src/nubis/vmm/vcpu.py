"""The vCPU run loop: one thread per vCPU that runs ``KVM_RUN`` and routes exits to the buses.

Port I/O exits go to the PIO bus and MMIO exits to the MMIO bus (``read(addr, data)`` /
``write(addr, data)``, False meaning nothing is mapped there); ``rep ins``/``rep outs`` exits
(count > 1) become one bus access per item. What the guest does to the machine as a whole
(power off, reset, a fatal error) is reported through the ``on_event`` callback as a
`VcpuEvent`, after which the thread ends.

The loop is an explicit state machine, in the manner of Firecracker's vCPU::

    CREATED --start--> RUNNING --pause--> PAUSED --resume--> RUNNING
    RUNNING, PAUSED --stop, or a guest power-off / reset / error--> EXITED

Other threads control a vCPU by setting the requested state and kicking it out of
``KVM_RUN``. The kick follows api.rst section 5 (``immediate_exit``): the controller sets
``kvm_run.immediate_exit``, then sends `KICK_SIGNAL` to the vCPU thread with
``signal.pthread_kill``. If the thread is inside ``KVM_RUN`` the signal makes it return EINTR;
if it is anywhere else, the flag makes its next ``KVM_RUN`` return EINTR at once, so no kick
is lost. After an EINTR the vCPU thread clears the flag first and only then reads the
requested state, which the controller wrote before setting the flag, so it always sees the
request that kicked it.

Python runs signal handlers only in the main thread, but the handler that matters is CPython's
C-level one, installed by ``signal.signal`` for the whole process: the signal still interrupts
the system call in the thread it was sent to, and the (no-op) Python handler later runs in the
main thread. `install_kick_handler` installs it, and must run in the main thread;
`Vcpu.start` calls it, so the first vCPU must be started from the main thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from nubis._enum import Enum, IntEnum
from nubis._frozen import Frozen
from nubis._thread import name_os_thread
from nubis._typing import Protocol
from nubis.kvm import KvmError, SystemEventType, VcpuFd
from nubis.kvm.bindings import ExitReason, InternalErrorSuberror
from nubis.kvm.exits import (
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    VcpuExit,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Final
else:
    # The C module behind :mod:`signal`: the same functions and constants, without
    # :mod:`signal`'s enum wrappers, whose import is a noticeable part of a launch.
    import _signal as signal

__all__ = [
    "KICK_SIGNAL",
    "GuestHalted",
    "GuestPowerOff",
    "GuestReset",
    "IoBus",
    "Vcpu",
    "VcpuEvent",
    "VcpuFailure",
    "VcpuState",
    "VcpuStateError",
    "install_kick_handler",
]

KICK_SIGNAL: Final = signal.SIGRTMIN
"""The signal that kicks a vCPU thread out of ``KVM_RUN`` (the first real-time signal)."""


class IoBus(Protocol):
    """What the loop needs from a PIO or MMIO bus (``nubis.devices.bus.Bus`` is one)."""

    def read(self, addr: int, data: memoryview) -> bool:
        """Fill ``data`` from the device at ``addr``; False when no device is mapped there."""
        ...

    def write(self, addr: int, data: memoryview) -> bool:
        """Deliver ``data`` to the device at ``addr``; False when no device is mapped there."""
        ...


class VcpuState(Enum):
    """Where a vCPU is in its life."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"


# The requests other threads may make, by the states they are allowed from.
_TRANSITIONS: Final[dict[str, frozenset[VcpuState]]] = {
    "start": frozenset({VcpuState.CREATED}),
    "pause": frozenset({VcpuState.RUNNING, VcpuState.PAUSED}),
    "resume": frozenset({VcpuState.PAUSED, VcpuState.RUNNING}),
    "stop": frozenset(VcpuState),
}


class VcpuStateError(RuntimeError):
    """A control request is not valid in the vCPU's current state."""


class VcpuEvent(Frozen):
    """Something a vCPU reports to the VMM; the vCPU thread has ended when it is delivered."""

    __slots__ = ("vcpu_id",)

    vcpu_id: int

    def __init__(self, vcpu_id: int) -> None:
        object.__setattr__(self, "vcpu_id", vcpu_id)


class GuestPowerOff(VcpuEvent):
    """The guest powered the machine off (KVM system event SHUTDOWN)."""

    __slots__ = ()


class GuestReset(VcpuEvent):
    """The guest asked for a reset (system event RESET) or triple-faulted; ``reason`` says which.

    After a triple fault ``registers`` is the vCPU's register dump, where the guest was when it
    could not even deliver a double fault, or why there is none (KVM on AMD resets the vCPU
    before it reports the fault); it is empty for a reset the guest asked for.
    """

    __slots__ = ("reason", "registers")

    reason: str
    registers: str

    def __init__(self, vcpu_id: int, reason: str, registers: str = "") -> None:
        super().__init__(vcpu_id)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "registers", registers)


class GuestHalted(VcpuEvent):
    """The guest executed HLT with no in-kernel irqchip to wake it: it can never run again."""

    __slots__ = ()


class VcpuFailure(VcpuEvent):
    """The vCPU cannot continue: ``message`` is one sentence, ``registers`` a register dump."""

    __slots__ = ("message", "registers")

    message: str
    registers: str

    def __init__(self, vcpu_id: int, message: str, registers: str) -> None:
        super().__init__(vcpu_id)
        object.__setattr__(self, "message", message)
        object.__setattr__(self, "registers", registers)


def _ignore_kick(signum: int, frame: object) -> None:
    """The Python-level kick handler: nothing to do, the interrupted ioctl is the point."""


def install_kick_handler() -> None:
    """Install the process-wide handler for `KICK_SIGNAL` (idempotent; main thread only).

    Without a handler the signal would kill the process, and an ignored signal would not
    interrupt ``KVM_RUN``.
    """
    current = signal.getsignal(KICK_SIGNAL)
    if callable(current):
        return
    if threading.current_thread() is not threading.main_thread():
        raise VcpuStateError(
            "the vCPU kick signal handler must be installed from the main thread, because "
            "Python only lets the main thread set signal handlers; start the first vCPU there."
        )
    signal.signal(KICK_SIGNAL, _ignore_kick)


class Vcpu:
    """One vCPU and its thread: runs the guest, routes exits, obeys pause/resume/stop.

    ``on_event`` is called from the vCPU thread, once, when the guest powers off, resets,
    halts for good or fails; it must not block on this vCPU (e.g. call ``pause`` or ``join`` on
    it). ``stop()`` ends the thread without an event.
    """

    def __init__(
        self,
        vcpu_fd: VcpuFd,
        pio_bus: IoBus,
        mmio_bus: IoBus,
        on_event: Callable[[VcpuEvent], None],
    ) -> None:
        self.fd = vcpu_fd
        self.id = vcpu_fd.id
        self._pio_bus = pio_bus
        self._mmio_bus = mmio_bus
        self._on_event = on_event
        self._cond = threading.Condition(threading.Lock())
        self._state = VcpuState.CREATED
        self._request = VcpuState.RUNNING
        self._thread = threading.Thread(
            target=self._thread_main, name=f"vcpu{self.id}", daemon=True
        )

    def __repr__(self) -> str:
        return f"Vcpu(id={self.id}, state={self._state.value})"

    @property
    def state(self) -> VcpuState:
        """The state the vCPU thread is in (not the one last requested)."""
        return self._state

    # --- control, from other threads ------------------------------------------------------

    def _check(self, request: str) -> None:
        if self._state not in _TRANSITIONS[request]:
            raise VcpuStateError(
                f"cannot {request} vCPU {self.id} because it is {self._state.value}."
            )

    def _kick(self) -> None:
        # Called with the lock held, so the thread cannot reach EXITED (and be joined and its
        # id reused) between the check and the signal.
        if self._state is VcpuState.EXITED:
            return
        self.fd.set_immediate_exit(True)
        ident = self._thread.ident
        if ident is not None:
            signal.pthread_kill(ident, KICK_SIGNAL)

    def start(self, *, paused: bool = False) -> None:
        """Start the vCPU thread; with ``paused`` it parks before entering the guest."""
        install_kick_handler()
        with self._cond:
            self._check("start")
            self._request = VcpuState.PAUSED if paused else VcpuState.RUNNING
            self._state = VcpuState.RUNNING
            if paused:
                self.fd.set_immediate_exit(True)
        self._thread.start()
        if paused:
            self.pause()

    def pause(self, timeout: float | None = None) -> None:
        """Kick the vCPU out of the guest and return once it is parked (or has exited).

        Raises `TimeoutError` if it has not parked within ``timeout`` seconds.
        """
        with self._cond:
            if self._state is VcpuState.EXITED:
                return
            self._check("pause")
            self._request = VcpuState.PAUSED
            self._kick()
            parked = self._cond.wait_for(
                lambda: self._state in (VcpuState.PAUSED, VcpuState.EXITED), timeout
            )
            if not parked:
                raise TimeoutError(f"vCPU {self.id} did not leave KVM_RUN within {timeout} s.")

    def resume(self) -> None:
        """Let a paused vCPU run the guest again."""
        with self._cond:
            if self._state is VcpuState.EXITED:
                raise VcpuStateError(f"cannot resume vCPU {self.id} because it has exited.")
            self._check("resume")
            self._request = VcpuState.RUNNING
            self._cond.notify_all()

    def stop(self) -> None:
        """Ask the vCPU thread to end, wherever it is; ``join`` waits for it."""
        with self._cond:
            self._request = VcpuState.EXITED
            if self._state is VcpuState.CREATED:
                self._state = VcpuState.EXITED
                return
            self._kick()
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the vCPU thread to end; True if it has (or never started)."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the vCPU thread -------------------------------------------------------------------

    def _park(self) -> bool:
        """Handle a kick: park while paused; False when the thread must end."""
        self.fd.set_immediate_exit(False)
        with self._cond:
            while True:
                request = self._request
                if request is VcpuState.RUNNING:
                    if self._state is not VcpuState.RUNNING:
                        self._state = VcpuState.RUNNING
                        self._cond.notify_all()
                    return True
                if request is VcpuState.EXITED:
                    return False
                if self._state is not VcpuState.PAUSED:
                    self._state = VcpuState.PAUSED
                    self._cond.notify_all()
                self._cond.wait()

    def _thread_main(self) -> None:
        name_os_thread()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {KICK_SIGNAL})
        event: VcpuEvent | None = None
        try:
            event = self._run_loop()
        except KvmError as exc:
            event = VcpuFailure(self.id, f"vCPU {self.id} stopped: {exc}.", self.fd.register_dump())
        except Exception as exc:  # a device model's bug must not vanish with the thread
            event = VcpuFailure(
                self.id,
                f"vCPU {self.id} stopped because handling its exit raised "
                f"{type(exc).__name__}: {exc}.",
                self.fd.register_dump(),
            )
        finally:
            with self._cond:
                self._state = VcpuState.EXITED
                self._cond.notify_all()
        if event is not None:
            self._on_event(event)

    def _run_loop(self) -> VcpuEvent | None:
        """Run until the guest does something the VMM must handle, or a stop request."""
        run = self.fd.run
        pio = self._pio_bus
        mmio = self._mmio_bus
        while True:
            exit_ = run()
            if isinstance(exit_, IoOut):
                if exit_.count == 1:
                    pio.write(exit_.port, exit_.data)
                else:
                    _rep(pio.write, exit_.port, exit_.size, exit_.count, exit_.data)
            elif isinstance(exit_, IoIn):
                if exit_.count == 1:
                    if not pio.read(exit_.port, exit_.data):
                        _fill_ones(exit_.data)
                else:
                    _rep(_read_or_ones(pio), exit_.port, exit_.size, exit_.count, exit_.data)
            elif isinstance(exit_, MmioWrite):
                mmio.write(exit_.address, exit_.data)
            elif isinstance(exit_, MmioRead):
                if not mmio.read(exit_.address, exit_.data):
                    _fill_ones(exit_.data)
            elif isinstance(exit_, Interrupted):
                if not self._park():
                    return None
            else:
                event = self._outcome(exit_)
                if event is not None:
                    return event

    def _outcome(self, exit_: VcpuExit) -> VcpuEvent | None:
        """Turn a rare exit into the event that ends the thread (None: keep running)."""
        vcpu = self.id
        if isinstance(exit_, SystemEvent):
            if exit_.type == SystemEventType.SHUTDOWN:
                return GuestPowerOff(vcpu)
            if exit_.type == SystemEventType.RESET:
                return GuestReset(vcpu, "the guest requested a reset")
            if exit_.type in (SystemEventType.WAKEUP, SystemEventType.SUSPEND):
                return None
            return VcpuFailure(
                vcpu,
                f"vCPU {vcpu} reported system event {_name(SystemEventType, exit_.type)} "
                f"(data {[hex(word) for word in exit_.data]}), which nubis does not handle.",
                self.fd.register_dump(),
            )
        if isinstance(exit_, Shutdown):
            if self.fd.at_reset_vector():
                registers = (
                    "unavailable (KVM reset the vCPU before it reported the triple fault, "
                    "as it does on AMD hosts)"
                )
            else:
                registers = self.fd.register_dump()
            return GuestReset(vcpu, "the guest triple-faulted", registers)
        if exit_.reason == ExitReason.IOAPIC_EOI:
            # The guest ended a level-triggered IOAPIC interrupt. The userspace IOAPIC treats
            # every line as an edge (``nubis.devices.ioapic``), so there is nothing to clear.
            return None
        if isinstance(exit_, Hlt):
            return GuestHalted(vcpu)
        if isinstance(exit_, InternalError):
            return VcpuFailure(
                vcpu,
                f"KVM could not continue running vCPU {vcpu}: internal error "
                f"{_name(InternalErrorSuberror, exit_.suberror)} "
                f"(data {[hex(word) for word in exit_.data]}).",
                self.fd.register_dump(),
            )
        if isinstance(exit_, FailEntry):
            return VcpuFailure(
                vcpu,
                f"the CPU refused to enter vCPU {vcpu}'s guest: hardware entry failure reason "
                f"{exit_.hardware_entry_failure_reason:#x} on host CPU {exit_.cpu}.",
                self.fd.register_dump(),
            )
        return VcpuFailure(
            vcpu,
            f"vCPU {vcpu} exited with {_name(ExitReason, exit_.reason)}, which nubis does "
            "not handle.",
            self.fd.register_dump(),
        )


def _name(enum_type: type[IntEnum], value: int) -> str:
    try:
        return f"{enum_type(value).name} ({value})"
    except ValueError:
        return f"unknown ({value})"


def _fill_ones(data: memoryview) -> None:
    data[:] = b"\xff" * len(data)


def _read_or_ones(bus: IoBus) -> Callable[[int, memoryview], bool]:
    def read(addr: int, data: memoryview) -> bool:
        if not bus.read(addr, data):
            _fill_ones(data)
            return False
        return True

    return read


def _rep(
    access: Callable[[int, memoryview], bool],
    port: int,
    size: int,
    count: int,
    data: memoryview,
) -> None:
    """Deliver a ``rep ins``/``rep outs`` exit as ``count`` accesses of ``size`` bytes."""
    for start in range(0, size * count, size):
        access(port, data[start : start + size])
