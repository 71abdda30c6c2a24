"""The VM configuration model: one schema for the command line and the REST API.

The JSON shape follows cloud-hypervisor's ``VmConfig`` (API 0.3.0): ``cpus``, ``memory``,
``payload``, ``disks``, ``net``, ``rng``, ``serial``, ``console``. Every value a person supplies
is validated once, here, and a violation raises :class:`ConfigError` whose message is one sentence
naming the field and what is wrong with it. Checks that need the host (does the kernel file exist,
how much memory does the host have) are in :meth:`VmConfig.check_host`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from nubis._enum import Enum
from nubis._frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
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


class ConsoleMode(Enum):
    """Where a console's output goes (and input comes from, in tty mode)."""

    OFF = "Off"
    NULL = "Null"
    TTY = "Tty"
    FILE = "File"


_SIZE_SHIFT = {"K": 10, "M": 20, "G": 30, "T": 40}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")


def parse_size(text: str, what: str) -> int:
    """Parse a size such as ``512M``, ``2G`` or ``1048576`` (bytes) into bytes."""
    digits = text.strip()
    shift = _SIZE_SHIFT.get(digits[-1:].upper(), 0)
    if shift:
        digits = digits[:-1]
    if not digits.isdecimal():
        raise ConfigError(
            f"{what} {text!r} is not a size; use a number with an optional K, M, G or T suffix"
        )
    return int(digits) << shift


def _is_mac(text: str) -> bool:
    """Six pairs of hex digits separated by colons, like ``12:34:56:78:9a:bc``."""
    pairs = text.split(":")
    return len(pairs) == 6 and all(len(p) == 2 and set(p) <= _HEX_DIGITS for p in pairs)


def _is_ipv4(text: str) -> bool:
    """Four dotted decimal octets without leading zeros, as ``ipaddress.IPv4Address`` takes."""
    octets = text.split(".")
    return len(octets) == 4 and all(
        0 < len(o) <= 3 and set(o) <= _DIGITS and (o == "0" or o[0] != "0") and int(o) <= 255
        for o in octets
    )


def format_size(size: int) -> str:
    """Format bytes with the largest exact binary suffix (``536870912`` → ``512M``)."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


# -- helpers -------------------------------------------------------------------------------------

if TYPE_CHECKING:
    _F = TypeVar("_F", bound=Frozen)


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


def _as_dict(value: Frozen) -> dict[str, Any]:
    """One section's JSON object: its fields by name, enums by their value."""
    return {
        name: item.value if isinstance(item, Enum) else item
        for name, item in zip(value._field_names, value._values(), strict=True)
    }


def _build(cls: type[_F], name: str, raw: object) -> _F:
    data = _expect_object(name, raw)
    _refuse_unknown(name, data, set(cls._field_names))
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


class CpusConfig(Frozen):
    """vCPUs: how many boot (``boot_vcpus``); ``max_vcpus`` is accepted for API compatibility."""

    __slots__ = ("boot_vcpus", "max_vcpus")

    boot_vcpus: int
    max_vcpus: int | None

    def __init__(self, boot_vcpus: int = 1, max_vcpus: int | None = None) -> None:
        object.__setattr__(self, "boot_vcpus", boot_vcpus)
        object.__setattr__(self, "max_vcpus", max_vcpus)
        self._check()

    def _check(self) -> None:
        _check_int("cpus.boot_vcpus", self.boot_vcpus, 1, MAX_VCPUS_LIMIT)
        if self.max_vcpus is not None:
            _check_int("cpus.max_vcpus", self.max_vcpus, self.boot_vcpus, MAX_VCPUS_LIMIT)


class MemoryConfig(Frozen):
    """Guest RAM: ``size`` in bytes; ``shared`` backs it with a memfd (needed by vhost-user);
    ``thp`` (on by default) aligns private RAM to 2 MiB on the host and asks for transparent
    huge pages, so that KVM can map the guest with 2 MiB pages where the host has them.
    """

    __slots__ = ("shared", "size", "thp")

    size: int
    shared: bool
    thp: bool

    def __init__(self, size: int = 512 << 20, shared: bool = False, thp: bool = True) -> None:
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "shared", shared)
        object.__setattr__(self, "thp", thp)
        self._check()

    def _check(self) -> None:
        _check_int("memory.size", self.size, MIN_MEMORY_SIZE, 1 << 46)
        if self.size % 4096:
            raise ConfigError(f"memory.size {self.size} is not a multiple of the 4 KiB page size")
        _check_bool("memory.shared", self.shared)
        _check_bool("memory.thp", self.thp)


class PayloadConfig(Frozen):
    """What to boot: a kernel (ELF vmlinux or bzImage), an optional initramfs and command line."""

    __slots__ = ("cmdline", "initramfs", "kernel")

    kernel: str
    initramfs: str | None
    cmdline: str

    def __init__(self, kernel: str, initramfs: str | None = None, cmdline: str = "") -> None:
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "initramfs", initramfs)
        object.__setattr__(self, "cmdline", cmdline)
        self._check()

    def _check(self) -> None:
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


class DiskConfig(Frozen):
    """A virtio-blk disk backed by a raw image file or a block device."""

    __slots__ = ("direct", "id", "path", "readonly", "serial")

    path: str
    readonly: bool
    direct: bool
    id: str | None
    serial: str | None

    def __init__(
        self,
        path: str,
        readonly: bool = False,
        direct: bool = False,
        id: str | None = None,
        serial: str | None = None,
    ) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "readonly", readonly)
        object.__setattr__(self, "direct", direct)
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "serial", serial)
        self._check()

    def _check(self) -> None:
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


class NetConfig(Frozen):
    """A virtio-net device backed by a host tap device."""

    __slots__ = ("host_mac", "id", "ip", "mac", "mask", "mtu", "num_queues", "tap")

    tap: str | None
    ip: str | None
    mask: str | None
    mac: str | None
    host_mac: str | None
    mtu: int | None
    num_queues: int
    id: str | None

    def __init__(
        self,
        tap: str | None = None,
        ip: str | None = None,
        mask: str | None = None,
        mac: str | None = None,
        host_mac: str | None = None,
        mtu: int | None = None,
        num_queues: int = 2,
        id: str | None = None,
    ) -> None:
        object.__setattr__(self, "tap", tap)
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "mac", mac)
        object.__setattr__(self, "host_mac", host_mac)
        object.__setattr__(self, "mtu", mtu)
        object.__setattr__(self, "num_queues", num_queues)
        object.__setattr__(self, "id", id)
        self._check()

    def _check(self) -> None:
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
                if not _is_ipv4(value):
                    raise ConfigError(f"net.{name} {value!r} is not an IPv4 address")
        for name in ("mac", "host_mac"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not _is_mac(value)):
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


class RngConfig(Frozen):
    """virtio-rng's entropy source."""

    __slots__ = ("src",)

    src: str

    def __init__(self, src: str = "/dev/urandom") -> None:
        object.__setattr__(self, "src", src)
        self._check()

    def _check(self) -> None:
        _check_str("rng.src", self.src, allow_empty=False)


class ConsoleConfig(Frozen):
    """A console (the serial port or virtio-console): its mode and, for File, the path."""

    __slots__ = ("file", "mode")

    mode: ConsoleMode
    file: str | None

    def __init__(self, mode: ConsoleMode = ConsoleMode.NULL, file: str | None = None) -> None:
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "file", file)
        self._check()

    def _check(self) -> None:
        if not isinstance(self.mode, ConsoleMode):
            raise ConfigError(f"console mode {self.mode!r} is not one of Off, Null, Tty, File")
        if self.mode is ConsoleMode.FILE and not self.file:
            raise ConfigError("console mode File needs a file path")
        if self.file is not None:
            _check_str("console file", self.file, allow_empty=False)


_DEFAULT_CPUS = CpusConfig()
_DEFAULT_MEMORY = MemoryConfig()
_DEFAULT_RNG = RngConfig()
_DEFAULT_SERIAL = ConsoleConfig(ConsoleMode.TTY)
_DEFAULT_CONSOLE = ConsoleConfig(ConsoleMode.OFF)


class VmConfig(Frozen):
    """Everything needed to build and boot one VM.

    Defaults differ from cloud-hypervisor's in one place: the serial port goes to the terminal
    and virtio-console is off, because nubis boots kernels with ``console=ttyS0`` by default.
    """

    __slots__ = ("console", "cpus", "disks", "memory", "net", "payload", "rng", "serial")

    payload: PayloadConfig
    cpus: CpusConfig
    memory: MemoryConfig
    disks: tuple[DiskConfig, ...]
    net: tuple[NetConfig, ...]
    rng: RngConfig | None
    serial: ConsoleConfig
    console: ConsoleConfig

    def __init__(
        self,
        payload: PayloadConfig,
        cpus: CpusConfig = _DEFAULT_CPUS,
        memory: MemoryConfig = _DEFAULT_MEMORY,
        disks: tuple[DiskConfig, ...] = (),
        net: tuple[NetConfig, ...] = (),
        rng: RngConfig | None = _DEFAULT_RNG,
        serial: ConsoleConfig = _DEFAULT_SERIAL,
        console: ConsoleConfig = _DEFAULT_CONSOLE,
    ) -> None:
        object.__setattr__(self, "payload", payload)
        object.__setattr__(self, "cpus", cpus)
        object.__setattr__(self, "memory", memory)
        object.__setattr__(self, "disks", disks)
        object.__setattr__(self, "net", net)
        object.__setattr__(self, "rng", rng)
        object.__setattr__(self, "serial", serial)
        object.__setattr__(self, "console", console)
        self._check()

    def _check(self) -> None:
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
        return {
            "payload": _as_dict(self.payload),
            "cpus": _as_dict(self.cpus),
            "memory": _as_dict(self.memory),
            "disks": [_as_dict(disk) for disk in self.disks],
            "net": [_as_dict(net) for net in self.net],
            "rng": None if self.rng is None else _as_dict(self.rng),
            "serial": _as_dict(self.serial),
            "console": _as_dict(self.console),
        }

    @classmethod
    def from_dict(cls, raw: object) -> VmConfig:
        """Build a configuration from JSON-decoded data; unknown fields and wrong types are refused."""
        data = _expect_object("VmConfig", raw)
        _refuse_unknown("VmConfig", data, set(cls._field_names))
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
