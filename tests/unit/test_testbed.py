"""Unit tests for nubis.testbed: host classification, job scripts, the direct backend, the
watch on L1's console for a wedged CPU, and the CPU state saved from a failed L1."""

from __future__ import annotations

import io
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from nubis.image.cache import Cache
from nubis.testbed import CommandTimeoutError, HostKind, TestbedSession, detect_host
from nubis.testbed.session import (
    WEDGED_AFTER_SECONDS,
    ConsoleWatch,
    _NestedBackend,
    command_script,
)


def fake_host(tmp_path: Path, flags: str, pvm: bool = False, kvm: bool = True) -> HostKind:
    tmp_path.mkdir(parents=True)
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu {flags} sse2\n")
    (tmp_path / "module").mkdir()
    if pvm:
        (tmp_path / "module" / "kvm_pvm").mkdir()
    dev = tmp_path / "kvm"
    if kvm:
        dev.write_text("")
    return detect_host(tmp_path / "cpuinfo", tmp_path / "module", dev).kind


def test_host_classification(tmp_path: Path) -> None:
    assert fake_host(tmp_path / "a", "svm") is HostKind.NATIVE
    assert fake_host(tmp_path / "b", "vmx") is HostKind.NATIVE
    assert fake_host(tmp_path / "c", "svm", pvm=True) is HostKind.PVM
    assert fake_host(tmp_path / "d", "") is HostKind.NONE
    assert fake_host(tmp_path / "e", "vmx", kvm=False) is HostKind.NONE


def test_job_script_quotes_every_word() -> None:
    argv = ["printf", "%s|", "a b", "$HOME", "it's"]
    script = command_script(argv, "/work dir", {"X": "1 2"})
    out = subprocess.run(
        ["sh", "-c", script.replace("cd '/work dir' || exit 125", "cd /")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out == "a b|$HOME|it's|"
    assert "export X='1 2'" in script
    with pytest.raises(ValueError, match="not valid"):
        command_script(["true"], "/", {"BAD-NAME": "1"})


def test_direct_session_runs_streams_and_kills_at_timeout(tmp_path: Path) -> None:
    session = TestbedSession(mode="direct", cache_dir=tmp_path / "cache", workdir=tmp_path)
    assert "directly" in session.description
    with session:
        stream = io.StringIO()
        result = session.run(["sh", "-c", "echo out; echo err >&2; exit 4"], 30, stream=stream)
        assert (result.returncode, result.output) == (4, "out\nerr\n")
        assert stream.getvalue() == "out\nerr\n"
        with pytest.raises(CommandTimeoutError, match=r"did not finish within 0\.5 s") as caught:
            session.run(["sh", "-c", "echo begun; sleep 30 & wait"], 0.5)
        assert caught.value.output == "begun\n"
        with pytest.raises(ValueError, match="empty"):
            session.run([], 1)


def test_console_watch_finds_the_longest_soft_lockup_as_the_log_grows(tmp_path: Path) -> None:
    console = tmp_path / "l1-console.log"
    # Logged before the watch starts: not this command's business.
    console.write_bytes(b"[  1.0] watchdog: BUG: soft lockup - CPU#1 stuck for 999s! [x:1]\n")
    watch = ConsoleWatch(console)
    assert watch.check() == 0
    with console.open("ab") as log:
        log.write(
            b"[ 113.6] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [qemu-system-x86:220]\n"
        )
        log.write(b"[ 141.6] watchdog: BUG: soft lockup - CPU#0 stuck for 5")  # cut mid-line
    assert watch.check() == 26
    with console.open("ab") as log:
        log.write(b"2s! [qemu-system-x86:220]\n[ 142.0] an unrelated line\n")
    assert watch.check() == 52
    with console.open("ab") as log:
        log.write(b"[ 169.6] watchdog: BUG: soft lockup - CPU#1 stuck for 31s! [python3:99]\n")
    assert watch.check() == 52  # the longest so far, whichever CPU
    assert WEDGED_AFTER_SECONDS > 52


def test_console_watch_of_a_missing_log_reports_nothing(tmp_path: Path) -> None:
    watch = ConsoleWatch(tmp_path / "absent.log")
    assert watch.check() == 0


def test_cpu_state_of_a_failed_l1_is_read_from_the_monitor_into_the_session(
    tmp_path: Path,
) -> None:
    backend = _NestedBackend(Cache(tmp_path / "cache"), tmp_path / "work", 512, 2, 60.0)
    backend.session_dir = tmp_path
    backend.monitor_path = tmp_path / "monitor.sock"
    assert backend.save_cpu_state() is None  # no monitor listening: nothing saved, no error
    received: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(backend.monitor_path))
        server.listen(1)

        def monitor() -> None:
            # QEMU's monitor greets, echoes, answers with CRLF and keeps the connection open.
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"QEMU 7.2.22 monitor - type 'help'\r\n(qemu) ")
                received.append(connection.recv(4096))
                connection.sendall(
                    b"i\x1b[K\x1b[Din\x1b[K\x1b[D\x1b[Dinfo cpus\x1b[K\r\n"
                    b"* CPU #0: thread_id=8607\r\n  CPU #1: thread_id=8608\r\n(qemu) "
                    b"info registers -a\x1b[K\r\n\r\nCPU#0\r\nRIP=ffffffff81c01220 HLT=1\r\n"
                )
                threading.Event().wait(3.0)  # silent, open: the reader must give up on its own

        thread = threading.Thread(target=monitor)
        thread.start()
        saved = backend.save_cpu_state()
        thread.join()
    assert received == [b"info cpus\ninfo registers -a\n"]
    assert saved == tmp_path / "l1-registers.txt"
    assert saved.read_text() == (
        "* CPU #0: thread_id=8607\n  CPU #1: thread_id=8608\n\nCPU#0\nRIP=ffffffff81c01220 HLT=1\n"
    )
