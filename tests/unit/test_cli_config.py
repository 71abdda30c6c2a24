"""The command line and the config model: parsing, validation and one-sentence errors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nubis.cli import (
    EXIT_BAD_INPUT,
    UsageError,
    main,
    parse_args,
    parse_console,
    parse_disk,
    parse_memory,
    parse_net,
    split_options,
)
from nubis.vmm.config import (
    MAX_CMDLINE_SIZE,
    ConfigError,
    ConsoleMode,
    VmConfig,
    format_size,
    parse_size,
)


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(60))
    return path


def test_split_options_handles_quotes_and_empty_items() -> None:
    assert split_options('a=1,b="x,y",,c=', "--x") == {"a": "1", "b": "x,y", "c": ""}


@pytest.mark.parametrize("text", ["a", "a=1,a=2", 'a="x'])
def test_split_options_refuses_malformed(text: str) -> None:
    with pytest.raises(UsageError):
        split_options(text, "--x")


def test_parse_args_builds_the_config(kernel: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    config, options = parse_args(
        [
            "--kernel",
            str(kernel),
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "boot=2",
            "--memory",
            "size=1G",
            "--disk",
            f"path={disk},readonly=on,id=d0",
            f"path={disk},serial=abc",
            "--serial",
            "file=/tmp/s.log",
            "--no-reboot",
            "-vv",
        ]
    )
    assert config is not None
    assert config.cpus.boot_vcpus == 2
    assert config.memory.size == 1 << 30
    assert config.memory.thp and not config.memory.shared
    assert config.payload.cmdline == "console=ttyS0 quiet"
    assert [d.readonly for d in config.disks] == [True, False]
    assert config.disks[0].id == "d0" and config.disks[1].serial == "abc"
    assert config.serial.mode is ConsoleMode.FILE and config.serial.file == "/tmp/s.log"
    assert options.no_reboot and options.verbosity == 2


def test_json_round_trip(kernel: Path) -> None:
    config, _ = parse_args(
        ["--kernel", str(kernel), "--cpus", "boot=3", "--net", "tap=t0,mac=02:00:00:00:00:01"]
    )
    assert config is not None
    encoded = json.loads(json.dumps(config.to_dict()))
    assert VmConfig.from_dict(encoded) == config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "payload is required"),
        ({"payload": {"kernel": "k"}, "bogus": 1}, "unknown field 'bogus'"),
        ({"payload": {"kernel": "k"}, "cpus": {"boot_vcpus": 0}}, "cpus.boot_vcpus is 0"),
        ({"payload": {"kernel": "k"}, "cpus": {"boot_vcpus": "2"}}, "must be an integer"),
        ({"payload": {"kernel": "k"}, "memory": {"size": 1 << 20}}, "memory.size"),
        ({"payload": {"kernel": "k"}, "memory": {"thp": "yes"}}, "memory.thp"),
        ({"payload": {"kernel": "k", "cmdline": "x" * MAX_CMDLINE_SIZE}}, "the limit is"),
        ({"payload": {"kernel": "k"}, "serial": {"mode": "Pty"}}, "not one of"),
        (
            {"payload": {"kernel": "k"}, "net": [{"tap": "a-very-long-tap-name"}]},
            "longer than the 15 bytes",
        ),
        ({"payload": {"kernel": "k"}, "net": [{"mac": "zz:00:00:00:00:00"}]}, "not a MAC address"),
        ({"payload": {"kernel": "k"}, "disks": {}}, "must be a JSON array"),
        (
            {"payload": {"kernel": "k"}, "serial": {"mode": "Tty"}, "console": {"mode": "Tty"}},
            "only one of",
        ),
        ([], "must be a JSON object"),
    ],
)
def test_from_dict_refuses_bad_input_with_one_sentence(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as excinfo:
        VmConfig.from_dict(raw)
    assert "\n" not in str(excinfo.value)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=12,
    )
)
def test_from_dict_never_raises_anything_but_config_error(raw: object) -> None:
    for candidate in (
        raw,
        {"payload": raw},
        {"payload": {"kernel": "k"}, "cpus": raw, "disks": raw},
    ):
        with contextlib.suppress(ConfigError):
            VmConfig.from_dict(candidate)


@pytest.mark.parametrize(
    ("text", "size"), [("512M", 512 << 20), ("1g", 1 << 30), ("4096", 4096), ("2T", 2 << 40)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text, "x") == size
    assert parse_size(format_size(size), "x") == size


def test_console_and_device_options() -> None:
    assert parse_console("OFF", "--serial").mode is ConsoleMode.OFF
    with pytest.raises(UsageError, match="not one of"):
        parse_console("pty", "--serial")
    with pytest.raises(UsageError, match="needs path"):
        parse_disk("readonly=on")
    with pytest.raises(UsageError, match="no parameter 'bogus'"):
        parse_disk("path=x,bogus=1")
    assert not parse_memory("size=64M,thp=off").thp
    with pytest.raises(UsageError, match="must be on or off"):
        parse_memory("thp=2M")
    with pytest.raises(UsageError, match="must be on or off"):
        parse_disk("path=x,readonly=maybe")
    assert parse_net("tap=,ip=192.168.249.1,mask=255.255.255.0").tap is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kernel", "/nonexistent/vmlinux"], "does not exist"),
        (["--kernel", "{kernel}", "--cpus", "boot=0"], "cpus.boot_vcpus is 0"),
        (["--kernel", "{kernel}", "--cpus", "boot=255"], "cpus.boot_vcpus is 255"),
        (["--kernel", "{kernel}", "--memory", "size=1M"], "memory.size"),
        (["--kernel", "{kernel}", "--memory", "size=64T"], "memory.size"),
        (["--kernel", "{kernel}", "--memory", "size=lots"], "is not a size"),
        (["--kernel", "{kernel}", "--cmdline", "x" * 5000], "the limit is"),
        (["--kernel", "{kernel}", "--initramfs", "/nonexistent/initrd"], "does not exist"),
        (["--kernel", "{kernel}", "--bogus"], "unrecognized arguments"),
        ([], "give --kernel"),
    ],
)
def test_main_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, kernel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([a.replace("{kernel}", str(kernel)) for a in argv])
    err = capsys.readouterr().err
    assert status == EXIT_BAD_INPUT
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_kernel_directory_and_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--kernel", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "raw",
    [
        {"payload": {"kernel": "k"}, "net": [{"mac": "12:34:56:78:9a:bc\n"}]},
        {"payload": {"kernel": "k", "cmdline": "\ud800"}},
        {"payload": {"kernel": "k"}, "disks": [{"path": "d", "serial": "\udcff"}]},
    ],
)
def test_trailing_newlines_and_lone_surrogates_are_config_errors(raw: object) -> None:
    with pytest.raises(ConfigError):
        VmConfig.from_dict(raw)
