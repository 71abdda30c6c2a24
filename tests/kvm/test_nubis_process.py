"""The nubis process end to end on any /dev/kvm, with tiny PVH guests built by the test.

These run the real ``nubis`` command line: kernel loading, ACPI and boot configuration, the
legacy devices on the port bus, vCPU threads, and the exit statuses of the lifecycle.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nubis.arch.x86_64 import layout
from nubis.arch.x86_64.host import detect_host_kvm
from nubis.cli import EXIT_FAILURE, EXIT_GUEST_RESET, EXIT_OK
from nubis.loader.tiny import build_pvh_elf, out_byte, reset_code, serial_print

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

SLP_EN = 1 << 5


def nubis(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "nubis", *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def kernel(tmp_path: Path, code: bytes, name: str = "tiny.elf") -> str:
    path = tmp_path / name
    path.write_bytes(build_pvh_elf(code))
    return str(path)


def test_guest_reset_with_no_reboot_exits_3_and_serial_reaches_stdout(tmp_path: Path) -> None:
    result = nubis(
        "--kernel",
        kernel(tmp_path, reset_code(b"hello from the guest\n")),
        "--no-reboot",
        "--memory",
        "size=128M",
    )
    assert result.returncode == EXIT_GUEST_RESET, result.stderr
    assert result.stdout == b"hello from the guest\n"
    # Where the guest was is logged: the code ends in ud2 right after loading an empty IDT.
    err = result.stderr.decode()
    assert "the guest triple-faulted; with --no-reboot that ends nubis" in err
    (registers,) = re.findall(r"vCPU 0: the guest triple-faulted; registers: (.*)", err)
    assert re.search(r"\bidt=0x0\+0x0\b", registers), registers
    assert re.search(r"\bcr2=0x[0-9a-f]+\b", registers), registers


def test_serial_to_file(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    result = nubis(
        "--kernel",
        kernel(tmp_path, reset_code(b"to a file\n")),
        "--no-reboot",
        "--serial",
        f"file={log}",
    )
    assert result.returncode == EXIT_GUEST_RESET, result.stderr
    assert log.read_bytes() == b"to a file\n"
    assert result.stdout == b""


def test_acpi_s5_power_off_exits_0(tmp_path: Path) -> None:
    sleep = (layout.ACPI_S5_SLEEP_TYPE << 2) | SLP_EN
    code = serial_print(b"bye\n") + out_byte(layout.PORT_ACPI_SLEEP_CONTROL, sleep) + b"\xeb\xfe"
    result = nubis("--kernel", kernel(tmp_path, code))
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout == b"bye\n"


def test_acpi_reset_register_reboots_the_guest_without_no_reboot(tmp_path: Path) -> None:
    # The guest counts boots in CMOS? Its memory is rebuilt on reboot, so instead it prints a
    # line per boot and resets; nubis must boot it again, and SIGTERM ends the loop cleanly.
    code = (
        serial_print(b"boot\n")
        + out_byte(layout.PORT_ACPI_RESET, layout.ACPI_RESET_VALUE)
        + b"\xeb\xfe"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "nubis", "--kernel", kernel(tmp_path, code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 30
    while seen.count(b"boot\n") < 3 and time.monotonic() < deadline:
        seen += proc.stdout.read1(64)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=20)
    assert seen.count(b"boot\n") >= 3, err
    assert proc.returncode == EXIT_OK, err


def test_sigterm_stops_a_spinning_guest_cleanly(tmp_path: Path) -> None:
    code = serial_print(b"up\n") + b"\xeb\xfe"  # jmp $
    proc = subprocess.Popen(
        [sys.executable, "-m", "nubis", "--kernel", kernel(tmp_path, code), "--cpus", "boot=2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert proc.stdout.read(3) == b"up\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == EXIT_OK, err


def test_unhandled_guest_failure_exits_1_with_registers(tmp_path: Path) -> None:
    # A guest that jumps to an address outside RAM and executes there: KVM cannot run it.
    code = b"\xb8\x00\x00\x00\xd0\xff\xe0"  # mov eax, 0xd0000000 (MMIO hole); jmp eax
    result = nubis("--kernel", kernel(tmp_path, code))
    assert result.returncode == EXIT_FAILURE
    err = result.stderr.decode()
    assert err.startswith("nubis: error: ")
    assert "rip" in err.lower()
    assert "Traceback" not in err


def test_not_a_kernel_is_bad_input(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"just some text, not a kernel" * 100)
    result = nubis("--kernel", str(bogus))
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1
    assert "neither an ELF vmlinux nor a bzImage" in result.stderr.decode()


def test_linux_kernel_is_refused_in_one_sentence_only_where_kvm_cannot_run_it(
    tmp_path: Path,
) -> None:
    code = reset_code() + b"Linux version 6.1.0 (a fake banner for the detector)"
    result = nubis("--kernel", kernel(tmp_path, code), "--no-reboot")
    err = result.stderr.decode()
    if detect_host_kvm().can_run_linux:
        assert result.returncode == EXIT_GUEST_RESET, err
    else:
        assert result.returncode == EXIT_FAILURE
        assert "cannot run an unmodified Linux kernel" in err
        assert err.count("\n") == 1
