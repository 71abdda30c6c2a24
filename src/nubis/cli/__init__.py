"""The ``nubis`` command line: cloud-hypervisor's option grammar into a :class:`VmConfig`.

Options that describe a device take comma-separated ``key=value`` lists, as cloud-hypervisor's
do: ``--cpus boot=2``, ``--memory size=512M``, ``--disk path=disk.img,readonly=on``. Booleans are
``on``/``off`` (or ``true``/``false``). A value containing commas can be double-quoted.

Exit status of ``nubis`` running a VM:

=====  ==========================================================================
0      the guest powered off (ACPI S5, or ``poweroff``), or nubis was asked to stop
       (SIGTERM, SIGINT, the API's ``vmm.shutdown``) and shut the VM down cleanly
1      nubis failed: a KVM error, an unexpected vCPU exit, a device it could not set up
2      bad input: an invalid option, a missing kernel, a value out of range
3      the guest reset itself and ``--no-reboot`` was given (so ``panic=-1`` on the
       guest's command line turns a kernel panic into exit status 3)
=====  ==========================================================================
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from types import SimpleNamespace

from nubis import __version__
from nubis._frozen import Frozen
from nubis.vmm.config import (
    ConfigError,
    ConsoleConfig,
    ConsoleMode,
    CpusConfig,
    DiskConfig,
    MemoryConfig,
    NetConfig,
    PayloadConfig,
    RngConfig,
    VmConfig,
    parse_size,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_GUEST_RESET = 3


class UsageError(ValueError):
    """A command-line option is malformed; the message is one sentence."""


def split_options(text: str, option: str) -> dict[str, str]:
    """Split ``a=1,b="x,y"`` into ``{"a": "1", "b": "x,y"}``; keys must be unique."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise UsageError(f"{option} {text!r} has an unterminated double quote")
    items.append("".join(current))
    result: dict[str, str] = {}
    for item in items:
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"{option} expects key=value pairs, and {item!r} has no '='")
        if key in result:
            raise UsageError(f"{option} gives {key!r} more than once")
        result[key] = value
    return result


def _known(option: str, values: dict[str, str], allowed: Sequence[str]) -> None:
    for key in values:
        if key not in allowed:
            raise UsageError(f"{option} has no parameter {key!r}; it takes {', '.join(allowed)}")


def _bool(option: str, key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise UsageError(f"{option} {key}={value!r} must be on or off")


def _int(option: str, key: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise UsageError(f"{option} {key}={value!r} is not a number") from None


def parse_cpus(text: str) -> CpusConfig:
    """``--cpus boot=N[,max=M]``."""
    values = split_options(text, "--cpus")
    _known("--cpus", values, ("boot", "max"))
    boot = _int("--cpus", "boot", values["boot"]) if "boot" in values else 1
    maximum = _int("--cpus", "max", values["max"]) if "max" in values else None
    return CpusConfig(boot_vcpus=boot, max_vcpus=maximum)


def parse_memory(text: str) -> MemoryConfig:
    """``--memory size=SIZE[,shared=on][,thp=off]``."""
    values = split_options(text, "--memory")
    _known("--memory", values, ("size", "shared", "thp"))
    size = parse_size(values["size"], "--memory size") if "size" in values else MemoryConfig().size
    shared = _bool("--memory", "shared", values["shared"]) if "shared" in values else False
    thp = _bool("--memory", "thp", values["thp"]) if "thp" in values else True
    return MemoryConfig(size=size, shared=shared, thp=thp)


def parse_disk(text: str) -> DiskConfig:
    """``--disk path=FILE[,readonly=on][,direct=on][,id=NAME][,serial=STR]``."""
    values = split_options(text, "--disk")
    _known("--disk", values, ("path", "readonly", "direct", "id", "serial"))
    if "path" not in values:
        raise UsageError("--disk needs path=FILE")
    return DiskConfig(
        path=values["path"],
        readonly=_bool("--disk", "readonly", values["readonly"]) if "readonly" in values else False,
        direct=_bool("--disk", "direct", values["direct"]) if "direct" in values else False,
        id=values.get("id"),
        serial=values.get("serial"),
    )


def parse_net(text: str) -> NetConfig:
    """``--net tap=NAME,ip=ADDR,mask=MASK,mac=MAC,host_mac=MAC,mtu=N,num_queues=N,id=NAME``."""
    values = split_options(text, "--net")
    _known("--net", values, ("tap", "ip", "mask", "mac", "host_mac", "mtu", "num_queues", "id"))
    return NetConfig(
        tap=values.get("tap") or None,
        ip=values.get("ip") or None,
        mask=values.get("mask") or None,
        mac=values.get("mac") or None,
        host_mac=values.get("host_mac") or None,
        mtu=_int("--net", "mtu", values["mtu"]) if values.get("mtu") else None,
        num_queues=_int("--net", "num_queues", values["num_queues"])
        if values.get("num_queues")
        else 2,
        id=values.get("id") or None,
    )


def parse_rng(text: str) -> RngConfig:
    """``--rng src=PATH``."""
    values = split_options(text, "--rng")
    _known("--rng", values, ("src",))
    return RngConfig(src=values.get("src", RngConfig().src))


def parse_console(text: str, option: str) -> ConsoleConfig:
    """``off``, ``null``, ``tty`` or ``file=PATH`` for ``--serial`` and ``--console``."""
    lowered = text.lower()
    simple = {"off": ConsoleMode.OFF, "null": ConsoleMode.NULL, "tty": ConsoleMode.TTY}
    if lowered in simple:
        return ConsoleConfig(simple[lowered])
    if lowered.startswith("file="):
        path = text[len("file=") :]
        if not path:
            raise UsageError(f"{option} file= needs a path")
        return ConsoleConfig(ConsoleMode.FILE, path)
    raise UsageError(f"{option} {text!r} is not one of off, null, tty, file=PATH")


def parse_path_option(text: str, option: str) -> str:
    """``path=PATH`` or a bare ``PATH`` (for ``--api-socket`` and ``--event-monitor``)."""
    if "=" not in text:
        return text
    values = split_options(text, option)
    _known(option, values, ("path",))
    if not values.get("path"):
        raise UsageError(f"{option} needs path=PATH")
    return values["path"]


class RunOptions(Frozen):
    """How to run the VMM process, beyond the VM's own configuration."""

    __slots__ = ("api_socket", "event_monitor", "log_file", "no_reboot", "verbosity")

    no_reboot: bool
    verbosity: int
    log_file: str | None
    api_socket: str | None
    event_monitor: str | None

    def __init__(
        self,
        no_reboot: bool = False,
        verbosity: int = 0,
        log_file: str | None = None,
        api_socket: str | None = None,
        event_monitor: str | None = None,
    ) -> None:
        object.__setattr__(self, "no_reboot", no_reboot)
        object.__setattr__(self, "verbosity", verbosity)
        object.__setattr__(self, "log_file", log_file)
        object.__setattr__(self, "api_socket", api_socket)
        object.__setattr__(self, "event_monitor", event_monitor)


def _terminal_columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` finds it: $COLUMNS, stdout, 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    if sys.__stdout__ is None:
        return 80
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


# The options that take one value: (option, default, metavar, help). build_parser and the fast
# path of parse_args both read this table, so they cannot disagree on a name or a default.
_VALUE_OPTIONS: tuple[tuple[str, str | None, str | None, str], ...] = (
    ("--kernel", None, None, "kernel to boot: an ELF vmlinux (PVH entry) or a bzImage"),
    ("--initramfs", None, None, "initramfs (cpio archive) for the kernel"),
    ("--cmdline", "", None, "kernel command line"),
    ("--cpus", "boot=1", None, "boot=N: number of vCPUs (default boot=1)"),
    ("--memory", "size=512M", None, "size=SIZE[,shared=on][,thp=off] (default size=512M, thp=on)"),
    ("--rng", "src=/dev/urandom", None, "virtio-rng: src=PATH, or 'off'"),
    ("--serial", "tty", None, "16550 serial port: off|null|tty|file=PATH (default tty)"),
    ("--console", "off", None, "virtio-console hvc0: off|null|tty|file=PATH (default off)"),
    ("--api-socket", None, None, "serve the REST API on this Unix socket: path=PATH"),
    ("--event-monitor", None, None, "write one JSON event per line to path=PATH"),
    ("--log-file", None, None, "write the log here instead of standard error"),
)
# The options that take one or more values and add up over repetitions.
_LIST_OPTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "--disk",
        "path=FILE,...",
        "virtio-blk disk: path=FILE[,readonly=on][,direct=on][,id=NAME][,serial=STR]",
    ),
    (
        "--net",
        "tap=NAME,...",
        "virtio-net device: tap=NAME,ip=ADDR,mask=MASK,mac=MAC,mtu=N,num_queues=N,id=NAME",
    ),
)


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for running a VM (``nubis --kernel ...``)."""
    import argparse

    class HelpFormatter(argparse.HelpFormatter):
        """argparse's formatter, which otherwise imports shutil (and bz2, lzma) for the width."""

        def __init__(
            self,
            prog: str,
            indent_increment: int = 2,
            max_help_position: int = 24,
            width: int | None = None,
        ) -> None:
            if width is None:
                width = _terminal_columns() - 2
            super().__init__(prog, indent_increment, max_help_position, width)

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise UsageError(message)

    parser = Parser(
        prog="nubis",
        formatter_class=HelpFormatter,
        description="A lightweight virtual machine monitor on KVM. Subcommands: "
        "'nubis demo' boots a default guest, 'nubis image build' builds guest images.",
        epilog="Exit status: 0 guest powered off or VMM stopped cleanly, 1 failure, 2 bad input, "
        "3 guest reset with --no-reboot.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"nubis {__version__}")
    for option, default, metavar, help_text in _VALUE_OPTIONS[:5]:
        parser.add_argument(option, default=default, metavar=metavar, help=help_text)
    for option, metavar, help_text in _LIST_OPTIONS:
        parser.add_argument(
            option, action="extend", nargs="+", default=[], metavar=metavar, help=help_text
        )
    for option, default, metavar, help_text in _VALUE_OPTIONS[5:8]:
        parser.add_argument(option, default=default, metavar=metavar, help=help_text)
    parser.add_argument(
        "--no-reboot",
        action="store_true",
        help="exit (status 3) when the guest resets instead of rebooting it",
    )
    for option, default, metavar, help_text in _VALUE_OPTIONS[8:10]:
        parser.add_argument(option, default=default, metavar=metavar, help=help_text)
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    for option, default, metavar, help_text in _VALUE_OPTIONS[10:]:
        parser.add_argument(option, default=default, metavar=metavar, help=help_text)
    return parser


def _parse_simple(argv: Sequence[str]) -> dict[str, Any] | None:
    """What argparse would make of ``argv``, for the plain spellings only; None for the rest.

    Importing argparse (with re and gettext) is a good part of nubis's start, and a command line
    written as ``--option value`` with whole option names needs none of it. Anything else (an
    abbreviation, ``--option=value``, a value starting with ``-``, ``--help``, an error) returns
    None, and argparse parses the command line, with its own messages.
    """
    values: dict[str, Any] = {_dest(o): default for o, default, _, _ in _VALUE_OPTIONS}
    values.update({_dest(o): [] for o, _, _ in _LIST_OPTIONS})
    values["no_reboot"] = False
    values["verbose"] = 0
    value_options = {o: _dest(o) for o, _, _, _ in _VALUE_OPTIONS}
    list_options = {o: _dest(o) for o, _, _ in _LIST_OPTIONS}
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--no-reboot":
            values["no_reboot"] = True
        elif arg in ("-v", "--verbose"):
            values["verbose"] += 1
        elif arg in value_options:
            if index == len(argv) or argv[index].startswith("-"):
                return None
            values[value_options[arg]] = argv[index]
            index += 1
        elif arg in list_options:
            items = []
            while index < len(argv) and not argv[index].startswith("-"):
                items.append(argv[index])
                index += 1
            if not items:
                return None
            values[list_options[arg]] = values[list_options[arg]] + items
        else:
            return None
    return values


def parse_args(argv: Sequence[str]) -> tuple[VmConfig | None, RunOptions]:
    """Parse a VM command line; the config is None when no kernel is given (API-only start)."""
    simple = _parse_simple(argv)
    args = SimpleNamespace(**simple) if simple is not None else build_parser().parse_args(argv)
    options = RunOptions(
        no_reboot=args.no_reboot,
        verbosity=args.verbose,
        log_file=args.log_file,
        api_socket=parse_path_option(args.api_socket, "--api-socket") if args.api_socket else None,
        event_monitor=parse_path_option(args.event_monitor, "--event-monitor")
        if args.event_monitor
        else None,
    )
    if args.kernel is None:
        if args.initramfs or args.disk or args.net:
            raise UsageError("--kernel is required to boot a VM")
        return None, options
    config = VmConfig(
        payload=PayloadConfig(kernel=args.kernel, initramfs=args.initramfs, cmdline=args.cmdline),
        cpus=parse_cpus(args.cpus),
        memory=parse_memory(args.memory),
        disks=tuple(parse_disk(d) for d in args.disk),
        net=tuple(parse_net(n) for n in args.net),
        rng=None if args.rng.lower() == "off" else parse_rng(args.rng),
        serial=parse_console(args.serial, "--serial"),
        console=parse_console(args.console, "--console"),
    )
    return config, options


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nubis`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "demo":
        from nubis.vmm.demo import main as demo_main

        return demo_main(args[1:])
    if args and args[0] == "image":
        from nubis.image.__main__ import main as image_main

        return image_main(args[1:])
    try:
        config, options = parse_args(args)
        if config is not None:
            config.check_host()
    except (UsageError, ConfigError) as error:
        print(f"nubis: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if config is None and options.api_socket is None:
        print(
            "nubis: error: give --kernel to boot a VM, or --api-socket to wait for one",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    from nubis.vmm.runner import run

    status = run(config, options)
    if argv is None:
        _exit_process(status)
    return status


def _exit_process(status: int) -> NoReturn:
    """End the ``nubis`` process with ``status`` once its output is flushed.

    Every thread nubis leaves behind is a daemon and nothing registers an exit handler but
    logging, so this is what the interpreter's own exit would do, minus tearing down some hundred
    modules one by one: tens of milliseconds of a VMM's exit.
    """
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            status = 120  # what the interpreter exits with when flushing standard output fails
    os._exit(status)
