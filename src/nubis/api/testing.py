"""A fake :class:`~nubis.vmm.lifecycle.VmmControl` for testing the API without KVM.

:class:`FakeVmm` follows :func:`~nubis.vmm.lifecycle.next_state` exactly and records every call,
so tests of the server, the remote client and anything else that drives the control surface can
check lifecycle semantics (which request is refused in which state) without building a VM.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from nubis import __version__
from nubis.vmm.config import VmConfig
from nubis.vmm.lifecycle import NotCreatedError, VmAction, VmState, next_state


class FakeVmm:
    """A VmmControl that only moves through the lifecycle states and remembers the config."""

    def __init__(self) -> None:
        self.state: VmState | None = None
        self.config: VmConfig | None = None
        self.calls: list[str] = []
        self.vmm_shutdown = threading.Event()

    def _move(self, action: VmAction) -> None:
        self.calls.append(action.value)
        self.state = next_state(self.state, action)
        if self.state is None:
            self.config = None

    def _need_vm(self, what: str) -> VmConfig:
        if self.state is None or self.config is None:
            raise NotCreatedError(f"cannot {what}: no VM has been created")
        return self.config

    def ping(self) -> dict[str, Any]:
        """Version and pid, as the real VMM answers."""
        self.calls.append("ping")
        return {
            "build_version": f"nubis-{__version__}",
            "version": __version__,
            "pid": os.getpid(),
            "features": [],
        }

    def create(self, config: VmConfig) -> None:
        """Record the configuration (refused if a VM exists)."""
        self._move(VmAction.CREATE)
        self.config = config

    def boot(self) -> None:
        """Created/Shutdown → Running."""
        self._move(VmAction.BOOT)

    def pause(self) -> None:
        """Running → Paused."""
        self._move(VmAction.PAUSE)

    def resume(self) -> None:
        """Paused → Running."""
        self._move(VmAction.RESUME)

    def shutdown(self) -> None:
        """Running/Paused → Shutdown."""
        self._move(VmAction.SHUTDOWN)

    def reboot(self) -> None:
        """Running → Running."""
        self._move(VmAction.REBOOT)

    def power_button(self) -> None:
        """Running → Running (a real guest would then power off)."""
        self._move(VmAction.POWER_BUTTON)

    def info(self) -> dict[str, Any]:
        """Config, state and memory size of the VM."""
        self.calls.append("info")
        config = self._need_vm("get the VM's info")
        assert self.state is not None
        return {
            "config": config.to_dict(),
            "state": self.state.value,
            "memory_actual_size": config.memory.size,
        }

    def counters(self) -> dict[str, dict[str, int]]:
        """Per-device counters: zeros for each configured disk and net device."""
        self.calls.append("counters")
        config = self._need_vm("get the VM's counters")
        result: dict[str, dict[str, int]] = {}
        for index, disk in enumerate(config.disks):
            result[disk.id or f"_disk{index}"] = {"read_bytes": 0, "write_bytes": 0}
        for index, net in enumerate(config.net):
            result[net.id or f"_net{index}"] = {"rx_bytes": 0, "tx_bytes": 0}
        return result

    def delete(self) -> None:
        """Forget the VM."""
        self._move(VmAction.DELETE)

    def shutdown_vmm(self) -> None:
        """Note that the VMM was asked to exit (the real one ends its process)."""
        self.calls.append("shutdown_vmm")
        self.vmm_shutdown.set()
