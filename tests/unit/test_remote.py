"""``nubis-remote`` against a real server on a Unix socket: output, errors and exit statuses."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubis.api.remote import COMMANDS, EXIT_BAD_INPUT, EXIT_OK, EXIT_REFUSED, main
from nubis.api.server import ROUTES, ApiServer
from nubis.api.testing import FakeVmm
from nubis.vmm.lifecycle import VmState

CONFIG = {"payload": {"kernel": "/boot/vmlinux"}, "memory": {"size": 268435456}}


@pytest.fixture
def socket_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="nubis-remote-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vmm() -> FakeVmm:
    return FakeVmm()


@pytest.fixture
def server(socket_dir: str, vmm: FakeVmm) -> Iterator[ApiServer]:
    with ApiServer(os.path.join(socket_dir, "api.sock"), vmm) as api:
        yield api


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], server_path: str, *args: str) -> tuple[int, str, str]:
    status = main(["--api-socket", server_path, *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_every_endpoint_has_a_command() -> None:
    assert {(m, "/" + e) for m, e in COMMANDS.values()} == {(r.method, r.path) for r in ROUTES}


def test_ping_prints_json(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, server.path, "ping")
    assert status == EXIT_OK and err == ""
    assert json.loads(out)["pid"] == os.getpid()


def test_path_equals_form_is_accepted(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, f"path={server.path}", "ping")[0] == EXIT_OK


def test_lifecycle_through_the_command_line(
    server: ApiServer, vmm: FakeVmm, config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, server.path, "create", config_file) == (EXIT_OK, "", "")
    assert run(capsys, server.path, "boot") == (EXIT_OK, "", "")
    status, out, _ = run(capsys, server.path, "info")
    assert status == EXIT_OK
    assert json.loads(out)["state"] == "Running"
    for command in ("pause", "resume", "reboot", "power-button", "shutdown"):
        assert run(capsys, server.path, command) == (EXIT_OK, "", ""), command
    assert vmm.state is VmState.SHUTDOWN
    status, out, _ = run(capsys, server.path, "counters")
    assert (status, json.loads(out)) == (EXIT_OK, {})
    assert run(capsys, server.path, "delete") == (EXIT_OK, "", "")
    assert run(capsys, server.path, "shutdown-vmm") == (EXIT_OK, "", "")
    assert vmm.vmm_shutdown.is_set()


def test_create_from_stdin(
    server: ApiServer,
    vmm: FakeVmm,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(CONFIG)))
    assert run(capsys, server.path, "create", "-")[0] == EXIT_OK
    assert vmm.state is VmState.CREATED


def test_a_state_conflict_is_one_line_on_stderr(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, server.path, "pause")
    assert status == EXIT_REFUSED
    assert out == ""
    assert err == "nubis-remote: error: cannot pause the VM: no VM has been created\n"


def test_an_invalid_config_is_bad_input(
    server: ApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"payload": {"kernel": "k"}, "cpus": {"boot_vcpus": 0}}))
    status, _, err = run(capsys, server.path, "create", str(path))
    assert status == EXIT_BAD_INPUT
    assert err == "nubis-remote: error: cpus.boot_vcpus is 0; it must be between 1 and 254\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), ("{not json", "is not valid JSON"), (b"\xff", "not UTF-8")],
)
def test_an_unusable_file_is_bad_input(
    server: ApiServer,
    vmm: FakeVmm,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | bytes | None,
    message: str,
) -> None:
    path = tmp_path / "vm.json"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    status, _, err = run(capsys, server.path, "create", str(path))
    assert status == EXIT_BAD_INPUT
    assert message in err and err.count("\n") == 1
    assert vmm.calls == []


def test_a_missing_socket_is_a_clear_error(
    socket_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(socket_dir, "none.sock")
    status, _, err = run(capsys, path, "ping")
    assert status == EXIT_REFUSED
    assert err == f"nubis-remote: error: the API socket {path} does not exist\n"


def test_nobody_listening_is_a_clear_error(
    socket_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(socket_dir, "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)
    status, _, err = run(capsys, path, "ping")
    assert status == EXIT_REFUSED
    assert err == f"nubis-remote: error: nothing is listening on the API socket {path}\n"


def test_a_server_that_hangs_up_is_a_clear_error(
    socket_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(socket_dir, "rude.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as rude:
        rude.bind(path)
        rude.listen(1)

        def hang_up() -> None:
            conn, _ = rude.accept()
            conn.recv(65536)
            conn.close()

        thread = threading.Thread(target=hang_up)
        thread.start()
        status, _, err = run(capsys, path, "ping")
        thread.join()
    assert status == EXIT_REFUSED
    assert err.startswith("nubis-remote: error: the API on ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["ping"],
        ["--api-socket", "x"],
        ["--api-socket", "x", "frob"],
        ["--api-socket", "x", "create"],
    ],
)
def test_usage_errors_are_bad_input(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("nubis-remote: error: ") and err.count("\n") == 1
