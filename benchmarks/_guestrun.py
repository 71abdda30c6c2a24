"""Running a VMM whose Linux guest reports on its console, for benchmarks in the testbed.

A benchmark guest announces each measured job with ``BENCH-JOB-START NAME`` and
``BENCH-JOB-END NAME STATUS`` lines and hands over a tool's JSON report as
``BENCH-JSON NAME DATA`` (``DATA`` is the report gzipped and base64-encoded, so it fits on one
line). :func:`run_vmm` starts the VMM with its console on standard output, reads it line by
line, takes the VMM process's CPU time at each job's start and end (every thread, so the guest's
vCPU time too, as for any KVM VMM) and returns what the guest reported.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

CONSOLE_TAIL_LINES = 25

#: Guest shell function printing file $2 as a ``BENCH-JSON $1`` line.
GUEST_REPORT_FUNCTION = "report() { echo BENCH-JSON $1 $(gzip -c $2 | base64 | tr -d '\\n'); }\n"


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system time of every thread of process ``pid`` so far, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    # Fields 14 and 15 of proc(5), counted from the state (field 3) after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Killer:
    """Kills a process that outlives its timeout (so a hung guest cannot stall a benchmark)."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Arm the timer for ``proc``."""
        self.fired = False

        def kill() -> None:
            self.fired = True
            proc.kill()

        self._timer = threading.Timer(timeout, kill)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        """Disarm the timer."""
        self._timer.cancel()


@dataclass
class GuestRun:
    """What one VMM run produced: console log, per-job CPU seconds and statuses, reports."""

    log: str = ""
    returncode: int = 0
    killed: bool = False
    wall_s: float = 0.0
    process_cpu_s: float = 0.0
    job_cpu_s: dict[str, float] = field(default_factory=dict)
    job_status: dict[str, int] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def tail(self) -> str:
        """The last console lines, joined for a one-line failure reason."""
        return " | ".join(self.log.strip().splitlines()[-CONSOLE_TAIL_LINES:])


def run_vmm(argv: list[str], timeout: float) -> GuestRun:
    """Run ``argv`` to its end (killed after ``timeout`` seconds) and collect its guest's reports."""
    run = GuestRun()
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    killer = Killer(proc, timeout)
    lines: list[str] = []
    cpu_start: dict[str, float | None] = {}
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n")
        words = line.split()
        if words[:1] == ["BENCH-JOB-START"] and len(words) == 2:
            cpu_start[words[1]] = process_cpu_seconds(proc.pid)
        elif words[:1] == ["BENCH-JOB-END"] and len(words) == 3:
            before, after = cpu_start.get(words[1]), process_cpu_seconds(proc.pid)
            if before is not None and after is not None:
                run.job_cpu_s[words[1]] = after - before
            run.job_status[words[1]] = int(words[2]) if words[2].isdigit() else -1
        elif words[:1] == ["BENCH-JSON"] and len(words) == 3:
            try:
                run.reports[words[1]] = json.loads(gzip.decompress(base64.b64decode(words[2])))
            except (ValueError, OSError) as exc:
                run.problems.append(f"the report of {words[1]} did not decode ({exc})")
            line = f"BENCH-JSON {words[1]} ({len(words[2])} bytes)"
        lines.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    killer.cancel()
    run.returncode = os.waitstatus_to_exitcode(status)
    run.killed = killer.fired
    run.wall_s = time.monotonic() - started
    run.process_cpu_s = usage.ru_utime + usage.ru_stime
    run.log = "\n".join(lines)
    if run.killed:
        run.problems.append(f"killed after {timeout:.0f} s")
    elif run.returncode != 0:
        run.problems.append(f"the VMM exited with status {run.returncode}")
    return run
