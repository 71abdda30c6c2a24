"""The REST API server: cloud-hypervisor's ``/api/v1`` endpoints over HTTP/1.1 on a Unix socket.

Endpoints (``openapi.json`` next to this module describes each one)::

    GET /vmm.ping   PUT /vmm.shutdown
    PUT /vm.create  PUT /vm.boot   GET /vm.info   PUT /vm.pause   PUT /vm.resume
    PUT /vm.shutdown PUT /vm.reboot PUT /vm.power-button GET /vm.counters PUT /vm.delete

Each request becomes one call into a :class:`~nubis.vmm.lifecycle.VmmControl`; calls are
serialised by a lock, so the control sees one request at a time whichever connection it came from.

Answers:

=====  ========================================================================================
200    a GET's JSON answer
204    a PUT that succeeded (no body)
400    the request or its body is invalid: malformed HTTP or JSON, or a VmConfig that
       ``VmConfig.from_dict`` refuses (unknown field, wrong type, value out of range)
404    no such endpoint
405    the endpoint exists but not for this method (the ``Allow`` header lists the right one)
409    the request does not fit the VM's state (:class:`InvalidStateError`), e.g. ``vm.pause``
       before ``vm.boot`` or ``vm.boot`` before ``vm.create``. cloud-hypervisor's document
       lists 404 and 405 for some of these and answers 500 in practice; nubis keeps 404 and 405
       for their HTTP meanings and answers every state conflict with 409 Conflict
413    the request body is larger than ``max_body``
500    a bug inside nubis (logged with its traceback); the server keeps serving
=====  ========================================================================================

Every error answer has the JSON body ``{"error": "<one sentence>"}``.

Each connection is served by its own daemon thread (HTTP/1.1 keep-alive; an idle or stalled
client times out and only ever holds its own thread), so a client that disconnects mid-request or
sends garbage costs nothing but that thread's time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, BinaryIO, Final

from nubis import __version__
from nubis.api.wire import ConnectionClosed, HttpError, Request, Response, read_request
from nubis.vmm.config import ConfigError, VmConfig
from nubis.vmm.lifecycle import InvalidStateError, VmmControl

log = logging.getLogger(__name__)

API_PREFIX: Final = "/api/v1"
MAX_BODY: Final = 256 << 10
"""Largest request body accepted (a VmConfig is a few KiB at most)."""
IDLE_TIMEOUT: Final = 60.0
"""Seconds a connection may sit idle or stall mid-request before it is closed."""
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 4 << 20
"""After refusing a request, how long and how much of its unread body is read and dropped.

Closing a socket with unread data resets it, and a client still sending its body would see
a broken pipe instead of the answer."""
MAX_CONNECTIONS: Final = 64
"""Connections served at once; more are closed as soon as they are accepted."""
SERVER_NAME: Final = f"nubis/{__version__}"


class ApiServerError(RuntimeError):
    """The API server cannot start; the message is one sentence."""


class BadRequestError(ValueError):
    """A request body is not what the endpoint takes; the message is one sentence."""


Handler = Callable[[VmmControl, Request], Response]


@dataclass(frozen=True)
class Route:
    """One endpoint: ``method`` on ``API_PREFIX + path`` is served by ``handler``."""

    method: str
    path: str
    handler: Handler


def _no_content(call: Callable[[VmmControl], None]) -> Handler:
    def handler(control: VmmControl, request: Request) -> Response:
        call(control)
        return Response(HTTPStatus.NO_CONTENT)

    return handler


def _json_answer(call: Callable[[VmmControl], object]) -> Handler:
    def handler(control: VmmControl, request: Request) -> Response:
        return Response.json(HTTPStatus.OK, call(control))

    return handler


def _reject_constant(name: str) -> Any:
    raise BadRequestError(f"the request body contains {name}, which is not valid JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadRequestError(f"the request body gives the field {key!r} twice")
        result[key] = value
    return result


def _check_unicode(value: object) -> None:
    """Refuse strings that cannot be encoded (lone surrogates from ``\\ud800`` escapes)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequestError(
                    "the request body contains a \\u escape that is not a Unicode character"
                ) from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_json_body(body: bytes) -> object:
    """Decode a request body as strict JSON (UTF-8, no NaN, no duplicate keys)."""
    if not body.strip():
        raise BadRequestError("the request needs a JSON body")
    try:
        text = body.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except UnicodeDecodeError:
        raise BadRequestError("the request body is not UTF-8 text") from None
    except RecursionError:
        raise BadRequestError("the request body nests JSON too deeply") from None
    except ValueError as error:
        if isinstance(error, BadRequestError):
            raise
        raise BadRequestError(f"the request body is not valid JSON ({error})") from None
    _check_unicode(value)
    return value


def _create(control: VmmControl, request: Request) -> Response:
    config = VmConfig.from_dict(parse_json_body(request.body))
    control.create(config)
    return Response(HTTPStatus.NO_CONTENT)


ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", "/vmm.ping", _json_answer(lambda c: c.ping())),
    Route("PUT", "/vmm.shutdown", _no_content(lambda c: c.shutdown_vmm())),
    Route("PUT", "/vm.create", _create),
    Route("PUT", "/vm.boot", _no_content(lambda c: c.boot())),
    Route("GET", "/vm.info", _json_answer(lambda c: c.info())),
    Route("PUT", "/vm.pause", _no_content(lambda c: c.pause())),
    Route("PUT", "/vm.resume", _no_content(lambda c: c.resume())),
    Route("PUT", "/vm.shutdown", _no_content(lambda c: c.shutdown())),
    Route("PUT", "/vm.reboot", _no_content(lambda c: c.reboot())),
    Route("PUT", "/vm.power-button", _no_content(lambda c: c.power_button())),
    Route("GET", "/vm.counters", _json_answer(lambda c: c.counters())),
    Route("PUT", "/vm.delete", _no_content(lambda c: c.delete())),
)
"""Every endpoint the server answers; the OpenAPI document lists exactly these."""


def _route_table() -> dict[str, dict[str, Handler]]:
    table: dict[str, dict[str, Handler]] = {}
    for route in ROUTES:
        table.setdefault(API_PREFIX + route.path, {})[route.method] = route.handler
    return table


class ApiServer:
    """Serves the REST API for ``control`` on the Unix socket ``path``, in daemon threads.

    ``start()`` binds the socket (replacing a stale socket file, refusing a live one) and returns
    once the server accepts connections; ``stop()`` closes it, lets answers in flight finish and
    removes the socket file. Both may be called from any thread, ``stop()`` also from a request
    handler (the VMM's ``shutdown_vmm``).
    """

    def __init__(self, path: str, control: VmmControl, *, max_body: int = MAX_BODY) -> None:
        self.path = path
        self._control = control
        self._max_body = max_body
        self._routes = _route_table()
        self._control_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = False

    # -- life of the server ------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket and start accepting connections in a daemon thread."""
        if self._listener is not None:
            raise ApiServerError(f"the API server on {self.path} is already running")
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            os.chmod(self.path, 0o600)  # the API controls the VM: only its owner may connect
            listener.listen(16)
            info = os.stat(self.path)
        except OSError as error:
            listener.close()
            raise ApiServerError(
                f"cannot serve the API on {self.path}: {error.strerror or error}"
            ) from None
        self._socket_id = (info.st_dev, info.st_ino)
        self._listener = listener
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="nubis-api", daemon=True
        )
        self._accept_thread.start()
        log.info("REST API listening on %s", self.path)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, finish answers in flight, close connections, remove the socket file."""
        with self._state_lock:
            if self._listener is None or self._stopping:
                return
            self._stopping = True
            connections = list(self._connections.items())
        assert self._wake_w is not None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        current = threading.current_thread()
        if self._accept_thread is not None and self._accept_thread is not current:
            self._accept_thread.join(timeout)
        for conn, _ in connections:
            # Wakes a reader waiting for the next request; an answer being written still goes out.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        in_handler = any(thread is current for _, thread in connections)
        if not in_handler:  # a handler holds the control lock other connections may wait for
            for _, thread in connections:
                thread.join(timeout)
        self._remove_own_socket()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._listener = self._wake_r = self._wake_w = None
        log.info("REST API on %s stopped", self.path)

    def __enter__(self) -> ApiServer:
        """Start the server for a ``with`` block."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the server at the end of a ``with`` block."""
        self.stop()

    def _remove_stale_socket(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as error:
            raise ApiServerError(f"cannot use {self.path} for the API: {error.strerror}") from None
        if not stat.S_ISSOCK(info.st_mode):
            raise ApiServerError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing the stale API socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except OSError as error:
            raise ApiServerError(f"cannot use {self.path} for the API: {error.strerror}") from None
        finally:
            probe.close()
        raise ApiServerError(f"{self.path} is in use by another running API server")

    def _remove_own_socket(self) -> None:
        try:
            info = os.lstat(self.path)
        except OSError:
            return
        if (info.st_dev, info.st_ino) == self._socket_id:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    # -- connections ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r or self._stopping:
                        return
                    try:
                        conn, _ = self._listener.accept()
                    except OSError as error:
                        log.warning("accepting an API connection failed: %s", error)
                        continue
                    self._spawn(conn)

    def _spawn(self, conn: socket.socket) -> None:
        with self._state_lock:
            if self._stopping or len(self._connections) >= MAX_CONNECTIONS:
                log.warning("closing an API connection: %d are open already", MAX_CONNECTIONS)
                conn.close()
                return
            thread = threading.Thread(
                target=self._serve_connection, args=(conn,), name="nubis-api-conn", daemon=True
            )
            self._connections[conn] = thread
        thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        conn.settimeout(IDLE_TIMEOUT)
        stream = conn.makefile("rb")
        try:
            self._serve_requests(conn, stream)
        except OSError as error:  # the client went away or stalled; nothing to answer
            log.debug("API connection ended: %s", error)
        except Exception:
            log.exception("an API connection failed inside nubis")
        finally:
            stream.close()
            conn.close()
            with self._state_lock:
                self._connections.pop(conn, None)

    def _serve_requests(self, conn: socket.socket, stream: BinaryIO) -> None:
        def send_continue() -> None:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        while not self._stopping:
            try:
                request = read_request(stream, self._max_body, send_continue)
            except ConnectionClosed:
                return
            except HttpError as error:
                answer = Response.error(error.status, str(error))
                conn.sendall(answer.encode(close=True, server=SERVER_NAME))
                _linger_close(conn)
                return
            answer = self.dispatch(request)
            close = not request.keep_alive or self._stopping
            head = request.method == "HEAD"
            conn.sendall(answer.encode(close=close, server=SERVER_NAME, head=head))
            if close:
                return

    # -- requests ---------------------------------------------------------------------------

    def dispatch(self, request: Request) -> Response:
        """Answer one request: route it, call the control (serialised), map errors to statuses."""
        methods = self._routes.get(request.path)
        if methods is None:
            return Response.error(HTTPStatus.NOT_FOUND, f"there is no endpoint {request.path}")
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            return Response.error(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{request.path} takes {allowed}, not {request.method}",
                (("Allow", allowed),),
            )
        try:
            with self._control_lock:
                answer = handler(self._control, request)
        except (BadRequestError, ConfigError) as error:
            answer = Response.error(HTTPStatus.BAD_REQUEST, str(error))
        except InvalidStateError as error:
            answer = Response.error(HTTPStatus.CONFLICT, str(error))
        except Exception:
            log.exception("the API request %s %s failed", request.method, request.path)
            answer = Response.error(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"{request.method} {request.path} failed inside nubis; the log has the details",
            )
        log.debug("API %s %s -> %d", request.method, request.path, answer.status.value)
        return answer


def _linger_close(conn: socket.socket) -> None:
    """End the answer, then read and drop what the client still sends, within bounds.

    The client reads the answer once it has sent its body; it then closes, which ends this.
    """
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(LINGER_SECONDS)
        drained = 0
        while drained < LINGER_BYTES:
            data = conn.recv(65536)
            if not data:
                break
            drained += len(data)
