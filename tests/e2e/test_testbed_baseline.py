"""Baseline end-to-end tests that prove the test bed itself, with QEMU as the VMM.

Inside the testbed, QEMU's microvm boots the default guest (bzImage and PVH vmlinux) with KVM;
the init's markers show userspace started, the command's exit status and a clean power-off. The
failure modes are checked too: a guest that never powers off and an L1 command that hangs are
both killed at their timeout with a clear error carrying the logs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nubis.image import GuestImages
from nubis.testbed import CommandTimeoutError, TestbedSession

pytestmark = pytest.mark.e2e

L2_TIMEOUT = 180.0


def qemu_microvm(kernel: Path, initramfs: Path, cmdline: str, *extra: str) -> list[str]:
    """QEMU microvm with KVM, 2 vCPUs, 256 MiB, serial console to ``{serial}``."""
    return [
        "qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host",
        "-smp", "2", "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "file:{serial}", "-kernel", str(kernel), "-initrd", str(initramfs),
        "-append", cmdline, "-no-reboot", *extra,
    ]  # fmt: skip


@pytest.mark.timeout(L2_TIMEOUT + 60, func_only=True)
@pytest.mark.parametrize("kernel_kind", ["bzimage", "vmlinux"])
def test_qemu_boots_guest_runs_command_and_powers_off(
    run_guest, guest_images: GuestImages, kernel_kind: str
) -> None:
    kernel = guest_images.bzimage if kernel_kind == "bzimage" else guest_images.vmlinux
    cmdline = guest_images.cmdline(
        "echo guest says hello; grep -c ^processor /proc/cpuinfo; exit 7"
    )
    run = run_guest(qemu_microvm(kernel, guest_images.initramfs, cmdline), L2_TIMEOUT)
    assert run.markers.userspace, "the guest never reached userspace"
    assert run.markers.module_failures == ()
    assert "guest says hello" in run.console
    assert "\n2\n" in run.console.replace("\r", ""), "the guest did not see 2 vCPUs"
    assert run.markers.exit_status == 7
    assert run.markers.poweroff and run.markers.ending == "NUBIS-POWEROFF"
    assert run.returncode == 0, f"QEMU exited with {run.returncode}: {run.output}"


@pytest.mark.timeout(L2_TIMEOUT + 60, func_only=True)
def test_guest_that_never_powers_off_is_killed_at_its_timeout(
    run_guest, testbed: TestbedSession, guest_images: GuestImages
) -> None:
    cmdline = guest_images.cmdline("echo about to hang", end="hang")
    argv = qemu_microvm(guest_images.bzimage, guest_images.initramfs, cmdline)
    with pytest.raises(CommandTimeoutError) as caught:
        run_guest(argv, 60.0)
    error = caught.value
    assert "did not finish within 60 s" in error.message
    assert "NUBIS-HANG" in str(error), "the timeout error does not show the guest's console"
    assert error.markers.exit_status == 0  # type: ignore[attr-defined]
    left = testbed.run(["sh", "-c", "pgrep -f '[q]emu-system-x86_64' || true"], 30.0)
    assert left.output.strip() == "", "the hung guest's QEMU is still running"


@pytest.mark.timeout(120, func_only=True)
def test_l1_command_that_hangs_is_killed_at_its_timeout(testbed: TestbedSession) -> None:
    with pytest.raises(CommandTimeoutError) as caught:
        testbed.run(["sh", "-c", "echo started; sleep 1000"], 5.0)
    assert "did not finish within 5 s" in caught.value.message
    assert "started" in caught.value.output
    again = testbed.run(["sh", "-c", "echo still alive; exit 3"], 30.0)
    assert (again.returncode, again.output) == (3, "still alive\n")


@pytest.mark.timeout(120, func_only=True)
def test_work_directory_is_shared_at_the_same_path(testbed: TestbedSession, e2e_dir: Path) -> None:
    (e2e_dir / "from-host").write_text("written here\n")
    result = testbed.run(
        [
            "sh",
            "-c",
            f"cat {e2e_dir}/from-host && echo written there > {e2e_dir}/from-l1 && "
            "test -c /dev/kvm && touch /tmp/scratch",
        ],
        30.0,
    )
    assert result.returncode == 0, result.output
    assert result.output == "written here\n"
    assert (e2e_dir / "from-l1").read_text() == "written there\n"
