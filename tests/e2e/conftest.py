"""Fixtures for nubis's end-to-end tests: real Linux guests booted where a real /dev/kvm exists.

On this project's machines /dev/kvm is PVM, so e2e tests run their commands in the nested test
host (an L1 Linux under QEMU TCG with emulated SVM, see PLATFORM.md); on a VMX/SVM machine they
run directly. L1 sees this machine's file system read-only at the same paths (so ``sys.executable``
and the repository work there), a fresh tmpfs on /tmp, and the testbed's work directory writable
at its own path. Put everything a guest writes (serial logs, disks) under `e2e_dir`.

Fixtures
--------
``testbed`` (session)
    A started `nubis.testbed.TestbedSession`; one L1 boot per pytest session, booted only when a
    test asks for it. ``testbed.run(argv, timeout)`` returns ``CommandResult(returncode, output,
    ...)`` and raises ``CommandTimeoutError`` (with L1's console log and the output so far) if the
    command is still running at ``timeout`` seconds, after killing its process group.
``guest_images`` (session)
    `nubis.image.GuestImages` with ``.bzimage``, ``.vmlinux`` (PVH), ``.initramfs``, ``.rootfs``
    (ext4, boot with the initramfs and ``root=/dev/vda``), and
    ``.cmdline(command, console="ttyS0", end="poweroff", root=None, script=None)``, the kernel
    command line that makes the guest's init run a shell command (see nubis/image/init.sh).
``e2e_dir`` (function)
    A fresh directory for this test, writable both here and inside the testbed.
``run_guest`` (function)
    ``run_guest(argv, timeout, serial=None)`` runs a VMM command line in the testbed and returns a
    `GuestRun` (``returncode``, ``output``, ``console``, ``markers``). Each ``{serial}`` in argv
    is replaced by a fresh log file under `e2e_dir`, and the guest console is that file's text;
    without it, the console is the command's output (for ``--serial tty`` / ``-serial stdio``).
    A failing test shows every guest console it ran in its report; a VMM still running at
    ``timeout`` is killed and `GuestTimeoutError` (a ``CommandTimeoutError``) carries its console.
``parse_markers`` (function, also importable from ``nubis.image``)
    Reads the init's markers from a console log: ``.userspace``, ``.exit_status``,
    ``.poweroff``, ``.ending``, ``.module_failures``, ``.modules_loaded``.

Environment: ``NUBIS_TESTBED_MODE`` (auto, nested or direct) and ``NUBIS_CACHE_DIR`` (the image
cache, default ``~/.cache/nubis``) override the defaults.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from nubis.image import GuestImages, InitMarkers, build_guest_images, parse_markers
from nubis.testbed import CommandTimeoutError, TestbedSession, detect_host
from nubis.testbed.session import L1_REPLACEMENTS

SERIAL_LOGS = pytest.StashKey[list[Path]]()
CONSOLE_TEXTS = pytest.StashKey[list[tuple[str, str]]]()
USES_TESTBED = pytest.StashKey[TestbedSession]()
TESTBED = pytest.StashKey[TestbedSession]()
LOG_LINES_SHOWN = 80


#: Times a failed e2e test is run again. Guests in the nested test host run under QEMU's
#: software emulation of SVM, where an occasional boot fails for reasons outside the VMM under
#: test (QEMU as the reference VMM shows it too, and L1 itself sometimes wedges); one rerun
#: keeps that from failing the suite, while a failure that repeats still fails it. Reruns are
#: reported, never silent: the summary counts them, and `pytest_terminal_summary` prints each
#: failed attempt's error with the guest consoles and L1 console it left.
E2E_RERUNS = 1


#: Seconds a fresh L1 takes to boot when the testbed replaces a failed one.
L1_REPLACEMENT_SECONDS = 180


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every e2e test one rerun (see `E2E_RERUNS`), and a timeout that leaves room for the
    testbed's own further runs of a command on a fresh L1 when an L1 failed.

    A test's timeout marker states what one run of its guest may take; the testbed may run a
    command again after replacing a crashed or wedged L1 (up to `L1_REPLACEMENTS` times), so
    the test as a whole gets that many more runs plus an L1 boot for each. Without this, the
    test was stopped while a later run, on a healthy L1, was still going.
    """
    for item in items:
        if item.get_closest_marker("e2e") is None:
            continue
        if item.get_closest_marker("flaky") is None:
            item.add_marker(pytest.mark.flaky(reruns=E2E_RERUNS))
        timeout = item.get_closest_marker("timeout")
        if timeout is not None and timeout.args:
            runs = 1 + L1_REPLACEMENTS
            seconds = runs * float(timeout.args[0]) + L1_REPLACEMENTS * L1_REPLACEMENT_SECONDS
            item.add_marker(pytest.mark.timeout(seconds, **timeout.kwargs), append=False)


def _cache_dir() -> Path | None:
    value = os.environ.get("NUBIS_CACHE_DIR")
    return Path(value) if value else None


def pytest_report_header(config: pytest.Config) -> str:
    """Say, before any test runs, where e2e commands would run and why."""
    host = detect_host()
    mode = os.environ.get("NUBIS_TESTBED_MODE", "auto")
    where = mode if mode != "auto" else ("direct" if host.kind.value == "native" else "nested")
    return f"nubis e2e testbed: {where} ({host.reason})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Append the guest consoles (and L1's console) a failed test produced to its report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    for path in item.stash.get(SERIAL_LOGS, []):
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            text = f"(unreadable: {exc})"
        report.sections.append((f"guest serial log {path}", _tail(text)))
    for name, text in item.stash.get(CONSOLE_TEXTS, []):
        report.sections.append((name, _tail(text)))
    session = item.stash.get(USES_TESTBED, None)
    if session is not None:
        report.sections.append(("L1 console log", _tail(session.console_log())))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show each L1 the testbed replaced or woke from silence, and what each e2e attempt that
    was run again left behind: its error and consoles.

    A rerun that passes hides the first attempt's failure from the usual report, yet that
    failure is the only evidence of why the attempt failed (a guest fault, a wedged L1).
    """
    session = terminalreporter.config.stash.get(TESTBED, None)
    if session is not None and (session.replacements or session.revivals):
        terminalreporter.write_sep("=", "nested test hosts that failed or went silent")
        for reason in session.replacements:
            terminalreporter.write_line(f"L1 replaced: {reason}")
        for what in session.revivals:
            terminalreporter.write_line(f"L1 revived: {what}")
    reports = terminalreporter.stats.get("rerun", [])
    attempts = [r for r in reports if r.when == "call" and r.sections]
    if not attempts:
        return
    terminalreporter.write_sep("=", "e2e attempts that were run again")
    for report in attempts:
        terminalreporter.write_sep("-", f"{report.nodeid} (attempt {report.rerun + 1})")
        terminalreporter.write_line(_tail(str(report.longrepr or "")))
        for name, text in report.sections:
            if name.startswith(("guest", "VMM output", "L1 console")):
                terminalreporter.write_sep("-", name)
                terminalreporter.write_line(text)


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-LOG_LINES_SHOWN:]) or "(empty)"


@pytest.fixture(scope="session")
def testbed(pytestconfig: pytest.Config) -> Iterator[TestbedSession]:
    """The session's testbed, booted on first use and shut down at the end."""
    session = TestbedSession(
        mode=os.environ.get("NUBIS_TESTBED_MODE", "auto"), cache_dir=_cache_dir()
    )
    pytestconfig.stash[TESTBED] = session
    session.start()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(autouse=True)
def _note_testbed_use(request: pytest.FixtureRequest) -> None:
    if "testbed" in request.fixturenames:
        request.node.stash[USES_TESTBED] = request.getfixturevalue("testbed")


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    """The default guest's kernel (bzImage and PVH vmlinux), initramfs and root disk."""
    return build_guest_images(_cache_dir())


@pytest.fixture
def e2e_dir(testbed: TestbedSession, request: pytest.FixtureRequest) -> Path:
    """A fresh per-test directory under the testbed's work directory."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-120:]
    path = testbed.workdir / "e2e" / name
    attempt = getattr(request.node, "execution_count", 1)
    if attempt > 1 and path.exists():
        # A rerun starts fresh too; the failed attempt's files move aside, to be read later.
        aside = path.with_name(f"{name}.attempt-{attempt - 1}")
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@dataclass(frozen=True)
class GuestRun:
    """A VMM run in the testbed: its exit status, output, guest console and the init's markers."""

    returncode: int
    output: str
    console: str
    markers: InitMarkers
    duration: float


class GuestTimeoutError(CommandTimeoutError):
    """A VMM run was killed at its timeout; ``console`` holds what the guest printed."""

    def __init__(self, error: CommandTimeoutError, console: str) -> None:
        super().__init__(error.message, console_log=error.console_log, output=error.output)
        self.console = console
        self.markers = parse_markers(console)

    def __str__(self) -> str:
        return f"{super().__str__()}\n--- guest console ---\n{_tail(self.console)}"


@pytest.fixture
def run_guest(
    testbed: TestbedSession, e2e_dir: Path, request: pytest.FixtureRequest
) -> Callable[..., GuestRun]:
    """Return a function running a VMM command line in the testbed (see the module docstring)."""
    counter = iter(range(1, 1_000_000))
    logs = request.node.stash.setdefault(SERIAL_LOGS, [])
    texts = request.node.stash.setdefault(CONSOLE_TEXTS, [])

    def run(argv: Sequence[str], timeout: float, serial: Path | None = None) -> GuestRun:
        serial = serial or e2e_dir / f"serial-{next(counter)}.log"
        uses_file = any("{serial}" in a for a in argv)
        argv = [a.replace("{serial}", str(serial)) for a in argv]
        if uses_file:
            serial.unlink(missing_ok=True)
            logs.append(serial)
            # Every run starts a fresh log, including the testbed's second run of the command
            # after replacing a failed L1 (nubis appends to its serial file, and the first
            # run's lines would be read as the second's).
            argv = ["sh", "-c", 'rm -f "$0" && exec "$@"', str(serial), *argv]
        try:
            result = testbed.run(argv, timeout)
        except CommandTimeoutError as exc:
            console = (
                serial.read_text(errors="replace") if uses_file and serial.exists() else exc.output
            )
            if not uses_file:
                texts.append(("guest console (VMM output)", exc.output))
            raise GuestTimeoutError(exc, console) from None
        console = (
            serial.read_text(errors="replace") if uses_file and serial.exists() else result.output
        )
        if not uses_file:
            texts.append(("guest console (VMM output)", result.output))
        else:
            texts.append(("VMM output", result.output))
        return GuestRun(
            result.returncode, result.output, console, parse_markers(console), result.duration
        )

    return run


@pytest.fixture(name="parse_markers")
def parse_markers_fixture() -> Callable[[str | bytes], InitMarkers]:
    """The init marker parser, as a fixture for convenience."""
    return parse_markers
