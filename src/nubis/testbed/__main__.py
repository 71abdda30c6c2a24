"""Command line: ``python -m nubis.testbed run [--timeout S] [--mode M] -- CMD...``.

Runs CMD in the testbed (the nested test host on this project's PVM machines), streaming its
output, and exits with its exit status; 124 if it timed out, 125 if the testbed itself failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nubis.testbed.session import (
    DEFAULT_CPUS,
    CommandTimeoutError,
    TestbedError,
    TestbedSession,
)

EXIT_TIMEOUT = 124
EXIT_TESTBED_FAILED = 125


def main(argv: Sequence[str] | None = None) -> int:
    """Run the testbed command line and return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m nubis.testbed", description="Run commands where a real /dev/kvm exists."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one command in the testbed")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds before CMD is killed")
    run.add_argument("--mode", choices=["auto", "nested", "direct"], default="auto")
    run.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="writable directory shared at the same path (default <cache>/work)",
    )
    run.add_argument("--cache-dir", type=Path, default=None)
    run.add_argument("--memory", type=int, default=None, metavar="MIB", help="L1 memory")
    run.add_argument(
        "--cpus", type=int, default=None, metavar="N", help=f"L1 vCPUs (default {DEFAULT_CPUS})"
    )
    run.add_argument("-q", "--quiet", action="store_true", help="do not report testbed progress")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given (put it after --)")
    logging.basicConfig(level=logging.WARNING, format="nubis testbed: %(message)s")

    def note(text: str) -> None:
        if not args.quiet:
            print(f"nubis testbed: {text}", file=sys.stderr, flush=True)

    kwargs: dict[str, int] = {}
    if args.memory is not None:
        kwargs["memory_mib"] = args.memory
    if args.cpus is not None:
        kwargs["cpus"] = args.cpus
    session = TestbedSession(
        mode=args.mode, cache_dir=args.cache_dir, workdir=args.workdir, **kwargs
    )
    note(session.description)
    started = time.monotonic()
    try:
        with session:
            if session.mode == "nested":
                note(
                    f"L1 ready in {session.boot_seconds:.1f} s (console log in {session.session_dir})"
                )
            result = session.run(cmd, args.timeout, stream=sys.stdout)
    except CommandTimeoutError as exc:
        print(f"nubis testbed: {exc.message}", file=sys.stderr)
        return EXIT_TIMEOUT
    except TestbedError as exc:
        print(f"nubis testbed: {exc}", file=sys.stderr)
        return EXIT_TESTBED_FAILED
    note(f"exit status {result.returncode}; {time.monotonic() - started:.1f} s in all")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
