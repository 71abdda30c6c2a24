"""Unit tests for nubis.testbed: host classification, job scripts, and the direct backend."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from nubis.testbed import CommandTimeoutError, HostKind, TestbedSession, detect_host
from nubis.testbed.session import command_script


def fake_host(tmp_path: Path, flags: str, pvm: bool = False, kvm: bool = True) -> HostKind:
    tmp_path.mkdir(parents=True)
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu {flags} sse2\n")
    (tmp_path / "module").mkdir()
    if pvm:
        (tmp_path / "module" / "kvm_pvm").mkdir()
    dev = tmp_path / "kvm"
    if kvm:
        dev.write_text("")
    return detect_host(tmp_path / "cpuinfo", tmp_path / "module", dev).kind


def test_host_classification(tmp_path: Path) -> None:
    assert fake_host(tmp_path / "a", "svm") is HostKind.NATIVE
    assert fake_host(tmp_path / "b", "vmx") is HostKind.NATIVE
    assert fake_host(tmp_path / "c", "svm", pvm=True) is HostKind.PVM
    assert fake_host(tmp_path / "d", "") is HostKind.NONE
    assert fake_host(tmp_path / "e", "vmx", kvm=False) is HostKind.NONE


def test_job_script_quotes_every_word() -> None:
    argv = ["printf", "%s|", "a b", "$HOME", "it's"]
    script = command_script(argv, "/work dir", {"X": "1 2"})
    out = subprocess.run(
        ["sh", "-c", script.replace("cd '/work dir' || exit 125", "cd /")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out == "a b|$HOME|it's|"
    assert "export X='1 2'" in script
    with pytest.raises(ValueError, match="not valid"):
        command_script(["true"], "/", {"BAD-NAME": "1"})


def test_direct_session_runs_streams_and_kills_at_timeout(tmp_path: Path) -> None:
    session = TestbedSession(mode="direct", cache_dir=tmp_path / "cache", workdir=tmp_path)
    assert "directly" in session.description
    with session:
        stream = io.StringIO()
        result = session.run(["sh", "-c", "echo out; echo err >&2; exit 4"], 30, stream=stream)
        assert (result.returncode, result.output) == (4, "out\nerr\n")
        assert stream.getvalue() == "out\nerr\n"
        with pytest.raises(CommandTimeoutError, match=r"did not finish within 0\.5 s") as caught:
            session.run(["sh", "-c", "echo begun; sleep 30 & wait"], 0.5)
        assert caught.value.output == "begun\n"
        with pytest.raises(ValueError, match="empty"):
            session.run([], 1)
