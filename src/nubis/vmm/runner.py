"""The VMM process: the control loop that owns the VM's lifecycle.

The main thread runs :meth:`Vmm.run_loop`. Everything that changes the VM's state reaches it
either as a machine exit (the guest powered off, reset, or a vCPU failed — reported from vCPU
threads), a signal (SIGTERM, SIGINT: shut down cleanly), or a REST API request (served in the
API thread, serialised by a lock, and validated against :mod:`nubis.vmm.lifecycle`).
"""

from __future__ import annotations

import os
import queue
import sys
import threading

from nubis import __version__, _log
from nubis.arch.x86_64.host import detect_host_kvm
from nubis.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_GUEST_RESET, EXIT_OK, RunOptions
from nubis.kvm import Kvm, KvmError
from nubis.loader.errors import LoaderError
from nubis.memory import GuestMemoryError
from nubis.vmm.config import ConfigError, VmConfig
from nubis.vmm.events import EventMonitor, open_event_monitor
from nubis.vmm.lifecycle import InvalidStateError, VmAction, VmState, next_state
from nubis.vmm.machine import ExitKind, Machine, MachineExit, is_linux_kernel
from nubis.vmm.vcpu import install_kick_handler

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    # The C module behind :mod:`signal`: the same functions and constants, without
    # :mod:`signal`'s enum wrappers, whose import is a noticeable part of a launch.
    import _signal as signal

_logger = _log.getLogger("nubis")


class BootError(RuntimeError):
    """The VM could not be built or started; ``status`` is the process exit status to use."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Stop:
    """Queue item: the process was asked to stop (signal or ``vmm.shutdown``)."""


class Vmm:
    """Owns at most one VM and its lifecycle; implements the API's ``VmmControl``."""

    def __init__(self, options: RunOptions, events: EventMonitor) -> None:
        self.options = options
        self.events = events
        self._lock = threading.RLock()
        self._inbox: queue.Queue[MachineExit | _Stop] = queue.Queue()
        self._kvm: Kvm | None = None
        self._config: VmConfig | None = None
        self._state: VmState | None = None
        self._machine: Machine | None = None

    # --- building and tearing down ------------------------------------------------------------

    def _open_kvm(self, kernel: str) -> Kvm:
        host = detect_host_kvm()
        if not host.can_run_linux:
            # PVM and the like run tiny guests but stop early in Linux: say so before trying.
            try:
                linux = is_linux_kernel(kernel)
            except (LoaderError, OSError) as error:
                raise BootError(str(error), EXIT_BAD_INPUT) from None
            if linux:
                raise BootError(host.reason, EXIT_FAILURE)
        if self._kvm is None:
            try:
                self._kvm = Kvm()
            except (OSError, RuntimeError) as error:
                raise BootError(str(error), EXIT_FAILURE) from None
        return self._kvm

    def _start_machine(self) -> None:
        assert self._config is not None
        kvm = self._open_kvm(self._config.payload.kernel)
        max_vcpus = kvm.get_max_vcpus()
        if self._config.cpus.boot_vcpus > max_vcpus:
            raise BootError(
                f"cpus.boot_vcpus is {self._config.cpus.boot_vcpus}, more than the "
                f"{max_vcpus} vCPUs this host's KVM allows",
                EXIT_BAD_INPUT,
            )
        self.events.vm("booting")
        try:
            machine = Machine(
                kvm,
                self._config,
                self._inbox.put,
                interactive=self.options.api_socket is None,
                events=self.events,
            )
        except (LoaderError, GuestMemoryError, ConfigError) as error:
            raise BootError(str(error), EXIT_BAD_INPUT) from None
        except (KvmError, OSError) as error:
            raise BootError(f"building the VM failed: {error}", EXIT_FAILURE) from None
        self._machine = machine
        machine.start()
        self.events.vm("booted")

    def _stop_machine(self) -> None:
        machine, self._machine = self._machine, None
        if machine is not None:
            machine.close()

    # --- the control loop ---------------------------------------------------------------------

    def run_loop(self) -> int:
        """Handle machine exits and stop requests until the process should end; its status."""
        while True:
            try:
                item = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                if isinstance(item, _Stop):
                    self._shutdown_vm()
                    return EXIT_OK
                status = self._handle_exit(item)
                if status is not None:
                    return status

    def _handle_exit(self, exit_: MachineExit) -> int | None:
        """React to a machine exit; return an exit status when the process should end."""
        if self._machine is None or self._state not in (VmState.RUNNING, VmState.PAUSED):
            return None  # a late exit from a machine already being torn down
        self._stop_machine()
        api_mode = self.options.api_socket is not None
        if exit_.kind is ExitKind.POWER_OFF:
            _logger.info("the guest powered off")
            self._state = VmState.SHUTDOWN
            self.events.vm("shutdown")
            return None if api_mode else EXIT_OK
        if exit_.kind is ExitKind.RESET:
            reason = exit_.message or "reset requested"
            _logger.info("the guest reset (%s)", reason)
            if self.options.no_reboot:
                self._state = VmState.SHUTDOWN
                self.events.vm("shutdown")
                if api_mode:
                    return None
                # Say why: a guest that triple-faulted and one that asked to reboot end alike.
                print(f"nubis: {reason}; with --no-reboot that ends nubis", file=sys.stderr)
                return EXIT_GUEST_RESET
            self.events.vm("rebooting")
            try:
                self._start_machine()
            except BootError as error:
                print(f"nubis: error: {error}", file=sys.stderr)
                self._state = VmState.SHUTDOWN
                return None if api_mode else error.status
            self.events.vm("rebooted")
            return None
        print(f"nubis: error: {exit_.message}", file=sys.stderr)
        self._state = VmState.SHUTDOWN
        self.events.vm("shutdown")
        return None if api_mode else EXIT_FAILURE

    def _shutdown_vm(self) -> None:
        if self._machine is not None:
            self._stop_machine()
            self._state = VmState.SHUTDOWN
            self.events.vm("shutdown")

    def boot_from_command_line(self, config: VmConfig) -> None:
        """Create and boot ``config`` (already checked); raises :class:`BootError`."""
        with self._lock:
            self._config = config
            self._state = VmState.CREATED
            self._start_machine()
            self._state = VmState.RUNNING

    def request_stop(self) -> None:
        """Ask the control loop to shut the VM down and end the process (thread- and signal-safe)."""
        self._inbox.put(_Stop())

    # --- VmmControl ---------------------------------------------------------------------------

    def _transition(self, action: VmAction) -> VmState | None:
        return next_state(self._state, action)

    def ping(self) -> dict[str, Any]:
        """Build version and pid."""
        return {"build_version": __version__, "version": __version__, "pid": os.getpid()}

    def create(self, config: VmConfig) -> None:
        """Record a configuration (checked against the host) for a later boot."""
        with self._lock:
            self._transition(VmAction.CREATE)
            config.check_host()
            self._config = config
            self._state = VmState.CREATED

    def boot(self) -> None:
        """Build and start the created (or shut down) VM."""
        with self._lock:
            new_state = self._transition(VmAction.BOOT)
            try:
                self._start_machine()
            except BootError as error:
                raise InvalidStateError(f"the VM could not boot: {error}") from None
            self._state = new_state

    def pause(self) -> None:
        """Park every vCPU."""
        with self._lock:
            new_state = self._transition(VmAction.PAUSE)
            assert self._machine is not None
            self.events.vm("pausing")
            self._machine.pause()
            self._state = new_state
            self.events.vm("paused")

    def resume(self) -> None:
        """Let the vCPUs run again."""
        with self._lock:
            new_state = self._transition(VmAction.RESUME)
            assert self._machine is not None
            self.events.vm("resuming")
            self._machine.resume()
            self._state = new_state
            self.events.vm("resumed")

    def shutdown(self) -> None:
        """Stop the VM; its configuration is kept for another boot."""
        with self._lock:
            new_state = self._transition(VmAction.SHUTDOWN)
            self._stop_machine()
            self._state = new_state
            self.events.vm("shutdown")

    def reboot(self) -> None:
        """Stop and start the VM again."""
        with self._lock:
            self._transition(VmAction.REBOOT)
            self.events.vm("rebooting")
            self._stop_machine()
            try:
                self._start_machine()
            except BootError as error:
                self._state = VmState.SHUTDOWN
                raise InvalidStateError(f"the VM could not boot again: {error}") from None
            self.events.vm("rebooted")

    def power_button(self) -> None:
        """Press the ACPI power button."""
        with self._lock:
            self._transition(VmAction.POWER_BUTTON)
            assert self._machine is not None
            self._machine.press_power_button()

    def info(self) -> dict[str, Any]:
        """Configuration, state and memory size."""
        with self._lock:
            if self._config is None or self._state is None:
                next_state(None, VmAction.BOOT)  # raises NotCreatedError
            assert self._config is not None and self._state is not None
            return {
                "config": self._config.to_dict(),
                "state": self._state.value,
                "memory_actual_size": self._config.memory.size,
            }

    def counters(self) -> dict[str, dict[str, int]]:
        """Per-device counters."""
        with self._lock:
            if self._state is None:
                next_state(None, VmAction.BOOT)
            return self._machine.counters() if self._machine is not None else {}

    def delete(self) -> None:
        """Shut down if needed and forget the VM."""
        with self._lock:
            self._transition(VmAction.DELETE)
            self._shutdown_vm()
            self._config = None
            self._state = None

    def shutdown_vmm(self) -> None:
        """Shut down the VM and end the process."""
        self.request_stop()

    def close(self) -> None:
        """Release KVM and the event monitor."""
        self._stop_machine()
        if self._kvm is not None:
            self._kvm.close()
            self._kvm = None


def setup_logging(options: RunOptions) -> None:
    """Log warnings by default, more with ``-v``; to ``--log-file`` or standard error.

    With the defaults nothing is logged until a warning is, so :mod:`logging` is imported (and
    its handler installed) only then: see :mod:`nubis._log`.
    """
    if options.verbosity == 0 and not options.log_file:
        _log.defer_setup(_log.WARNING, lambda: _install_handler(options))
    else:
        _log.import_logging()
        _install_handler(options)


def _install_handler(options: RunOptions) -> None:
    import logging

    level = logging.WARNING if options.verbosity == 0 else logging.INFO
    if options.verbosity >= 2:
        level = logging.DEBUG
    handler: logging.Handler
    if options.log_file:
        handler = logging.FileHandler(options.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("nubis: %(relativeCreated)8.1f ms %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def run(config: VmConfig | None, options: RunOptions) -> int:
    """Run the VMM until the guest powers off, it is told to stop, or something fails."""
    setup_logging(options)
    install_kick_handler()
    try:
        events = open_event_monitor(options.event_monitor)
    except OSError as error:
        print(
            f"nubis: error: cannot open the event monitor {options.event_monitor}: {error.strerror}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    vmm = Vmm(options, events)
    previous = {
        sig: signal.signal(sig, lambda signum, frame: vmm.request_stop())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    server = None
    events.vmm("starting")
    try:
        if options.api_socket is not None:
            _log.import_logging()  # the API server logs through logging itself
            from nubis.api.server import ApiServer, ApiServerError

            server = ApiServer(options.api_socket, vmm)
            try:
                server.start()
            except ApiServerError as error:
                print(f"nubis: error: {error}", file=sys.stderr)
                return EXIT_FAILURE
        if config is not None:
            try:
                vmm.boot_from_command_line(config)
            except BootError as error:
                print(f"nubis: error: {error}", file=sys.stderr)
                return error.status
        return vmm.run_loop()
    finally:
        if server is not None:
            server.stop()
        vmm.close()
        events.vmm("shutdown")
        events.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
