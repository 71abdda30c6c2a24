"""Running commands where a real /dev/kvm exists: in the nested test host, or on this machine.

`TestbedSession` starts once and runs many commands. On a machine whose /dev/kvm cannot run an
unmodified Linux (PVM, see PLATFORM.md) it boots the nested test host: an L1 Linux under QEMU's
TCG with emulated SVM, whose kvm_amd offers a real /dev/kvm. L1 sees this machine's root file
system read-only over 9p and chroots into it, so commands, paths, Python and its virtual
environments are the same on both sides; a host work directory is mounted writable at its own
absolute path, and /tmp is a fresh tmpfs. A third 9p share, private to the session, carries the
jobs (see agent.sh for the file protocol): the agent in L1 polls it, runs each job in its own
process group under a watchdog, and writes its output and exit status there, which the session
reads back as they are written. On a machine with VMX or SVM the same API runs commands directly.
Which path was chosen is logged and kept in `TestbedSession.description`.

Every stage is bounded: L1's boot, each command (killed with its process group at its timeout),
L1's response to a job (a grace period beyond the command's timeout), and shutdown. Failures
raise `TestbedError` carrying L1's console log and the command's output.
"""

from __future__ import annotations

import atexit
import base64
import codecs
import itertools
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TextIO

from nubis.image.cache import Cache
from nubis.image.errors import ImageError
from nubis.image.guest import build_boot_images
from nubis.image.tools import require_tool
from nubis.testbed.host import HostInfo, HostKind, detect_host

log = logging.getLogger(__name__)

L1_KERNEL_METAPACKAGE = "linux-image-amd64"
#: L1's modules: KVM for AMD, virtio PCI and 9p for the shares, tun for guest networking, loop
#: for block devices over files in L1's memory (the block benchmark's local disk).
L1_MODULES: tuple[str, ...] = (
    "irqbypass",
    "kvm",
    "ccp",
    "kvm-amd",
    "tun",
    "loop",
    "netfs",
    "fscache",
    "9pnet",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "9pnet_virtio",
    "9p",
)
DEFAULT_MEMORY_MIB = 3072
#: L1's vCPUs. One: with two, QEMU 7.2's multi-threaded TCG running the emulated SVM on both
#: corrupts L1 or its guests often under exit-heavy work. Measured booting a guest that prints
#: its whole kernel log to the 16550 UART (two exits per byte): with two L1 vCPUs, 3 of 7 boots
#: and then 2 of 3 failed (an L2 triple fault or reset, or L1 panicking on a page fault at a
#: per-CPU address in an L2 VMM's thread, for QEMU's guests and nubis's alike); with one, 6 of
#: 6 passed, each boot taking about 1.6 times as long. Single-threaded TCG with two vCPUs is no
#: cure: those guests stalled mid-boot.
DEFAULT_CPUS = 1
#: Seconds L1 may take from QEMU's start to serving jobs.
DEFAULT_BOOT_TIMEOUT = 240.0
#: Seconds L1 gets beyond a command's own timeout before it counts as unresponsive.
RESPONSE_GRACE = 30.0
#: Seconds L1 may take to power off before QEMU is killed.
SHUTDOWN_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
#: Seconds of silence after which QEMU's monitor is taken to have said all it will.
MONITOR_TIMEOUT = 2.0
#: sun_path's size in struct sockaddr_un, including the terminating NUL.
UNIX_PATH_MAX = 108
#: A CPU the L1 kernel reports stuck this many seconds (its soft-lockup watchdog) means L1 has
#: wedged under emulation: no command holds a CPU in the kernel that long, and none recovered.
WEDGED_AFTER_SECONDS = 120
#: Seconds without a heartbeat from L1's agent after which L1 gets an NMI, and after which,
#: counted again from the NMI, an L1 still silent is shut down. The agent beats every 2 s,
#: even when L1 is loaded by its guests.
HEARTBEAT_SILENCE = 30.0
#: Seconds between looks at L1's console and heartbeat while a command runs.
CONSOLE_CHECK_INTERVAL = 5.0
_TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SOFT_LOCKUP = re.compile(rb"soft lockup - CPU#\d+ stuck for (\d+)s!")
#: Fresh L1s booted for one command whose L1 failed under it, before the failure is raised.
L1_REPLACEMENTS = 2
#: Finished sessions kept (with their L1 console logs) under ``<cache>/testbed/sessions``.
KEEP_SESSIONS = 8
LOG_TAIL_LINES = 60
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def agent_script() -> bytes:
    """Return the bytes of L1's init (agent.sh, shipped with the package)."""
    return resources.files("nubis.testbed").joinpath("agent.sh").read_bytes()


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


class TestbedError(Exception):
    """The testbed failed: L1 did not boot, stopped answering, or a command ran out of time.

    ``console_log`` is L1's serial console and ``output`` the command's output so far; both are
    appended (their last lines) to the message so a test failure shows them.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, message: str, *, console_log: str = "", output: str = "") -> None:
        self.message = message
        self.console_log = console_log
        self.output = output
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.output:
            parts.append(
                f"--- command output (last {LOG_TAIL_LINES} lines) ---\n{_tail(self.output)}"
            )
        if self.console_log:
            parts.append(
                f"--- L1 console log (last {LOG_TAIL_LINES} lines) ---\n{_tail(self.console_log)}"
            )
        return "\n".join(parts)


class CommandTimeoutError(TestbedError):
    """A command did not finish within its timeout and was killed with its process group."""


@dataclass(frozen=True)
class CommandResult:
    """What a command did: its exit status and its combined standard output and error."""

    argv: tuple[str, ...]
    returncode: int
    output: str
    duration: float


def command_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """Return the shell script that runs ``argv`` in ``cwd`` with ``env`` (quoted safely)."""
    lines = ["# nubis testbed job", "umask 022"]
    base = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
    for key, value in {**base, **env}.items():
        if not key.isidentifier():
            raise ValueError(f"The environment variable name {key!r} is not valid.")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(cwd)} || exit 125")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


class _Output:
    """Follows a growing output file, decoding UTF-8 and echoing it to a stream."""

    def __init__(self, path: Path, stream: TextIO | None) -> None:
        self.path = path
        self.stream = stream
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chunks: list[str] = []

    def pump(self, final: bool = False) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self.offset += len(data)
        text = self.decoder.decode(data, final=final)
        if text:
            self.chunks.append(text)
            if self.stream is not None:
                self.stream.write(text)
                self.stream.flush()

    @property
    def text(self) -> str:
        return "".join(self.chunks)


class _Backend:
    """Where commands run; subclasses boot L1 or use this machine."""

    description = ""

    def start(self) -> None:
        raise NotImplementedError

    def run(
        self,
        argv: Sequence[str],
        timeout: float,
        cwd: str,
        env: Mapping[str, str],
        stream: TextIO | None,
    ) -> CommandResult:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def console_log(self) -> str:
        return ""


def paths_under_tmp() -> list[str]:
    """Top-level directories of /tmp that commands need in L1: this checkout, the interpreter's
    virtual environment and the working directory, when they live there.

    L1 mounts a fresh tmpfs on /tmp, which would hide a clone of nubis under /tmp (as a CI
    checkout may be); the agent binds these directories back from the host's /tmp.
    """
    import sys

    import nubis

    keep: list[str] = []
    for path in (os.path.dirname(nubis.__file__), sys.prefix, os.getcwd()):
        real = os.path.realpath(path)
        parts = real.split("/")
        if len(parts) > 2 and parts[1] == "tmp":
            top = "/tmp/" + parts[2]
            if top not in keep:
                keep.append(top)
    return keep


class Heartbeat:
    """Tracks the count L1's agent writes to its heartbeat file about every two seconds."""

    def __init__(self, path: Path, now: float) -> None:
        self.path = path
        self._last = self._read()
        self._seen = self._last is not None
        self._changed_at = now

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    def silent_for(self, now: float) -> float:
        """Seconds since the count last changed, as of ``now``; 0 until a count has been seen
        (an L1 whose agent never beats is not taken for a silent one)."""
        value = self._read()
        if value != self._last:
            self._seen = self._seen or value is not None
            self._last = value
            self._changed_at = now
        return now - self._changed_at if self._seen else 0.0


class ConsoleWatch:
    """Reads an L1 console log as it grows and remembers the longest soft lockup it reported.

    The kernel's soft-lockup watchdog repeats "soft lockup - CPU#N stuck for Ss!" while a CPU
    stays stuck, with S growing; a wedged L1 shows S climbing without end.
    """

    def __init__(self, path: Path) -> None:
        """Watch ``path`` from its current end (what was logged before does not count)."""
        self.path = path
        try:
            self._offset = path.stat().st_size
        except OSError:
            self._offset = 0
        self._partial = b""
        self.longest_lockup = 0

    def check(self) -> int:
        """Read what was logged since the last call; return the longest lockup seen (seconds)."""
        try:
            with self.path.open("rb") as console:
                console.seek(self._offset)
                data = console.read()
        except OSError:
            return self.longest_lockup
        self._offset += len(data)
        # A line cut at the end of what was read is kept for the next call.
        text = self._partial + data
        cut = text.rfind(b"\n") + 1
        self._partial = text[cut:][-4096:]
        for match in _SOFT_LOCKUP.finditer(text[:cut]):
            self.longest_lockup = max(self.longest_lockup, int(match.group(1)))
        return self.longest_lockup


@dataclass
class _Watch:
    """What the machine watches of L1 while one command runs."""

    console: ConsoleWatch
    heartbeat: Heartbeat
    #: When L1 was sent an NMI for its silence, and how long it had been silent then.
    nmi_sent_at: float | None = None
    silent_at_nmi: float = 0.0


def _shorten(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _escape_qemu(value: str) -> str:
    return value.replace(",", ",,")


class _NestedBackend(_Backend):
    def __init__(
        self,
        cache: Cache,
        workdir: Path,
        memory_mib: int,
        cpus: int,
        boot_timeout: float,
        revivals: list[str] | None = None,
    ) -> None:
        self.cache = cache
        #: Each time a silent L1 was woken with an NMI and came back (see `HEARTBEAT_SILENCE`).
        self.revivals = revivals if revivals is not None else []
        self.workdir = workdir
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.session_dir = Path()
        self.ctl = Path()
        self.console_path = Path()
        self.monitor_path = Path()
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.broken: str | None = None
        self.boot_seconds = 0.0

    def console_log(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except OSError:
            return ""

    def _prune_sessions(self, sessions: Path) -> None:
        old = sorted((p for p in sessions.iterdir() if p.is_dir()), key=lambda p: p.name)
        for path in old[:-KEEP_SESSIONS]:
            shutil.rmtree(path, ignore_errors=True)

    def start(self) -> None:
        qemu = require_tool("qemu-system-x86_64")
        kernel, initramfs = build_boot_images(
            self.cache, L1_KERNEL_METAPACKAGE, L1_MODULES, (), agent_script()
        )
        sessions = self.cache.root / "testbed" / "sessions"
        sessions.mkdir(parents=True, exist_ok=True)
        self._prune_sessions(sessions)
        self.session_dir = sessions / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{id(self):x}"
        self.ctl = self.session_dir / "ctl"
        (self.ctl / "jobs").mkdir(parents=True)
        (self.ctl / "done").mkdir()
        self.console_path = self.session_dir / "l1-console.log"
        self.monitor_path = self.session_dir / "monitor.sock"
        cmdline = " ".join(
            [
                "console=ttyS0",
                "panic=-1",
                "quiet",
                "nubis.work=" + base64.b64encode(str(self.workdir).encode()).decode(),
                "nubis.ctl=" + base64.b64encode(str(self.ctl).encode()).decode(),
                *(
                    "nubis.keep=" + base64.b64encode(path.encode()).decode()
                    for path in paths_under_tmp()
                ),
            ]
        )
        share = "security_model=none,multidevs=remap"
        # L1 boots its ELF vmlinux by PVH: decompressing the bzImage's XZ payload under TCG
        # would cost about nine seconds per session.
        argv = [
            qemu,
            "-M",
            "q35",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "EPYC,+svm,+npt",
            "-smp",
            str(self.cpus),
            "-m",
            str(self.memory_mib),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            self._monitor_option(),
            "-serial",
            f"file:{self.console_path}",
            "-kernel",
            str(kernel.vmlinux),
            "-initrd",
            str(initramfs.path),
            "-append",
            cmdline,
            "-no-reboot",
            "-virtfs",
            f"local,path=/,mount_tag=host,readonly=on,{share}",
            "-virtfs",
            f"local,path={_escape_qemu(str(self.workdir))},mount_tag=work,{share}",
            "-virtfs",
            f"local,path={_escape_qemu(str(self.ctl))},mount_tag=ctl,{share}",
        ]
        (self.session_dir / "qemu-argv.txt").write_text(shlex.join(argv) + "\n")
        started = time.monotonic()
        with (self.session_dir / "qemu.log").open("wb") as qemu_log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("nested test host booting (session %s)", self.session_dir)
        deadline = started + self.boot_timeout
        ready = self.ctl / "ready"
        while not ready.exists():
            code = self.process.poll()
            if code is not None:
                raise TestbedError(
                    f"The nested test host's QEMU exited with status {code} before L1 was ready "
                    f"({self._qemu_messages()}).",
                    console_log=self.console_log(),
                )
            if time.monotonic() > deadline:
                self._kill()
                raise TestbedError(
                    f"The nested test host was not ready within {self.boot_timeout:.0f} s.",
                    console_log=self.console_log(),
                )
            time.sleep(POLL_INTERVAL)
        self.boot_seconds = time.monotonic() - started
        state = ready.read_text().strip()
        if state != "kvm=yes":
            self.close()
            raise TestbedError(
                f"The nested test host booted but has no /dev/kvm ({state}); kvm_amd did not load.",
                console_log=self.console_log(),
            )
        log.info("nested test host ready in %.1f s", self.boot_seconds)

    def _monitor_option(self) -> str:
        """QEMU's human monitor on a socket in the session, read when L1 fails (see below)."""
        if len(os.fsencode(self.monitor_path)) >= UNIX_PATH_MAX:
            return "none"
        return f"unix:{_escape_qemu(str(self.monitor_path))},server=on,wait=off"

    def save_cpu_state(self) -> Path | None:
        """Write L1's CPU and local APIC registers, from QEMU's monitor, to the session; return
        the file.

        Called on a wedged or silent L1 before it is killed: where each CPU stands (L1's kernel,
        an L2 guest, or halted) and what its APIC holds (pending and in-service vectors, the
        timer) is the first thing to know about such a failure. Returns None when the monitor
        does not answer.
        """
        commands = b"info cpus\ninfo registers -a\n" + b"".join(
            f"info lapic {cpu}\n".encode() for cpu in range(self.cpus)
        )
        answer = self._monitor_command(commands)
        if not answer:
            return None
        # The monitor echoes each command keystroke by keystroke with cursor moves; keep only
        # its answers.
        text = _TERMINAL_ESCAPE.sub("", answer.decode(errors="replace"))
        answers = [
            line
            for line in text.replace("\r", "").splitlines()
            if not line.startswith(("(qemu)", "QEMU "))
        ]
        path = self.session_dir / "l1-registers.txt"
        path.write_text("\n".join(answers) + "\n")
        return path

    def _qemu_messages(self) -> str:
        try:
            text = (self.session_dir / "qemu.log").read_text(errors="replace").strip()
        except OSError:
            text = ""
        return text.splitlines()[-1] if text else "no message"

    def run(
        self,
        argv: Sequence[str],
        timeout: float,
        cwd: str,
        env: Mapping[str, str],
        stream: TextIO | None,
    ) -> CommandResult:
        if self.broken is not None or self.process is None:
            raise TestbedError(
                f"The nested test host is not running ({self.broken or 'not started'}).",
                console_log=self.console_log(),
            )
        with self.lock:
            job = self.ctl / "jobs" / f"{next(self.ids):05d}"
        job.mkdir()
        (job / "cmd.sh").write_text(command_script(argv, cwd, env))
        (job / "timeout").write_text(f"{max(1, math.ceil(timeout))}\n")
        (job / "go.tmp").write_text("")
        os.rename(job / "go.tmp", job / "go")
        output = _Output(job / "output", stream)
        submitted = time.monotonic()
        started_at: float | None = None
        status_path = job / "status"
        watch = _Watch(
            ConsoleWatch(self.console_path), Heartbeat(self.ctl / "heartbeat", submitted)
        )
        next_watch = submitted + CONSOLE_CHECK_INTERVAL
        while not status_path.exists():
            output.pump()
            now = time.monotonic()
            if now >= next_watch:
                next_watch = now + CONSOLE_CHECK_INTERVAL
                self._watch_l1(watch, argv, now, output)
            if started_at is None and (job / "started").exists():
                started_at = now
            code = self.process.poll()
            if code is not None:
                self.broken = f"QEMU exited with status {code}"
                output.pump(final=True)
                raise TestbedError(
                    f"The nested test host's QEMU exited with status {code} while running "
                    f"{shlex.join(argv)}.",
                    console_log=self.console_log(),
                    output=output.text,
                )
            limit = (
                submitted + RESPONSE_GRACE
                if started_at is None
                else started_at + timeout + RESPONSE_GRACE
            )
            if now > limit:
                what = "did not pick up" if started_at is None else "did not finish or kill"
                raise self._failure(
                    "L1 stopped answering",
                    f"The nested test host {what} the command {shlex.join(argv)} within "
                    f"{now - submitted:.0f} s and was shut down.",
                    output,
                )
            time.sleep(POLL_INTERVAL)
        duration = time.monotonic() - (started_at or submitted)
        output.pump(final=True)
        returncode = int(status_path.read_text().strip() or "-1")
        timed_out = (job / "timedout").exists()
        # Finished jobs move out of jobs/, which L1's agent lists over 9p ten times a second:
        # a session's hundreds of old jobs would make each of those passes cost as many stats.
        os.rename(job, self.ctl / "done" / job.name)
        if timed_out:
            raise CommandTimeoutError(
                f"The command {shlex.join(argv)} did not finish within {timeout:g} s in the "
                "nested test host and was killed.",
                console_log=self.console_log(),
                output=output.text,
            )
        return CommandResult(tuple(argv), returncode, output.text, duration)

    def _monitor_command(self, commands: bytes) -> bytes:
        """Send ``commands`` to QEMU's monitor; return all it said (empty if it is not there)."""
        chunks: list[bytes] = []
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as monitor:
                monitor.settimeout(MONITOR_TIMEOUT)
                monitor.connect(str(self.monitor_path))
                monitor.sendall(commands)
                # The monitor never closes the connection itself: read until it goes quiet.
                while chunk := monitor.recv(65536):
                    chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)

    def _watch_l1(self, watch: _Watch, argv: Sequence[str], now: float, output: _Output) -> None:
        """Look at L1's heartbeat and console; send a silent L1 an NMI, and raise `TestbedError`
        (L1 shut down) when it stays silent after that or reports a CPU stuck for good."""
        silent = watch.heartbeat.silent_for(now)
        if watch.nmi_sent_at is not None and silent < now - watch.nmi_sent_at:
            self.revivals.append(
                f"L1 (session {self.session_dir.name}) was silent for {watch.silent_at_nmi:.0f} "
                f"s and came back after an NMI, while running {_shorten(shlex.join(argv))}"
            )
            log.warning("testbed: %s", self.revivals[-1])
            watch.nmi_sent_at = None
        if silent >= HEARTBEAT_SILENCE and watch.nmi_sent_at is None:
            # A cheap try before giving L1 up: an L1 that only stalled loses nothing by it. The
            # wedges seen so far did not answer it (no "NMI received" on the console): both
            # CPUs halted with interrupts enabled and vectors pending in their APICs, as if the
            # emulated SVM global interrupt flag were stuck clear, or both CPUs at the int3
            # entry with interrupts disabled.
            watch.nmi_sent_at, watch.silent_at_nmi = now, silent
            log.warning("testbed: L1 has been silent for %.0f s; sending it an NMI", silent)
            self._monitor_command(b"nmi\n")
        elif watch.nmi_sent_at is not None and now - watch.nmi_sent_at >= HEARTBEAT_SILENCE:
            raise self._failure(
                f"L1 was silent for {silent:.0f} s, even after an NMI",
                f"The nested test host stopped answering while running {shlex.join(argv)}: no "
                f"heartbeat for {silent:.0f} s, even after an NMI, so it was shut down.",
                output,
            )
        stuck = watch.console.check()
        if stuck >= WEDGED_AFTER_SECONDS:
            # Waiting for the command's timeout would only waste that time: the stuck CPU never
            # comes back (the session's caller boots a fresh L1 and retries).
            raise self._failure(
                f"an L1 CPU was stuck for {stuck} s",
                f"The nested test host wedged while running {shlex.join(argv)}: its kernel "
                f"reported a CPU stuck for {stuck} s, so it was shut down.",
                output,
            )

    def _failure(self, reason: str, message: str, output: _Output) -> TestbedError:
        """Mark L1 broken for ``reason``, save its CPU state and kill it; return the error to
        raise, ``message`` followed by where the CPU state went."""
        self.broken = reason
        saved = self.save_cpu_state()
        self._kill()
        output.pump(final=True)
        if saved is not None:
            message += f" L1's CPU registers at that moment are in {saved}."
        return TestbedError(message, console_log=self.console_log(), output=output.text)

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with _suppress_lookup():
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            (self.ctl / "shutdown").write_text("")
            try:
                self.process.wait(SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning(
                    "nested test host did not power off within %.0f s; killing it", SHUTDOWN_TIMEOUT
                )
                self._kill()
        self.broken = self.broken or "closed"
        self.process = None


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is ProcessLookupError


class _DirectBackend(_Backend):
    def start(self) -> None:
        return None

    def run(
        self,
        argv: Sequence[str],
        timeout: float,
        cwd: str,
        env: Mapping[str, str],
        stream: TextIO | None,
    ) -> CommandResult:
        full_env = {
            "PATH": os.environ.get("PATH", DEFAULT_PATH),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            **env,
        }
        started = time.monotonic()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        chunks: list[str] = []
        timed_out = threading.Event()

        def watchdog() -> None:
            if _wait(proc, timeout):
                return
            timed_out.set()
            with _suppress_lookup():
                os.killpg(proc.pid, signal.SIGKILL)

        guard = threading.Thread(target=watchdog, daemon=True)
        guard.start()
        fd = proc.stdout.fileno()
        for data in iter(lambda: os.read(fd, 65536), b""):
            text = decoder.decode(data)
            chunks.append(text)
            if stream is not None:
                stream.write(text)
                stream.flush()
        chunks.append(decoder.decode(b"", final=True))
        returncode = proc.wait()
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGKILL)
        output = "".join(chunks)
        if timed_out.is_set():
            raise CommandTimeoutError(
                f"The command {shlex.join(argv)} did not finish within {timeout:g} s and was killed.",
                output=output,
            )
        return CommandResult(tuple(argv), returncode, output, time.monotonic() - started)

    def close(self) -> None:
        return None


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


class TestbedSession:
    """Runs commands where a real /dev/kvm exists; start once, `run` many times, `close`.

    ``mode`` is ``"auto"`` (direct on a VMX/SVM host, nested otherwise), ``"nested"`` or
    ``"direct"``. ``workdir`` (default ``<cache>/work``) is writable and has the same absolute
    path on both sides; everything else outside /tmp is this machine's file system, read-only.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        *,
        mode: str = "auto",
        cache_dir: Path | None = None,
        workdir: Path | None = None,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        cpus: int = DEFAULT_CPUS,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    ) -> None:
        if mode not in ("auto", "nested", "direct"):
            raise ValueError(f"The testbed mode {mode!r} is not one of auto, nested, direct.")
        self.cache = Cache(cache_dir)
        self.workdir = (workdir if workdir is not None else self.cache.root / "work").absolute()
        self.host: HostInfo = detect_host()
        if mode == "auto":
            mode = "direct" if self.host.kind is HostKind.NATIVE else "nested"
        self.mode = mode
        #: Each silent L1 that an NMI brought back, and the command it was running.
        self.revivals: list[str] = []
        #: Why each L1 replaced during this session failed, and the command it was running.
        self.replacements: list[str] = []
        self._backend: _Backend
        if mode == "direct":
            self._backend = _DirectBackend()
            self.description = f"commands run directly on this machine ({self.host.reason})"
        else:
            self._nested_args = (memory_mib, cpus, boot_timeout)
            self._backend = _NestedBackend(
                self.cache, self.workdir, memory_mib, cpus, boot_timeout, self.revivals
            )
            self.description = (
                f"commands run in the nested test host, an L1 Linux under QEMU TCG with emulated "
                f"SVM ({self.host.reason})"
            )
        self._started = False
        self._closed = False

    def start(self) -> TestbedSession:
        """Prepare the testbed (boot L1 if nested); returns self. Raises `TestbedError`."""
        if self._started:
            return self
        log.info("testbed: %s", self.description)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._backend.start()
        except ImageError as exc:
            raise TestbedError(f"The nested test host's images could not be built: {exc}") from exc
        self._started = True
        atexit.register(self.close)
        return self

    @property
    def boot_seconds(self) -> float:
        """Seconds L1 took from QEMU's start to serving jobs (0 when running directly)."""
        return self._backend.boot_seconds if isinstance(self._backend, _NestedBackend) else 0.0

    @property
    def session_dir(self) -> Path | None:
        """The nested session's directory (job files, L1 console log), or None when direct."""
        return self._backend.session_dir if isinstance(self._backend, _NestedBackend) else None

    def console_log(self) -> str:
        """Return L1's serial console log so far (empty when running directly)."""
        return self._backend.console_log()

    def run(
        self,
        argv: Sequence[str],
        timeout: float,
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        stream: TextIO | None = None,
    ) -> CommandResult:
        """Run ``argv`` and return its exit status and output; ``stream`` receives output live.

        The command is killed with its process group after ``timeout`` seconds, which raises
        `CommandTimeoutError`. When L1 fails under the command, the command runs again on a
        fresh L1, up to `L1_REPLACEMENTS` times; a testbed failure beyond that raises
        `TestbedError`. ``cwd`` defaults to the work directory; ``env`` adds variables to a
        small default environment.
        """
        if not argv:
            raise ValueError("The command to run is empty.")
        if timeout <= 0:
            raise ValueError(f"The timeout must be positive, not {timeout}.")
        if self._closed:
            raise TestbedError("The testbed session is closed.")
        self.start()
        directory = str(cwd) if cwd is not None else str(self.workdir)
        # When L1 itself fails (its kernel crashed or it wedged under emulation), not the
        # command, a fresh L1 boots and the command runs again there, so one broken L1 does not
        # fail every command after it. Each replacement is recorded in `replacements`.
        replaced = 0
        while True:
            try:
                return self._backend.run(list(argv), timeout, directory, dict(env or {}), stream)
            except CommandTimeoutError:
                raise
            except TestbedError:
                backend = self._backend
                if (
                    replaced == L1_REPLACEMENTS
                    or not isinstance(backend, _NestedBackend)
                    or backend.broken in (None, "closed")
                ):
                    raise
            replaced += 1
            self.replacements.append(
                f"{backend.broken} (session {backend.session_dir.name}) while running "
                f"{_shorten(shlex.join(argv))}"
            )
            log.warning(
                "testbed: the nested test host failed (%s); booting a fresh one and running "
                "the command again (replacement %d of at most %d for this command)",
                backend.broken,
                replaced,
                L1_REPLACEMENTS,
            )
            backend.close()
            self._backend = _NestedBackend(
                self.cache, self.workdir, *self._nested_args, self.revivals
            )
            self._backend.start()

    def close(self) -> None:
        """Shut the testbed down (power L1 off, killing it if it does not stop in time)."""
        if self._closed:
            return
        self._closed = True
        self._backend.close()

    def __enter__(self) -> TestbedSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
