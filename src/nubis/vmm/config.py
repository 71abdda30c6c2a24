"""The VM configuration model: one schema for the command line and the REST API.

The JSON shape follows cloud-hypervisor's ``VmConfig`` (API 0.3.0): ``cpus``, ``memory``,
``payload``, ``disks``, ``net``, ``rng``, ``serial``, ``console``. Every value a person supplies
is validated once, here, and a violation raises :class:`ConfigError` whose message is one sentence
naming the field and what is wrong with it. Checks that need the host (does the kernel file exist,
how much memory does the host have) are in :meth:`VmConfig.check_host`.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

MIN_MEMORY_SIZE = 32 << 20
"""Below this a Linux guest cannot boot (kernel, initramfs and page tables do not fit)."""
MAX_CMDLINE_SIZE = 2048
"""Linux's x86 COMMAND_LINE_SIZE: longer command lines are cut by the kernel."""
MAX_VCPUS_LIMIT = 254
"""APIC ids are 8 bits in the MADT's Processor Local APIC entries; 255 is the broadcast id."""
TAP_NAME_MAX = 15
"""IFNAMSIZ (16) minus the terminating NUL."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one sentence for a person."""


class ConsoleMode(enum.Enum):
    """Where a console's output goes (and input comes from, in tty mode)."""

    OFF = "Off"
    NULL = "Null"
    TTY = "Tty"
    FILE = "File"


_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.IGNORECASE)


def parse_size(text: str, what: str) -> int:
    """Parse a size such as ``512M``, ``2G`` or ``1048576`` (bytes) into bytes."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ConfigError(
            f"{what} {text!r} is not a size; use a number with an optional K, M, G or T suffix"
        )
    return int(match.group(1)) << _SIZE_SHIFT[match.group(2).upper()]


def format_size(size: int) -> str:
    """Format bytes with the largest exact binary suffix (``536870912`` → ``512M``)."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


@dataclass(frozen=True)
class CpusConfig:
    """vCPUs: how many boot (``boot_vcpus``); ``max_vcpus`` is accepted for API compatibility."""

    boot_vcpus: int = 1
    max_vcpus: int | None = None

    def __post_init__(self) -> None:
        _check_int("cpus.boot_vcpus", self.boot_vcpus, 1, MAX_VCPUS_LIMIT)
        if self.max_vcpus is not None:
            _check_int("cpus.max_vcpus", self.max_vcpus, self.boot_vcpus, MAX_VCPUS_LIMIT)


@dataclass(frozen=True)
class MemoryConfig:
    """Guest RAM: ``size`` in bytes; ``shared`` backs it with a memfd (needed by vhost-user)."""

    size: int = 512 << 20
    shared: bool = False

    def __post_init__(self) -> None:
        _check_int("memory.size", self.size, MIN_MEMORY_SIZE, 1 << 46)
        if self.size % 4096:
            raise ConfigError(f"memory.size {self.size} is not a multiple of the 4 KiB page size")
        _check_bool("memory.shared", self.shared)


@dataclass(frozen=True)
class PayloadConfig:
    """What to boot: a kernel (ELF vmlinux or bzImage), an optional initramfs and command line."""

    kernel: str
    initramfs: str | None = None
    cmdline: str = ""

    def __post_init__(self) -> None:
        _check_str("payload.kernel", self.kernel, allow_empty=False)
        if self.initramfs is not None:
            _check_str("payload.initramfs", self.initramfs, allow_empty=False)
        _check_str("payload.cmdline", self.cmdline)
        if "\0" in self.cmdline:
            raise ConfigError("payload.cmdline contains a NUL character")
        if len(self.cmdline.encode()) + 1 > MAX_CMDLINE_SIZE:
            raise ConfigError(
                f"payload.cmdline is {len(self.cmdline.encode())} bytes long; "
                f"the limit is {MAX_CMDLINE_SIZE - 1}"
            )


@dataclass(frozen=True)
class DiskConfig:
    """A virtio-blk disk backed by a raw image file or a block device."""

    path: str
    readonly: bool = False
    direct: bool = False
    id: str | None = None
    serial: str | None = None

    def __post_init__(self) -> None:
        _check_str("disks.path", self.path, allow_empty=False)
        _check_bool("disks.readonly", self.readonly)
        _check_bool("disks.direct", self.direct)
        if self.id is not None:
            _check_str("disks.id", self.id, allow_empty=False)
        if self.serial is not None:
            _check_str("disks.serial", self.serial)
            if len(self.serial.encode()) > 20:
                raise ConfigError(
                    f"disks.serial {self.serial!r} is longer than virtio-blk's 20 bytes"
                )


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net device backed by a host tap device."""

    tap: str | None = None
    ip: str | None = None
    mask: str | None = None
    mac: str | None = None
    host_mac: str | None = None
    mtu: int | None = None
    num_queues: int = 2
    id: str | None = None

    def __post_init__(self) -> None:
        if self.tap is not None:
            _check_str("net.tap", self.tap)
            if len(self.tap.encode()) > TAP_NAME_MAX:
                raise ConfigError(
                    f"net.tap {self.tap!r} is longer than the {TAP_NAME_MAX} bytes an interface name may have"
                )
            if "/" in self.tap or " " in self.tap:
                raise ConfigError(f"net.tap {self.tap!r} is not a valid interface name")
        for name in ("ip", "mask"):
            value = getattr(self, name)
            if value is not None:
                _check_str(f"net.{name}", value, allow_empty=False)
                try:
                    ipaddress.IPv4Address(value)
                except ValueError:
                    raise ConfigError(f"net.{name} {value!r} is not an IPv4 address") from None
        for name in ("mac", "host_mac"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not _MAC_RE.fullmatch(value)):
                raise ConfigError(
                    f"net.{name} {value!r} is not a MAC address like 12:34:56:78:9a:bc"
                )
        if self.mtu is not None:
            _check_int("net.mtu", self.mtu, 68, 65535)
        _check_int("net.num_queues", self.num_queues, 2, 16)
        if self.num_queues % 2:
            raise ConfigError(
                f"net.num_queues {self.num_queues} must be even (one rx and one tx queue per pair)"
            )
        if self.id is not None:
            _check_str("net.id", self.id, allow_empty=False)


@dataclass(frozen=True)
class RngConfig:
    """virtio-rng's entropy source."""

    src: str = "/dev/urandom"

    def __post_init__(self) -> None:
        _check_str("rng.src", self.src, allow_empty=False)


@dataclass(frozen=True)
class ConsoleConfig:
    """A console (the serial port or virtio-console): its mode and, for File, the path."""

    mode: ConsoleMode = ConsoleMode.NULL
    file: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.mode, ConsoleMode):
            raise ConfigError(f"console mode {self.mode!r} is not one of Off, Null, Tty, File")
        if self.mode is ConsoleMode.FILE and not self.file:
            raise ConfigError("console mode File needs a file path")
        if self.file is not None:
            _check_str("console file", self.file, allow_empty=False)


def _default_serial() -> ConsoleConfig:
    return ConsoleConfig(ConsoleMode.TTY)


def _default_console() -> ConsoleConfig:
    return ConsoleConfig(ConsoleMode.OFF)


@dataclass(frozen=True)
class VmConfig:
    """Everything needed to build and boot one VM.

    Defaults differ from cloud-hypervisor's in one place: the serial port goes to the terminal
    and virtio-console is off, because nubis boots kernels with ``console=ttyS0`` by default.
    """

    payload: PayloadConfig
    cpus: CpusConfig = field(default_factory=CpusConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    disks: tuple[DiskConfig, ...] = ()
    net: tuple[NetConfig, ...] = ()
    rng: RngConfig | None = field(default_factory=RngConfig)
    serial: ConsoleConfig = field(default_factory=_default_serial)
    console: ConsoleConfig = field(default_factory=_default_console)

    def __post_init__(self) -> None:
        if not isinstance(self.payload, PayloadConfig):
            raise ConfigError("payload is required and must name a kernel")
        if self.serial.mode is ConsoleMode.TTY and self.console.mode is ConsoleMode.TTY:
            raise ConfigError("only one of serial and console can use the terminal (mode Tty)")
        ids = [d.id for d in self.disks if d.id] + [n.id for n in self.net if n.id]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"device id {duplicates[0]!r} is used more than once")
        taps = [n.tap for n in self.net if n.tap]
        if len(set(taps)) != len(taps):
            raise ConfigError("the same tap device is given to more than one net device")

    # -- host checks -------------------------------------------------------------------------

    def check_host(self) -> None:
        """Check what needs the host: files exist and are readable, memory fits the host."""
        _check_readable("kernel", self.payload.kernel)
        if self.payload.initramfs is not None:
            _check_readable("initramfs", self.payload.initramfs)
        for disk in self.disks:
            _check_readable("disk", disk.path, write=not disk.readonly)
        if self.rng is not None:
            _check_readable("rng source", self.rng.src)
        host_memory = _host_memory()
        if host_memory is not None and self.memory.size > host_memory:
            raise ConfigError(
                f"memory.size {format_size(self.memory.size)} is more than the host's "
                f"{format_size(host_memory)} of RAM"
            )

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The cloud-hypervisor-style JSON object for this configuration."""
        raw = asdict(self)
        for key in ("serial", "console"):
            raw[key]["mode"] = getattr(self, key).mode.value
        raw["disks"] = list(raw["disks"])
        raw["net"] = list(raw["net"])
        return raw

    @classmethod
    def from_dict(cls, raw: object) -> VmConfig:
        """Build a configuration from JSON-decoded data; unknown fields and wrong types are refused."""
        data = _expect_object("VmConfig", raw)
        _refuse_unknown("VmConfig", data, {f.name for f in fields(cls)})
        if "payload" not in data:
            raise ConfigError("payload is required and must name a kernel")
        kwargs: dict[str, Any] = {"payload": _build(PayloadConfig, "payload", data["payload"])}
        if "cpus" in data:
            kwargs["cpus"] = _build(CpusConfig, "cpus", data["cpus"])
        if "memory" in data:
            kwargs["memory"] = _build(MemoryConfig, "memory", data["memory"])
        if "disks" in data and data["disks"] is not None:
            kwargs["disks"] = tuple(
                _build(DiskConfig, "disks", d) for d in _expect_list("disks", data["disks"])
            )
        if "net" in data and data["net"] is not None:
            kwargs["net"] = tuple(
                _build(NetConfig, "net", n) for n in _expect_list("net", data["net"])
            )
        if "rng" in data:
            kwargs["rng"] = None if data["rng"] is None else _build(RngConfig, "rng", data["rng"])
        for key in ("serial", "console"):
            if key in data:
                kwargs[key] = _build_console(key, data[key])
        return cls(**kwargs)


# -- helpers -------------------------------------------------------------------------------------

_T = TypeVar("_T")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} is {value}; it must be between {low} and {high}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, not {value!r}")


def _check_str(name: str, value: object, *, allow_empty: bool = True) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, not {value!r}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"{name} is not valid Unicode") from None
    if not allow_empty and not value:
        raise ConfigError(f"{name} must not be empty")


def _expect_object(name: str, raw: object) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name} must be a JSON object")
    return raw


def _expect_list(name: str, raw: object) -> list[Any]:
    if not isinstance(raw, list):
        raise ConfigError(f"{name} must be a JSON array")
    return raw


def _refuse_unknown(name: str, data: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{name} has an unknown field {unknown[0]!r}")


def _build(cls: type[_T], name: str, raw: object) -> _T:
    data = _expect_object(name, raw)
    _refuse_unknown(name, data, {f.name for f in fields(cls)})  # type: ignore[arg-type]
    try:
        return cls(**data)
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{name} is missing a required field ({error})") from None


def _build_console(name: str, raw: object) -> ConsoleConfig:
    data = dict(_expect_object(name, raw))
    _refuse_unknown(name, data, {"mode", "file"})
    mode = data.get("mode", "Null")
    try:
        data["mode"] = ConsoleMode(mode)
    except ValueError:
        raise ConfigError(f"{name}.mode {mode!r} is not one of Off, Null, Tty, File") from None
    return ConsoleConfig(**data)


def _check_readable(what: str, path: str, *, write: bool = False) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a directory, not a file")
    mode = os.R_OK | (os.W_OK if write else 0)
    if not os.access(path, mode):
        access = "readable and writable" if write else "readable"
        raise ConfigError(f"{what} {path!r} is not {access} by this user")


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
