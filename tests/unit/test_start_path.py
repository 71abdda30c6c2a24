"""What the ``nubis`` start path imports, and the cheap stand-ins that keep it small."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from nubis import _log, _typing
from nubis.cli import _parse_simple, build_parser


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    script = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    return set(out.split())


def test_booting_a_plain_vm_imports_no_heavy_module() -> None:
    loaded = _modules_after("import nubis.cli, nubis.vmm.runner, nubis.vmm.machine")
    heavy = {"argparse", "logging", "typing", "re", "json", "dataclasses", "nubis.api.server"}
    heavy |= {"enum", "signal", "contextlib"}
    assert loaded & heavy == set()
    # Device models and loaders the VM does not use stay unimported too.
    unused = {"nubis.virtio.block", "nubis.virtio.rng", "nubis.virtio.net", "nubis.loader.bzimage"}
    unused |= {"nubis.virtio.pci", "nubis.virtio.queue", "nubis.pci.msix", "nubis.vmm.interrupts"}
    assert loaded & unused == set()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        [
            "--kernel",
            "k",
            "--memory",
            "size=128M",
            "--no-reboot",
            "--serial",
            "tty",
            "--rng",
            "off",
        ],
        ["--kernel", "k", "--kernel", "j", "-v", "--verbose", "--cmdline", "console=ttyS0 quiet"],
        ["--disk", "path=a", "path=b", "--disk", "path=c", "--net", "tap=t0", "--cpus", "boot=2"],
        ["--api-socket", "/tmp/s", "--event-monitor", "path=/tmp/e", "--log-file", "/tmp/l"],
        ["--console", "tty", "--serial", "off", "--initramfs", "i", "--cmdline", ""],
    ],
)
def test_the_fast_parser_agrees_with_argparse(argv: list[str]) -> None:
    simple = _parse_simple(argv)
    assert simple is not None
    assert simple == vars(build_parser().parse_args(argv))


@pytest.mark.parametrize(
    "argv",
    [
        ["--mem", "size=1G"],  # an abbreviation
        ["--kernel=k"],
        ["--kernel"],
        ["--cmdline", "-x"],
        ["--disk"],
        ["-vv"],
        ["--help"],
        ["-V"],
        ["stray"],
        ["--kernel", "k", "stray"],
    ],
)
def test_the_fast_parser_leaves_everything_else_to_argparse(argv: list[str]) -> None:
    assert _parse_simple(argv) is None


def test_a_lazy_logger_imports_logging_only_for_a_record_that_is_due() -> None:
    code = (
        "from nubis import _log\n"
        "import sys\n"
        "log = _log.getLogger('nubis.test')\n"
        "log.debug('dropped %d', 1)\n"
        "log.info('dropped too')\n"
        "assert 'logging' not in sys.modules\n"
        "log.warning('shown %s', 'here')\n"
        "assert 'logging' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "shown here\n"


def test_a_lazy_logger_goes_to_the_real_logger_once_logging_is_imported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = _log.getLogger("nubis.test_start_path")
    with caplog.at_level(_log.DEBUG, logger="nubis.test_start_path"):
        assert log.isEnabledFor(_log.DEBUG)
        log.debug("value %d", 7)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("nubis.test_start_path", _log.DEBUG, "value 7")
    ]
    assert (
        caplog.records[0].funcName
        == "test_a_lazy_logger_goes_to_the_real_logger_once_logging_is_imported"
    )


def test_the_run_time_named_tuple_behaves_like_typings() -> None:
    class Spec(typing.NamedTuple):
        base: int
        size: int = 4

        def end(self) -> int:
            return self.base + self.size

    class Cheap(_typing.NamedTuple):
        base: int
        size: int = 4

        def end(self) -> int:
            return self.base + self.size

    for cls in (Spec, Cheap):
        value = cls(16)
        assert tuple(value) == (16, 4)
        assert value.end() == 20
        assert cls._fields == ("base", "size")
        assert value._replace(size=8) == (16, 8)
        assert isinstance(value, tuple)
        assert repr(value) == f"{cls.__name__}(base=16, size=4)"


def test_the_run_time_new_type_is_the_identity() -> None:
    address = _typing.NewType("Address", int)
    assert address(5) == 5
    assert address.__name__ == "Address"
