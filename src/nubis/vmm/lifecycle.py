"""The VM lifecycle as an explicit state machine, and the control surface the API drives.

States and the requests that move between them (cloud-hypervisor's semantics)::

    (none) --create--> Created --boot--> Running <--pause/resume--> Paused
    Running/Paused --shutdown--> Shutdown --boot--> Running (the same config, rebuilt)
    Created/Shutdown --delete--> (none)
    Running --reboot--> Running (rebuilt)

A request that does not fit the current state raises :class:`InvalidStateError`, which the API
turns into a 4xx answer; the VM keeps running.
"""

from __future__ import annotations

from nubis._enum import Enum
from nubis._typing import Protocol
from nubis.vmm.config import VmConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class VmState(Enum):
    """The lifecycle state of the one VM a nubis process manages (``vm.info``'s ``state``)."""

    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"


class VmAction(Enum):
    """A lifecycle request."""

    CREATE = "create"
    BOOT = "boot"
    PAUSE = "pause"
    RESUME = "resume"
    SHUTDOWN = "shutdown"
    REBOOT = "reboot"
    POWER_BUTTON = "power-button"
    DELETE = "delete"


# state before (None = no VM) -> action -> state after (None = no VM).
TRANSITIONS: dict[VmState | None, dict[VmAction, VmState | None]] = {
    None: {VmAction.CREATE: VmState.CREATED},
    VmState.CREATED: {VmAction.BOOT: VmState.RUNNING, VmAction.DELETE: None},
    VmState.RUNNING: {
        VmAction.PAUSE: VmState.PAUSED,
        VmAction.SHUTDOWN: VmState.SHUTDOWN,
        VmAction.REBOOT: VmState.RUNNING,
        VmAction.POWER_BUTTON: VmState.RUNNING,
        VmAction.DELETE: None,
    },
    VmState.PAUSED: {
        VmAction.RESUME: VmState.RUNNING,
        VmAction.SHUTDOWN: VmState.SHUTDOWN,
        VmAction.DELETE: None,
    },
    VmState.SHUTDOWN: {VmAction.BOOT: VmState.RUNNING, VmAction.DELETE: None},
}


class InvalidStateError(RuntimeError):
    """A lifecycle request does not fit the VM's current state."""


class NotCreatedError(InvalidStateError):
    """A request needs a VM and none has been created."""


def next_state(state: VmState | None, action: VmAction) -> VmState | None:
    """The state after ``action`` from ``state``, or :class:`InvalidStateError` with a sentence."""
    allowed = TRANSITIONS[state]
    if action not in allowed:
        if state is None:
            raise NotCreatedError(f"cannot {action.value} the VM: no VM has been created")
        raise InvalidStateError(f"cannot {action.value} the VM while it is {state.value}")
    return allowed[action]


class VmmControl(Protocol):
    """What the REST API asks of the VMM; every call is serialised by the VMM's control loop.

    Methods raise :class:`InvalidStateError` for requests that do not fit the state and
    ``nubis.vmm.config.ConfigError`` for bad configurations.
    """

    def ping(self) -> dict[str, Any]:
        """``vmm.ping``: build version and pid."""
        ...

    def create(self, config: VmConfig) -> None:
        """``vm.create``: record the configuration; nothing runs yet."""
        ...

    def boot(self) -> None:
        """``vm.boot``: build and start the VM."""
        ...

    def pause(self) -> None:
        """``vm.pause``: park every vCPU and quiesce devices."""
        ...

    def resume(self) -> None:
        """``vm.resume``: continue where ``pause`` stopped."""
        ...

    def shutdown(self) -> None:
        """``vm.shutdown``: stop the VM (the config is kept; ``boot`` starts it again)."""
        ...

    def reboot(self) -> None:
        """``vm.reboot``: stop and start the VM again with the same configuration."""
        ...

    def power_button(self) -> None:
        """``vm.power-button``: press the ACPI power button."""
        ...

    def info(self) -> dict[str, Any]:
        """``vm.info``: config, state and actual memory size."""
        ...

    def counters(self) -> dict[str, dict[str, int]]:
        """``vm.counters``: per-device counters."""
        ...

    def delete(self) -> None:
        """``vm.delete``: shut down if running and forget the VM."""
        ...

    def shutdown_vmm(self) -> None:
        """``vmm.shutdown``: shut the VM down and end the nubis process (status 0)."""
        ...
