"""Unit tests for nubis.image's build logic: module order, apt records, cache keys, cmdline, markers."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from nubis.image import PackageNotFoundError, guest_cmdline, parse_markers
from nubis.image.cache import Cache, content_key
from nubis.image.debian import Apt, parse_dependency_names, parse_records
from nubis.image.errors import ImageError, MissingToolError
from nubis.image.modules import load_order, module_name, parse_modules_dep
from nubis.image.tools import require_tool

MODULES_DEP = """\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/acpi/button.ko:
"""


def test_module_names_are_canonical() -> None:
    assert module_name("kernel/arch/x86/kvm/kvm-amd.ko") == "kvm_amd"
    assert module_name("virtio_blk.ko.xz") == "virtio_blk"


def test_load_order_puts_dependencies_first_whatever_the_requested_order() -> None:
    table = parse_modules_dep(MODULES_DEP)
    order = load_order(table, ["virtio_net", "virtio-rng", "failover"])
    names = [module_name(p) for p in order]
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")
    assert names.index("virtio") < names.index("virtio_net")
    assert names.index("virtio_ring") < names.index("virtio_rng")
    assert len(names) == len(set(names)) == 6


def test_builtin_and_optional_modules_are_skipped_unknown_ones_are_errors() -> None:
    table = parse_modules_dep(MODULES_DEP)
    assert load_order(table, ["ext4"], builtin=["kernel/fs/ext4/ext4.ko"]) == []
    assert load_order(table, ["nosuch"], optional=["nosuch"]) == []
    with pytest.raises(ImageError, match="no module named 'nosuch'"):
        load_order(table, ["nosuch"])


def test_apt_records_and_dependencies_parse() -> None:
    text = "Package: fio\nVersion: 3.33-3\nDepends: libaio1 (>= 0.3.93), libc6 | libc6.1, python3:any\n\nPackage: b\n"
    records = parse_records(text)
    assert records[0]["Version"] == "3.33-3"
    assert parse_dependency_names(records[0]["Depends"]) == ["libaio1", "libc6", "python3"]
    assert records[1] == {"Package": "b"}


def test_a_missing_debian_package_is_a_clear_error(tmp_path: Path) -> None:
    require_tool("apt-cache")
    apt = Apt(Cache(tmp_path))
    with pytest.raises(PackageNotFoundError, match="'nubis-no-such-package-xyz' is not in apt"):
        apt.resolve(["nubis-no-such-package-xyz"])


def test_a_missing_host_tool_names_its_debian_package() -> None:
    with pytest.raises(MissingToolError, match="install the Debian package 'nubis-tool'"):
        require_tool("nubis-tool")


def test_content_keys_depend_on_every_input() -> None:
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_cache_publishes_only_complete_builds(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    with pytest.raises(RuntimeError), cache.building("kind", "k1"):
        pass
    assert cache.load("kind", "k1") is None
    with cache.building("kind", "k1") as out:
        (out / "manifest.json").write_text('{"x": 1}')
    assert cache.load("kind", "k1") == {"x": 1}
    assert not list((tmp_path / "kind").glob(".build-*"))


def test_cmdline_encodes_the_command_safely() -> None:
    command = "echo 'a b' && exit $((1+2)) # = *"
    cmdline = guest_cmdline(command, console="hvc0", end="exit")
    words = cmdline.split()
    assert words[:3] == ["console=hvc0", "panic=-1", "quiet"]
    encoded = next(w for w in words if w.startswith("nubis.cmd="))
    assert base64.b64decode(encoded.removeprefix("nubis.cmd=")).decode() == command
    assert "nubis.end=exit" in words
    with pytest.raises(ValueError, match="over the kernel's limit"):
        guest_cmdline("x" * 2000)
    with pytest.raises(ValueError, match="not one of"):
        guest_cmdline("true", end="reboot")


def test_markers_are_parsed_from_a_noisy_console() -> None:
    log = (
        "[    3.9] Run /init as init process\r\nNUBIS-USERSPACE\r\n"
        "[    4.4] NET: Registered PF_VSOCK protocol family\n"
        "NUBIS-MODULE-FAILED=kernel/x.ko\nNUBIS-MODULES-LOADED=14\nhello\n"
        "[    4.5] noise NUBIS-EXIT-STATUS=7\nNUBIS-POWEROFF\n[    4.6] reboot: Power down\n"
    )
    markers = parse_markers(log)
    assert markers.userspace and markers.poweroff
    assert markers.exit_status == 7
    assert markers.modules_loaded == 14
    assert markers.module_failures == ("kernel/x.ko",)
    assert markers.ending == "NUBIS-POWEROFF"
    assert parse_markers(b"nothing here").userspace is False
