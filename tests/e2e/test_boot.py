"""End-to-end tests of nubis's direct kernel boot: a real Linux guest, booted from a bzImage or a
PVH vmlinux with an initramfs, in the nested test host.

One boot checks several things at once, since each costs about 30 s there: the vCPU count, the
memory size, the guest's clock and a clean power-off. The other tests cover a guest reboot and a
SIGTERM stop, a kernel panic with ``--no-reboot``, the kernel log on the serial console and a
missing kernel.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nubis.image import GuestImages
from nubis.testbed import TestbedSession

pytestmark = pytest.mark.e2e

RunGuest = Callable[..., Any]  # the run_guest fixture, returning a GuestRun

BOOT_TIMEOUT = 180.0
REBOOT_TIMEOUT = 300.0
KERNEL_LOG_TIMEOUT = (
    600.0  # every byte of a verbose boot log is a UART exit through the emulated nested host
)
CLOCK_TOLERANCE = 10.0
MEMORY_BY_VCPUS = {1: 256, 2: 384}

# Runs a VMM in the testbed and watches its serial log: once the log holds COUNT occurrences of
# NEEDLE it prints the host's clock then (host-clock-seen=) and, with the action "term", sends
# the VMM SIGTERM. It exits with the VMM's status, killing the VMM after DEADLINE seconds.
WATCH = r"""
import signal, subprocess, sys, time
log, needle, count, action, deadline = sys.argv[1:6]
argv = sys.argv[6:]
print(f"host-clock-start={time.time():.3f}", flush=True)
vmm = subprocess.Popen(argv)
limit = time.monotonic() + float(deadline)
seen = False
while vmm.poll() is None:
    if not seen:
        try:
            with open(log, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if text.count(needle) >= int(count):
            seen = True
            print(f"host-clock-seen={time.time():.3f}", flush=True)
            if action == "term":
                vmm.send_signal(signal.SIGTERM)
    if time.monotonic() > limit:
        print("watch: deadline passed, killing the VMM", flush=True)
        vmm.kill()
        break
    time.sleep(0.1)
code = vmm.wait()
print(f"host-clock-end={time.time():.3f}", flush=True)
sys.exit(code if code >= 0 else 128 - code)
"""


def nubis(
    kernel: Path,
    initramfs: Path,
    cmdline: str,
    *,
    cpus: int = 2,
    memory_mib: int = 256,
    no_reboot: bool = True,
) -> list[str]:
    """The nubis command line booting ``kernel``, serial console to ``{serial}``."""
    argv = [
        sys.executable, "-m", "nubis", "--kernel", str(kernel), "--initramfs", str(initramfs),
        "--cmdline", cmdline, "--cpus", f"boot={cpus}", "--memory", f"size={memory_mib}M",
        "--serial", "file={serial}",
    ]  # fmt: skip
    if no_reboot:
        argv.append("--no-reboot")
    return argv


def watched(argv: list[str], needle: str, count: int, action: str, deadline: float) -> list[str]:
    """``argv`` run under the serial-log watcher (see WATCH)."""
    watcher = [sys.executable, "-c", WATCH, "{serial}", needle, str(count), action, str(deadline)]
    return [*watcher, *argv]


def host_clock(output: str, name: str) -> float:
    match = re.search(rf"^host-clock-{name}=([0-9.]+)$", output, re.MULTILINE)
    assert match, f"the watcher printed no host-clock-{name}= line: {output}"
    return float(match.group(1))


def guest_value(console: str, pattern: str) -> int:
    match = re.search(pattern, console.replace("\r", ""), re.MULTILINE)
    assert match, f"the guest printed no line matching {pattern!r}"
    return int(match.group(1))


@pytest.mark.timeout(BOOT_TIMEOUT + 60, func_only=True)
@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("kernel_kind", ["bzimage", "vmlinux"])
def test_kernel_reaches_init_with_its_vcpus_memory_and_clock_and_powers_off(
    run_guest: RunGuest, guest_images: GuestImages, kernel_kind: str, vcpus: int
) -> None:
    kernel = guest_images.bzimage if kernel_kind == "bzimage" else guest_images.vmlinux
    memory_mib = MEMORY_BY_VCPUS[vcpus]
    cmdline = guest_images.cmdline(
        "echo nproc=$(nproc); grep MemTotal /proc/meminfo; echo guest-clock=$(date +%s)"
    )
    argv = nubis(kernel, guest_images.initramfs, cmdline, cpus=vcpus, memory_mib=memory_mib)
    run = run_guest(watched(argv, "guest-clock=", 1, "none", BOOT_TIMEOUT - 20), BOOT_TIMEOUT)

    assert run.markers.userspace, "the guest never reached init"
    assert run.markers.module_failures == ()
    assert guest_value(run.console, r"^nproc=(\d+)$") == vcpus
    mem_total_kib = guest_value(run.console, r"^MemTotal:\s+(\d+) kB$")
    assert 0.75 * memory_mib * 1024 <= mem_total_kib <= memory_mib * 1024, (
        f"MemTotal {mem_total_kib} kB does not fit --memory size={memory_mib}M"
    )
    # The watcher notes the host's clock when the guest's line reaches the serial log (within
    # about 0.1 s of the guest printing it), and the guest's line must also fall inside the run.
    guest_clock = guest_value(run.console, r"^guest-clock=(\d+)$")
    seen = host_clock(run.output, "seen")
    start, end = host_clock(run.output, "start"), host_clock(run.output, "end")
    assert abs(guest_clock - seen) <= CLOCK_TOLERANCE, (
        f"the guest's clock {guest_clock} is {guest_clock - seen:+.1f} s off the host's {seen:.1f}"
    )
    assert start - CLOCK_TOLERANCE <= guest_clock <= end + CLOCK_TOLERANCE
    assert run.markers.exit_status == 0
    assert run.markers.poweroff and run.markers.ending == "NUBIS-POWEROFF"
    assert run.returncode == 0, f"nubis exited with {run.returncode}: {run.output}"


@pytest.mark.timeout(REBOOT_TIMEOUT + 60, func_only=True)
def test_guest_reboot_boots_again_and_sigterm_stops_the_vm_cleanly(
    run_guest: RunGuest, guest_images: GuestImages
) -> None:
    # Every boot prints its kernel's boot id and reboots a few seconds later. Once the second
    # boot's id is on the console the watcher sends nubis SIGTERM, so the stop lands while the
    # second boot's command sleeps (or, at worst, while it reboots again).
    cmdline = guest_images.cmdline(
        "echo boot-id=$(cat /proc/sys/kernel/random/boot_id); sleep 5; reboot -f"
    )
    argv = nubis(guest_images.bzimage, guest_images.initramfs, cmdline, no_reboot=False)
    run = run_guest(watched(argv, "boot-id=", 2, "term", REBOOT_TIMEOUT - 40), REBOOT_TIMEOUT)

    console = run.console.replace("\r", "")
    boots = console.count("NUBIS-USERSPACE")
    boot_ids = re.findall(r"^boot-id=(\S+)$", console, re.MULTILINE)
    assert boots >= 2, f"the guest reached init {boots} time(s), expected a second boot"
    assert len(set(boot_ids)) >= 2, f"expected two kernel boots, got boot ids {boot_ids}"
    assert "NUBIS-POWEROFF" not in console
    seen, end = host_clock(run.output, "seen"), host_clock(run.output, "end")
    assert run.returncode == 0, f"nubis exited with {run.returncode} after SIGTERM: {run.output}"
    assert end - seen < 30, f"nubis took {end - seen:.1f} s to stop after SIGTERM"


def interleaved(message: str, noise: str) -> re.Pattern[str]:
    """A pattern for ``message`` with any characters of ``noise`` between its characters."""
    gap = f"[{re.escape(''.join(sorted(set(noise))))}]*"
    return re.compile(gap.join(re.escape(char) for char in message))


@pytest.mark.timeout(BOOT_TIMEOUT + 60, func_only=True)
def test_init_exit_panics_and_no_reboot_ends_nubis_with_status_3(
    run_guest: RunGuest, guest_images: GuestImages
) -> None:
    cmdline = guest_images.cmdline("exit 5", end="exit")
    assert "panic=-1" in cmdline.split()
    run = run_guest(nubis(guest_images.bzimage, guest_images.initramfs, cmdline), BOOT_TIMEOUT)

    assert run.markers.userspace, "the guest never reached init"
    # init exits right after writing its last markers to the console, so the tty may still be
    # sending them while the kernel prints the panic: their characters can land inside the
    # panic's first lines (and the markers themselves come out garbled).
    panic = interleaved(
        "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000500",
        "NUBIS-EXIT-STATUS=5\r\nNUBIS-INIT-EXIT\r\n",
    )
    assert panic.search(run.console), "the console shows no panic of init exiting with 5"
    assert run.returncode == 3, f"nubis exited with {run.returncode}: {run.output}"


@pytest.mark.timeout(KERNEL_LOG_TIMEOUT + 60, func_only=True)
def test_serial_console_carries_the_kernel_log(
    run_guest: RunGuest, guest_images: GuestImages
) -> None:
    cmdline = guest_images.cmdline("true", quiet=False)
    assert "quiet" not in cmdline.split()
    run = run_guest(
        nubis(guest_images.bzimage, guest_images.initramfs, cmdline), KERNEL_LOG_TIMEOUT
    )

    assert "Linux version " in run.console
    assert f"Command line: {cmdline}" in run.console
    assert "Run /init as init process" in run.console
    assert run.console.index("Linux version ") < run.console.index("NUBIS-USERSPACE")
    assert run.markers.poweroff and run.markers.ending == "NUBIS-POWEROFF"
    assert run.returncode == 0, f"nubis exited with {run.returncode}: {run.output}"


@pytest.mark.timeout(120, func_only=True)
def test_missing_kernel_is_bad_input_with_one_line_on_stderr(testbed: TestbedSession) -> None:
    # Only the standard error reaches the output: the standard output goes to /dev/null.
    result = testbed.run(
        ["sh", "-c", '"$0" -m nubis --kernel /nonexistent 2>&1 >/dev/null', sys.executable],
        60.0,
    )
    assert result.returncode == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, f"expected one line on stderr: {result.output!r}"
    assert lines[0].startswith("nubis: error:") and "/nonexistent" in lines[0]
