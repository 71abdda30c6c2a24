"""Fuzz the running API server from its OpenAPI document with schemathesis, over the Unix socket.

schemathesis sends its requests with ``requests``; a small transport adapter here connects those
requests to the server's Unix socket, so the fuzzed server is exactly the one nubis runs. Every
operation gets a bounded number of generated requests, both valid and invalid ones; the server
must never answer 5xx, every answer must be documented and match its schema, invalid bodies must
be refused with 4xx, and the server must still answer ``vmm.ping`` at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, settings  # noqa: E402
from requests.adapters import HTTPAdapter  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from urllib3.connection import HTTPConnection  # noqa: E402
from urllib3.connectionpool import HTTPConnectionPool  # noqa: E402

from nubis.api import openapi_document  # noqa: E402
from nubis.api.remote import ApiClient  # noqa: E402
from nubis.api.server import ApiServer  # noqa: E402
from nubis.api.testing import FakeVmm  # noqa: E402

MAX_EXAMPLES = 50
BASE_URL = "http://localhost/api/v1"


class _UnixConnection(HTTPConnection):
    def __init__(self, *args: Any, socket_path: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.socket_path)
        return sock


class _UnixPool(HTTPConnectionPool):
    ConnectionCls = _UnixConnection


class UnixAdapter(HTTPAdapter):
    """A requests transport adapter that sends every request to one Unix socket."""

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.socket_path = socket_path
        self._pool = _UnixPool("localhost", socket_path=socket_path)

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> HTTPConnectionPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


class _Fixture:
    """The server, its fake VMM and a requests session bound to its socket, for the module."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="nubis-fuzz-", dir="/tmp")
        self.vmm = FakeVmm()
        self.server = ApiServer(os.path.join(self.directory, "api.sock"), self.vmm)
        self.session = requests.Session()
        self.session.mount("http://", UnixAdapter(self.server.path))

    def close(self) -> None:
        self.session.close()
        self.server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def live() -> Iterator[_Fixture]:
    fixture = _Fixture()
    fixture.server.start()
    yield fixture
    # The server survived every generated request.
    assert ApiClient(fixture.server.path).request("GET", "vmm.ping").status == 200
    fixture.close()


schema = schemathesis.openapi.from_dict(openapi_document())


@schema.parametrize()  # type: ignore[untyped-decorator]
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_request_makes_the_server_fail(live: _Fixture, case: Any) -> None:
    if case.operation.path == "/vm.create":
        # From no VM, a valid config is accepted (204) and an invalid one refused (400), so the
        # negative-data check sees the validation rather than a state conflict.
        live.vmm.state = None
        live.vmm.config = None
    response = case.call(session=live.session, base_url=BASE_URL)
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ],
    )
