"""The lazily re-exported public names of nubis.arch.x86_64."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_package_exports_resolve_lazily() -> None:
    import nubis.arch.x86_64 as arch

    for name in arch.__all__:
        assert getattr(arch, name) is not None
    with pytest.raises(AttributeError):
        _ = arch.no_such_name  # type: ignore[attr-defined]


def test_layout_import_stays_light() -> None:
    code = (
        "import sys, nubis.arch.x86_64.layout; "
        "print(any(m.startswith('nubis.kvm') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
