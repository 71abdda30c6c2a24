"""A vCPU that jumps to the real-mode reset vector resets the VM, as a BIOS would make it.

Linux on a hardware-reduced ACPI platform without EFI ends its reboot in
``machine_real_restart``: real mode, far jump to 0xF000:0xFFF0. This test puts vCPU 0 there
directly and checks that nubis's reset-vector code reaches the ACPI reset register.
"""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from nubis.arch.x86_64.reset_vector import RESET_VECTOR, reset_vector_code
from nubis.kvm import Kvm
from nubis.loader.tiny import build_pvh_elf
from nubis.vmm.config import ConsoleConfig, ConsoleMode, MemoryConfig, PayloadConfig, VmConfig
from nubis.vmm.machine import ExitKind, Machine, MachineExit

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(30)]


def test_reset_vector_resets_the_vm(tmp_path: Path) -> None:
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(build_pvh_elf(b"\xeb\xfe"))  # never reached: vCPU 0 is redirected
    config = VmConfig(
        payload=PayloadConfig(kernel=str(kernel)),
        memory=MemoryConfig(size=64 << 20),
        serial=ConsoleConfig(ConsoleMode.NULL),
        rng=None,
    )
    exits: queue.Queue[MachineExit] = queue.Queue()
    with Kvm() as kvm:
        machine = Machine(kvm, config, exits.put, interactive=False)
        try:
            assert (
                machine.memory.read(RESET_VECTOR, len(reset_vector_code())) == reset_vector_code()
            )
            vcpu = machine.vcpus[0].fd
            sregs = vcpu.get_sregs()
            sregs.cr0 &= ~1  # real mode, as machine_real_restart leaves it
            sregs.efer = 0
            sregs.cs.selector, sregs.cs.base, sregs.cs.limit = 0xF000, 0xF0000, 0xFFFF
            sregs.cs.db = sregs.cs.l = sregs.cs.g = 0
            for seg in (sregs.ds, sregs.es, sregs.ss):
                seg.selector, seg.base, seg.limit, seg.db, seg.g = 0, 0, 0xFFFF, 0, 0
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip = 0xFFF0
            vcpu.set_regs(regs)
            machine.start()
            assert exits.get(timeout=20).kind is ExitKind.RESET
        finally:
            machine.close()
