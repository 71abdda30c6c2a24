"""The testbed command line passes L1's size on to the session and reports the command's status."""

from __future__ import annotations

import io
from typing import Any

import pytest

from nubis.testbed import __main__ as cli
from nubis.testbed.session import DEFAULT_CPUS, DEFAULT_MEMORY_MIB, CommandResult


class FakeSession:
    """Runs nothing, returning exit status 7."""

    def __init__(self) -> None:
        self.mode = "direct"
        self.description = "fake"

    def __enter__(self) -> FakeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, cmd: list[str], timeout: float, stream: io.TextIOBase) -> CommandResult:
        assert cmd == ["true"] and timeout == 5.0
        return CommandResult(argv=tuple(cmd), returncode=7, output="", duration=0.0)


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of each session the command line makes."""
    made: list[dict[str, Any]] = []

    def make(**kwargs: Any) -> FakeSession:
        made.append(kwargs)
        return FakeSession()

    monkeypatch.setattr(cli, "TestbedSession", make)
    return made


def test_l1_size_defaults_to_the_session_defaults(made: list[dict[str, Any]]) -> None:
    assert cli.main(["run", "-q", "--timeout", "5", "--", "true"]) == 7
    assert len(made) == 1
    assert "cpus" not in made[0] and "memory_mib" not in made[0]
    assert DEFAULT_CPUS == 1 and DEFAULT_MEMORY_MIB > 0


def test_cpus_and_memory_reach_the_session(made: list[dict[str, Any]]) -> None:
    argv = ["run", "-q", "--cpus", "2", "--memory", "4096", "--timeout", "5", "--", "true"]
    assert cli.main(argv) == 7
    assert made[0]["cpus"] == 2 and made[0]["memory_mib"] == 4096
