"""Unit tests for nubis.testbed: host classification, job scripts, the direct backend, the
watch on L1's console for a wedged CPU, and the CPU state saved from a failed L1."""

from __future__ import annotations

import io
import socket
import subprocess
import threading
from pathlib import Path
from typing import ClassVar

import pytest

import nubis.testbed.session as session_module
from nubis.image.cache import Cache
from nubis.testbed import (
    CommandTimeoutError,
    HostKind,
    TestbedError,
    TestbedSession,
    detect_host,
)
from nubis.testbed.session import (
    L1_REPLACEMENTS,
    WEDGED_AFTER_SECONDS,
    CommandResult,
    ConsoleWatch,
    Heartbeat,
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
    assert received == [b"info cpus\ninfo registers -a\ninfo lapic 0\ninfo lapic 1\n"]
    assert saved == tmp_path / "l1-registers.txt"
    assert saved.read_text() == (
        "* CPU #0: thread_id=8607\n  CPU #1: thread_id=8608\n\nCPU#0\nRIP=ffffffff81c01220 HLT=1\n"
    )


class _FailingL1(_NestedBackend):
    """An L1 stand-in: the first ``failures`` of them fail under the command they run."""

    booted: ClassVar[list[_FailingL1]] = []
    failures = 0

    def start(self) -> None:
        self.session_dir = Path(f"session-{len(self.booted)}")
        self.booted.append(self)

    def run(self, argv, timeout, cwd, env, stream):  # type: ignore[no-untyped-def]
        if len(self.booted) <= self.failures:
            self.broken = f"L1 number {len(self.booted)} stopped answering"
            raise TestbedError("The nested test host did not finish the command.")
        return CommandResult(tuple(argv), 0, "ran\n", 0.1)

    def close(self) -> None:
        self.broken = self.broken or "closed"


@pytest.mark.parametrize("failures", [0, 1, L1_REPLACEMENTS, L1_REPLACEMENTS + 1])
def test_a_failed_l1_is_replaced_and_the_command_run_again_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failures: int
) -> None:
    monkeypatch.setattr(session_module, "_NestedBackend", _FailingL1)
    monkeypatch.setattr(_FailingL1, "booted", [])
    monkeypatch.setattr(_FailingL1, "failures", failures)
    session = TestbedSession(mode="nested", cache_dir=tmp_path / "cache", workdir=tmp_path)
    if failures > L1_REPLACEMENTS:
        with pytest.raises(TestbedError, match="did not finish"):
            session.run(["true"], 5.0)
    else:
        assert session.run(["true"], 5.0).output == "ran\n"
    replaced = min(failures, L1_REPLACEMENTS)
    assert len(_FailingL1.booted) == 1 + replaced
    assert session.replacements == [
        f"L1 number {n} stopped answering (session session-{n - 1}) while running true"
        for n in range(1, replaced + 1)
    ]
    # Every failed L1 was shut down; the one in use is not.
    assert [l1.broken is not None for l1 in _FailingL1.booted[:replaced]] == [True] * replaced


def test_a_command_that_times_out_is_not_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class TimingOut(_FailingL1):
        def run(self, argv, timeout, cwd, env, stream):  # type: ignore[no-untyped-def]
            raise CommandTimeoutError("The command did not finish within 5 s.")

    monkeypatch.setattr(session_module, "_NestedBackend", TimingOut)
    monkeypatch.setattr(_FailingL1, "booted", [])
    session = TestbedSession(mode="nested", cache_dir=tmp_path / "cache", workdir=tmp_path)
    with pytest.raises(CommandTimeoutError):
        session.run(["sleep", "9"], 5.0)
    assert len(_FailingL1.booted) == 1 and session.replacements == []


def test_heartbeat_counts_silence_from_the_last_change_once_a_beat_was_seen(
    tmp_path: Path,
) -> None:
    path = tmp_path / "heartbeat"
    beat = Heartbeat(path, now=100.0)
    assert beat.silent_for(200.0) == 0.0  # no beat yet: never taken for silence
    path.write_text("20\n")
    assert beat.silent_for(210.0) == 0.0
    assert beat.silent_for(235.0) == 25.0
    path.write_text("40\n")
    assert beat.silent_for(236.0) == 0.0
    path.unlink()  # gone after it was seen: silence from that moment on
    assert beat.silent_for(240.0) == 0.0
    assert beat.silent_for(275.0) == 35.0
    path.write_text("60\n")
    assert beat.silent_for(276.0) == 0.0
