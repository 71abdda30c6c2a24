"""nubis._bundle: modules served from one compiled file, and never stale code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nubis import _bundle

SRC = str(Path(_bundle.__file__).resolve().parents[1])


def _make_package(root: Path) -> Path:
    package = root / "bpkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("NAME = 'top'\n")
    (package / "alpha.py").write_text(
        "VALUE = 1\n\ndef fail():\n    raise ValueError('from alpha')\n"
    )
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "beta.py").write_text("from bpkg.alpha import VALUE\nDOUBLE = 2 * VALUE\n")
    (package / "sub" / "data.txt").write_text("resource\n")
    return package


def _run(root: Path, code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter with the bundle of ``root/bpkg`` installed."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(root)!r}, {SRC!r}]
        from nubis import _bundle
        finder = _bundle.install({str(root / "bpkg")!r})
        """
    ) + textwrap.dedent(code)
    environment = {k: v for k, v in os.environ.items() if k != "NUBIS_NO_BUNDLE"} | env
    return subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, env=environment
    ).stdout


def _served(root: Path, module: str, **env: str) -> str:
    return _run(
        root,
        f"""
        import {module} as m
        print(type(m.__spec__.loader).__name__, m.__file__)
        """,
        **env,
    ).strip()


def test_a_built_bundle_serves_every_module_with_its_file_and_resources(tmp_path: Path) -> None:
    package = _make_package(tmp_path)
    path = _bundle.build(str(package), "bpkg")
    assert path == _bundle.bundle_path(str(package))
    out = _run(
        tmp_path,
        """
        import traceback
        from importlib import resources
        import bpkg, bpkg.alpha, bpkg.sub.beta
        for m in (bpkg, bpkg.alpha, bpkg.sub, bpkg.sub.beta):
            print(m.__name__, type(m.__spec__.loader).__name__, m.__file__)
        print("double", bpkg.sub.beta.DOUBLE)
        print("resource", resources.files("bpkg.sub").joinpath("data.txt").read_text().strip())
        try:
            bpkg.alpha.fail()
        except ValueError:
            print("source line:", traceback.format_exc().splitlines()[-2].strip())
        """,
    )
    lines = out.splitlines()
    assert lines[0] == f"bpkg _BundledLoader {package / '__init__.py'}"
    assert lines[1] == f"bpkg.alpha _BundledLoader {package / 'alpha.py'}"
    assert lines[2] == f"bpkg.sub _BundledLoader {package / 'sub' / '__init__.py'}"
    assert lines[3] == f"bpkg.sub.beta _BundledLoader {package / 'sub' / 'beta.py'}"
    assert "double 2" in lines
    assert "resource resource" in lines
    assert "source line: raise ValueError('from alpha')" in lines


def test_an_edited_module_is_imported_from_its_source(tmp_path: Path) -> None:
    package = _make_package(tmp_path)
    _bundle.build(str(package), "bpkg")
    alpha = package / "alpha.py"
    alpha.write_text("VALUE = 21\n")
    out = _run(tmp_path, "import bpkg.alpha, bpkg.sub.beta\nprint(bpkg.sub.beta.DOUBLE)")
    assert out.strip() == "42"
    assert _served(tmp_path, "bpkg.alpha").startswith("SourceFileLoader ")
    assert _served(tmp_path, "bpkg.sub.beta").startswith("_BundledLoader ")


def test_a_touched_module_with_the_same_size_is_not_served_stale(tmp_path: Path) -> None:
    package = _make_package(tmp_path)
    _bundle.build(str(package), "bpkg")
    alpha = package / "alpha.py"
    text = alpha.read_text()
    alpha.write_text(text.replace("VALUE = 1", "VALUE = 7"))
    stamp = os.stat(alpha).st_mtime_ns + 1_000_000
    os.utime(alpha, ns=(stamp, stamp))
    assert _run(tmp_path, "import bpkg.alpha\nprint(bpkg.alpha.VALUE)").strip() == "7"


def test_a_deleted_module_is_not_served(tmp_path: Path) -> None:
    package = _make_package(tmp_path)
    _bundle.build(str(package), "bpkg")
    (package / "alpha.py").unlink()
    out = _run(
        tmp_path,
        """
        try:
            import bpkg.alpha
        except ImportError:
            print("gone")
        """,
    )
    assert out.strip() == "gone"


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: data[:40],
        lambda data: b"nubis-bundle-0\n" + data[15:],
        lambda data: data[:15] + b"\x00\x00\r\n" + data[19:],
        lambda data: data[: len(data) // 2],
    ],
    ids=["empty", "truncated-header", "other-format", "other-python", "truncated"],
)
def test_an_unusable_bundle_is_ignored(tmp_path: Path, damage: object) -> None:
    package = _make_package(tmp_path)
    path = Path(_bundle.build(str(package), "bpkg"))
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    assert _bundle.load(str(package)) is None
    assert _served(tmp_path, "bpkg.alpha").startswith("SourceFileLoader ")


def test_the_environment_can_turn_the_bundle_off(tmp_path: Path) -> None:
    package = _make_package(tmp_path)
    _bundle.build(str(package), "bpkg")
    assert _served(tmp_path, "bpkg.alpha").startswith("_BundledLoader ")
    assert _served(tmp_path, "bpkg.alpha", NUBIS_NO_BUNDLE="1").startswith("SourceFileLoader ")


def test_no_bundle_means_a_normal_import(tmp_path: Path) -> None:
    _make_package(tmp_path)
    assert _served(tmp_path, "bpkg.sub.beta").startswith("SourceFileLoader ")
