"""The REST API server, over real HTTP on a real Unix socket, against a fake VMM."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from nubis.api.remote import UnixHTTPConnection
from nubis.api.server import ROUTES, ApiServer, ApiServerError
from nubis.api.testing import FakeVmm
from nubis.vmm.config import VmConfig
from nubis.vmm.lifecycle import VmState

CONFIG: dict[str, Any] = {
    "payload": {"kernel": "/boot/vmlinux", "cmdline": "console=ttyS0"},
    "cpus": {"boot_vcpus": 2},
    "memory": {"size": 256 << 20},
    "disks": [{"path": "/var/lib/disk.img", "id": "root"}],
}


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Short paths: sun_path holds 108 bytes, and pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="nubis-api-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vmm() -> FakeVmm:
    return FakeVmm()


@pytest.fixture
def server(socket_dir: str, vmm: FakeVmm) -> Iterator[ApiServer]:
    api = ApiServer(os.path.join(socket_dir, "api.sock"), vmm)
    api.start()
    yield api
    api.stop()


def request(
    server: ApiServer, method: str, endpoint: str, body: bytes | None = None
) -> tuple[int, Any, http.client.HTTPResponse]:
    conn = UnixHTTPConnection(server.path, timeout=10)
    try:
        conn.request(method, f"/api/v1/{endpoint}", body=body)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    return response.status, (json.loads(raw) if raw else None), response


def raw_exchange(server: ApiServer, data: bytes) -> bytes:
    """Send raw bytes, half-close, and read everything the server answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(server.path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def assert_error(status: int, body: Any, expected: int) -> None:
    assert status == expected
    assert isinstance(body, dict) and set(body) == {"error"}
    message = body["error"]
    assert isinstance(message, str) and message and "\n" not in message


def create_and_boot(server: ApiServer) -> None:
    assert request(server, "PUT", "vm.create", json.dumps(CONFIG).encode())[0] == 204
    assert request(server, "PUT", "vm.boot")[0] == 204


# -- endpoints and lifecycle ----------------------------------------------------------------------


def test_ping_answers_versions_and_pid(server: ApiServer) -> None:
    status, body, response = request(server, "GET", "vmm.ping")
    assert status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert body["pid"] == os.getpid()
    assert {"build_version", "version"} <= set(body)


def test_full_lifecycle(server: ApiServer, vmm: FakeVmm) -> None:
    create_and_boot(server)
    status, info, _ = request(server, "GET", "vm.info")
    assert status == 200
    assert info["state"] == "Running"
    assert info["memory_actual_size"] == 256 << 20
    assert VmConfig.from_dict(info["config"]) == VmConfig.from_dict(CONFIG)
    for endpoint, state in [
        ("vm.pause", VmState.PAUSED),
        ("vm.resume", VmState.RUNNING),
        ("vm.reboot", VmState.RUNNING),
        ("vm.power-button", VmState.RUNNING),
        ("vm.shutdown", VmState.SHUTDOWN),
        ("vm.boot", VmState.RUNNING),
    ]:
        status, body, _ = request(server, "PUT", endpoint)
        assert (status, body) == (204, None), endpoint
        assert vmm.state is state
    status, counters, _ = request(server, "GET", "vm.counters")
    assert status == 200 and counters == {"root": {"read_bytes": 0, "write_bytes": 0}}
    assert request(server, "PUT", "vm.delete")[0] == 204
    assert vmm.state is None


def test_204_answers_have_no_body_or_length(server: ApiServer) -> None:
    answer = raw_exchange(
        server, b"PUT /api/v1/vmm.shutdown HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert b"content-length" not in head.lower()
    assert rest == b""


def test_vmm_shutdown_reaches_the_control(server: ApiServer, vmm: FakeVmm) -> None:
    assert request(server, "PUT", "vmm.shutdown")[0] == 204
    assert vmm.vmm_shutdown.is_set()


@pytest.mark.parametrize(
    ("method", "endpoint"),
    [
        ("PUT", "vm.boot"),
        ("PUT", "vm.pause"),
        ("PUT", "vm.resume"),
        ("PUT", "vm.shutdown"),
        ("PUT", "vm.reboot"),
        ("PUT", "vm.power-button"),
        ("PUT", "vm.delete"),
        ("GET", "vm.info"),
        ("GET", "vm.counters"),
    ],
)
def test_requests_before_create_are_conflicts(
    server: ApiServer, vmm: FakeVmm, method: str, endpoint: str
) -> None:
    status, body, _ = request(server, method, endpoint)
    assert_error(status, body, 409)
    assert "no VM has been created" in body["error"]


def test_state_conflicts_are_409_and_change_nothing(server: ApiServer, vmm: FakeVmm) -> None:
    create_and_boot(server)
    status, body, _ = request(server, "PUT", "vm.resume")
    assert_error(status, body, 409)
    assert body["error"] == "cannot resume the VM while it is Running"
    status, body, _ = request(server, "PUT", "vm.create", json.dumps(CONFIG).encode())
    assert_error(status, body, 409)
    assert vmm.state is VmState.RUNNING
    assert request(server, "GET", "vmm.ping")[0] == 200


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"text"',
        b"\xff\xfe",
        b'{"payload": {"kernel": "k"}, "payload": {"kernel": "k"}}',
        b'{"payload": {"kernel": "k"}, "memory": {"size": NaN}}',
        b'{"payload": {"kernel": "k\\ud800"}}',
        b'{"payload": {"kernel": "k", "cmdline": "\\udfff"}}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"payload": {"kernel": "k"}, "memory": {"size": 1' + b"0" * 5000 + b"}}",
        b'{"payload": {"kernel": "k"}, "frobnicate": 1}',
        b'{"payload": {"kernel": "k"}, "cpus": {"boot_vcpus": "2"}}',
        b'{"payload": {"kernel": "k"}, "cpus": {"boot_vcpus": 0}}',
        b'{"payload": {"kernel": "k"}, "cpus": {"boot_vcpus": true}}',
        b'{"payload": {"kernel": "k"}, "memory": {"size": 4096}}',
        b'{"payload": {"kernel": "k"}, "cpus": null}',
        b'{"payload": {"kernel": "k"}, "disks": [{"readonly": true}]}',
        b'{"payload": {"kernel": "k"}, "serial": {"mode": ["Tty"]}}',
        b'{"payload": {"kernel": "k"}, "net": [{"tap": "tap0/x"}]}',
        b'{"cpus": {"boot_vcpus": 1}}',
    ],
)
def test_bad_configs_are_400(server: ApiServer, vmm: FakeVmm, body: bytes) -> None:
    status, answer, _ = request(server, "PUT", "vm.create", body)
    assert_error(status, answer, 400)
    assert vmm.state is None


def test_unknown_path_is_404(server: ApiServer) -> None:
    status, body, _ = request(server, "GET", "vm.frobnicate")
    assert_error(status, body, 404)
    conn = UnixHTTPConnection(server.path, timeout=10)
    conn.request("GET", "/api/v2/vmm.ping")
    response = conn.getresponse()
    assert response.status == 404
    conn.close()


def test_wrong_method_is_405_with_allow(server: ApiServer) -> None:
    status, body, response = request(server, "POST", "vm.boot")
    assert_error(status, body, 405)
    assert response.getheader("Allow") == "PUT"
    status, body, response = request(server, "PUT", "vmm.ping")
    assert_error(status, body, 405)
    assert response.getheader("Allow") == "GET"


def test_oversized_body_is_413(socket_dir: str, vmm: FakeVmm) -> None:
    with ApiServer(os.path.join(socket_dir, "api.sock"), vmm, max_body=1024) as api:
        status, body, _ = request(api, "PUT", "vm.create", b" " * 1025)
        assert_error(status, body, 413)
        # A body larger than the socket's buffers: the client is still sending when the
        # server answers, and must get the answer rather than a broken pipe.
        status, body, _ = request(api, "PUT", "vm.create", b" " * (2 << 20))
        assert_error(status, body, 413)
        answer = raw_exchange(
            api,
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"400\r\n"
            + b" " * 1024
            + b"\r\n1\r\n \r\n0\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert request(api, "GET", "vmm.ping")[0] == 200


def test_chunked_bodies_are_accepted(server: ApiServer, vmm: FakeVmm) -> None:
    body = json.dumps(CONFIG).encode()
    answer = raw_exchange(
        server,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n" % 10
        + body[:10]
        + b"\r\n"
        + b"%x;ext=1\r\n" % (len(body) - 10)
        + body[10:]
        + b"\r\n0\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 204 ")
    assert vmm.state is VmState.CREATED


@pytest.mark.parametrize(
    "data",
    [
        b"garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n folded: x\r\n\r\n",
        b"GET \xff HTTP/1.1\r\n\r\n",
        b"GET relative HTTP/1.1\r\n\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x",
        b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
    ],
)
def test_malformed_http_gets_4xx_and_the_server_keeps_serving(
    server: ApiServer, data: bytes
) -> None:
    answer = raw_exchange(server, data)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), status_line
    assert b"Connection: close" in answer
    assert request(server, "GET", "vmm.ping")[0] == 200


def test_query_strings_and_absolute_targets_route_normally(server: ApiServer) -> None:
    for target in (b"/api/v1/vmm.ping?x=1", b"http://localhost/api/v1/vmm.ping"):
        answer = raw_exchange(server, b"GET " + target + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 "), target


def test_keep_alive_serves_several_requests_on_one_connection(server: ApiServer) -> None:
    conn = UnixHTTPConnection(server.path, timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", "/api/v1/vmm.ping")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
        conn.request("PUT", "/api/v1/vm.pause")
        response = conn.getresponse()
        assert response.status == 409
        response.read()
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(server: ApiServer) -> None:
    ping = b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n"
    answer = raw_exchange(server, ping + b"GET /api/v1/nope HTTP/1.1\r\n\r\n" + ping)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"404", b"200"]


def test_http_1_0_closes_after_the_answer(server: ApiServer) -> None:
    answer = raw_exchange(server, b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" in answer


def test_a_client_that_vanishes_mid_request_harms_nothing(server: ApiServer) -> None:
    for data in (
        b'PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{"pay',
        b"GET /api/v1/vmm.pi",
        b"",
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server.path)
            sock.sendall(data)
    # A client that sends a request and leaves without reading the answer.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(server.path)
        sock.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n" * 50)
    assert request(server, "GET", "vmm.ping")[0] == 200


def test_a_stalled_client_does_not_block_others(server: ApiServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
        stalled.connect(server.path)
        stalled.sendall(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        assert request(server, "GET", "vmm.ping")[0] == 200


# -- concurrency and serialisation ------------------------------------------------------------


class _SlowVmm(FakeVmm):
    """Detects overlapping control calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.overlaps = 0
        self.guard = threading.Lock()

    def ping(self) -> dict[str, Any]:
        with self.guard:
            self.inside += 1
            if self.inside > 1:
                self.overlaps += 1
        for _ in range(2000):  # give another thread the chance to enter, if it could
            os.sched_yield()
        with self.guard:
            self.inside -= 1
        return super().ping()


def test_control_calls_are_serialised(socket_dir: str) -> None:
    vmm = _SlowVmm()
    with ApiServer(os.path.join(socket_dir, "api.sock"), vmm) as api:
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(5):
                    assert request(api, "GET", "vmm.ping")[0] == 200
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert vmm.calls.count("ping") == 40
    assert vmm.overlaps == 0


class _BrokenVmm(FakeVmm):
    def boot(self) -> None:
        raise KeyError("a bug")


def test_an_unexpected_exception_is_500_and_the_server_lives_on(
    socket_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    with ApiServer(os.path.join(socket_dir, "api.sock"), _BrokenVmm()) as api:
        status, body, _ = request(api, "PUT", "vm.boot")
        assert_error(status, body, 500)
        assert "KeyError" not in body["error"]
        assert request(api, "GET", "vmm.ping")[0] == 200
    assert any(record.exc_info for record in caplog.records)


# -- socket file handling -------------------------------------------------------------------------


def test_stop_removes_the_socket_file(socket_dir: str, vmm: FakeVmm) -> None:
    api = ApiServer(os.path.join(socket_dir, "api.sock"), vmm)
    api.start()
    assert os.path.exists(api.path)
    assert os.stat(api.path).st_mode & 0o777 == 0o600
    api.stop()
    assert not os.path.exists(api.path)
    api.stop()  # idempotent


def test_stop_closes_idle_keep_alive_connections(socket_dir: str, vmm: FakeVmm) -> None:
    api = ApiServer(os.path.join(socket_dir, "api.sock"), vmm)
    api.start()
    conn = UnixHTTPConnection(api.path, timeout=10)
    conn.request("GET", "/api/v1/vmm.ping")
    conn.getresponse().read()
    api.stop()
    assert conn.sock is not None
    assert conn.sock.recv(1) == b""  # the server closed its end
    conn.close()


def test_stop_from_inside_a_request_handler(socket_dir: str) -> None:
    class SelfStoppingVmm(FakeVmm):
        server: ApiServer | None = None

        def shutdown_vmm(self) -> None:
            super().shutdown_vmm()
            assert self.server is not None
            self.server.stop()

    vmm = SelfStoppingVmm()
    api = ApiServer(os.path.join(socket_dir, "api.sock"), vmm)
    vmm.server = api
    api.start()
    status, _, response = request(api, "PUT", "vmm.shutdown")
    assert status == 204
    assert response.getheader("Connection") == "close"
    assert not os.path.exists(api.path)


def test_a_stale_socket_file_is_replaced(socket_dir: str, vmm: FakeVmm) -> None:
    path = os.path.join(socket_dir, "api.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    with ApiServer(path, vmm) as api:
        assert request(api, "GET", "vmm.ping")[0] == 200


def test_a_live_socket_is_not_taken_over(server: ApiServer, vmm: FakeVmm) -> None:
    second = ApiServer(server.path, FakeVmm())
    with pytest.raises(ApiServerError, match="in use by another running API server"):
        second.start()
    assert request(server, "GET", "vmm.ping")[0] == 200


def test_a_regular_file_is_not_replaced(socket_dir: str, vmm: FakeVmm) -> None:
    path = os.path.join(socket_dir, "api.sock")
    with open(path, "w") as file:
        file.write("keep me")
    with pytest.raises(ApiServerError, match="not a socket"):
        ApiServer(path, vmm).start()
    with open(path) as file:
        assert file.read() == "keep me"


def test_a_missing_directory_is_a_clear_error(socket_dir: str, vmm: FakeVmm) -> None:
    with pytest.raises(ApiServerError, match="cannot serve the API"):
        ApiServer(os.path.join(socket_dir, "no", "api.sock"), vmm).start()


def test_stop_leaves_a_newer_servers_socket_alone(socket_dir: str, vmm: FakeVmm) -> None:
    path = os.path.join(socket_dir, "api.sock")
    first = ApiServer(path, vmm)
    first.start()
    os.unlink(path)  # someone removed it, and a new server took the path
    with ApiServer(path, FakeVmm()) as second:
        first.stop()
        assert os.path.exists(path)
        assert request(second, "GET", "vmm.ping")[0] == 200


def test_routes_are_unique() -> None:
    keys = [(route.method, route.path) for route in ROUTES]
    assert len(keys) == len(set(keys)) == 12


def test_expect_100_continue_is_answered_before_the_body(server: ApiServer, vmm: FakeVmm) -> None:
    body = json.dumps(CONFIG).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(server.path)
        sock.sendall(
            b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += sock.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        final = sock.recv(65536)
    assert final.startswith(b"HTTP/1.1 204 ")
    assert vmm.state is VmState.CREATED


def test_expect_100_continue_with_an_oversized_body_gets_413_at_once(
    socket_dir: str, vmm: FakeVmm
) -> None:
    with ApiServer(os.path.join(socket_dir, "api.sock"), vmm, max_body=10) as api:
        answer = raw_exchange(
            api,
            b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n",
        )
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_head_answers_carry_no_body(server: ApiServer) -> None:
    ping = b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n"
    answer = raw_exchange(server, b"HEAD /api/v1/vmm.ping HTTP/1.1\r\n\r\n" + ping)
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 405 ") and b"Allow: GET" in first
    assert rest.startswith(b"HTTP/1.1 200 ")


def test_a_flood_of_blank_lines_is_refused(server: ApiServer) -> None:
    answer = raw_exchange(server, b"\r\n" * 1000)
    assert answer.startswith(b"HTTP/1.1 400 ")
