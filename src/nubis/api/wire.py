"""HTTP/1.1 on the wire: reading one request from a byte stream and encoding one response.

nubis's API needs a small part of HTTP/1.1 (RFC 9112): a request line, header fields, a body
framed by ``Content-Length`` or chunked transfer coding, and persistent connections. That part is
implemented here on a buffered binary stream rather than with ``http.server``, so that the server
starts without importing the ``email`` package and every malformed request maps to a precise 4xx
answer (:class:`HttpError`) instead of whatever a general-purpose server does with it.

Limits bound what a client can make the server hold: the request line and each header line
(:data:`MAX_LINE`), the number of header fields (:data:`MAX_HEADERS`) and the body (the caller's
``max_body``, answered with 413).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import BinaryIO

MAX_LINE = 8192
"""Longest request line or header line, in bytes, CRLF included."""
MAX_HEADERS = 100
"""Most header fields in one request."""

_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION_RE = re.compile(rb"HTTP/1\.[01]")
_HEX_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class HttpError(Exception):
    """A request cannot be served as sent; ``status`` is the 4xx answer and the message one sentence."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ConnectionClosed(Exception):
    """The client closed the connection cleanly between requests."""


@dataclass
class Request:
    """One parsed HTTP request: method, path (query string removed), headers and body."""

    method: str
    path: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open after the answer (HTTP/1.1 default unless ``close``)."""
        connection = self.headers.get("connection", "").lower()
        tokens = {t.strip() for t in connection.split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


def _read_line(stream: BinaryIO, what: str) -> bytes:
    line = stream.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise HttpError(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            if what == "header"
            else HTTPStatus.REQUEST_URI_TOO_LONG,
            f"the request's {what} line is longer than {MAX_LINE} bytes",
        )
    if line and not line.endswith(b"\n"):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"the request ended inside its {what} line")
    return line


def read_request(
    stream: BinaryIO, max_body: int, send_continue: Callable[[], None] | None = None
) -> Request:
    """Read one request from ``stream``.

    ``send_continue`` is called when the client waits for ``100 Continue`` before sending its
    body (``Expect: 100-continue``, which curl sends for bodies over 1 KiB) and the body is
    within the limit. Raises :class:`ConnectionClosed` if the stream ends before a request
    starts, and :class:`HttpError` for a request that is malformed, too large, or cut short.
    """
    line = _read_line(stream, "request")
    for _ in range(MAX_HEADERS):  # RFC 9112 section 2.2: ignore empty lines before a request
        if line not in (b"\r\n", b"\n"):
            break
        line = _read_line(stream, "request")
    if not line:
        raise ConnectionClosed
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]) or not parts[1]:
        raise HttpError(HTTPStatus.BAD_REQUEST, "the request line is not 'METHOD TARGET HTTP/1.1'")
    method, target, version = parts
    if not _VERSION_RE.fullmatch(version):
        raise HttpError(HTTPStatus.BAD_REQUEST, "the API speaks HTTP/1.0 and HTTP/1.1 only")
    headers = _read_headers(stream)
    request = Request(
        method=method.decode("ascii"),
        path=_target_path(target),
        version=version.decode("ascii"),
        headers=headers,
    )
    expects_continue = headers.get("expect", "").lower() == "100-continue"
    request.body = _read_body(
        stream, headers, max_body, send_continue if expects_continue else None
    )
    return request


def _target_path(target: bytes) -> str:
    """The path of an origin-form or absolute-form request target, without the query string."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "the request target is not ASCII") from None
    if "://" in text:  # absolute-form: http://host/path
        _, _, rest = text.partition("://")
        slash = rest.find("/")
        text = rest[slash:] if slash >= 0 else "/"
    path = text.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise HttpError(HTTPStatus.BAD_REQUEST, "the request target is not a path")
    return path


def _read_headers(stream: BinaryIO) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = _read_line(stream, "header")
        if not line:
            raise HttpError(HTTPStatus.BAD_REQUEST, "the request ended inside its header fields")
        if line in (b"\r\n", b"\n"):
            return headers
        if line[:1] in (b" ", b"\t"):
            raise HttpError(HTTPStatus.BAD_REQUEST, "folded header lines are not accepted")
        name, sep, value = line.rstrip(b"\r\n").partition(b":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise HttpError(HTTPStatus.BAD_REQUEST, "a header line is not 'Name: value'")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "transfer-encoding", "host"):
                raise HttpError(HTTPStatus.BAD_REQUEST, f"the {key} header is given twice")
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text
    raise HttpError(
        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        f"the request has more than {MAX_HEADERS} header fields",
    )


def _read_body(
    stream: BinaryIO,
    headers: dict[str, str],
    max_body: int,
    send_continue: Callable[[], None] | None,
) -> bytes:
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if "content-length" in headers:
            raise HttpError(
                HTTPStatus.BAD_REQUEST, "the request has both Content-Length and Transfer-Encoding"
            )
        if coding.strip().lower() != "chunked":
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                f"transfer coding {coding!r} is not supported; use chunked or Content-Length",
            )
        if send_continue is not None:
            send_continue()
        return _read_chunked(stream, max_body)
    length_text = headers.get("content-length")
    if length_text is None:
        return b""
    if not length_text.isdigit() or not length_text.isascii():
        raise HttpError(HTTPStatus.BAD_REQUEST, "the Content-Length header is not a number")
    length = int(length_text)
    if length > max_body:
        raise HttpError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the request body is {length} bytes; the limit is {max_body}",
        )
    if send_continue is not None and length:
        send_continue()
    body = stream.read(length)
    if len(body) != length:
        raise HttpError(HTTPStatus.BAD_REQUEST, "the request ended before its body was complete")
    return body


def _read_chunked(stream: BinaryIO, max_body: int) -> bytes:
    body = bytearray()
    while True:
        size_line = _read_line(stream, "chunk size").rstrip(b"\r\n")
        size_text = size_line.split(b";", 1)[0].strip()
        if not _HEX_RE.fullmatch(size_text):
            raise HttpError(HTTPStatus.BAD_REQUEST, "a chunk size is not a hex number")
        size = int(size_text, 16)
        if size == 0:
            _read_headers(stream)  # the trailer section, ignored
            return bytes(body)
        if len(body) + size > max_body:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request body is longer than the limit of {max_body} bytes",
            )
        chunk = stream.read(size)
        if len(chunk) != size or _read_line(stream, "chunk end") not in (b"\r\n", b"\n"):
            raise HttpError(HTTPStatus.BAD_REQUEST, "a chunk of the request body is cut short")
        body += chunk


@dataclass(frozen=True)
class Response:
    """One answer: a status, an optional JSON body and extra header fields."""

    status: HTTPStatus
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: HTTPStatus, value: object) -> Response:
        """An answer with ``value`` as its JSON body."""
        return cls(status, json.dumps(value).encode())

    @classmethod
    def error(
        cls, status: HTTPStatus, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        """An error answer: ``{"error": message}``."""
        return cls(status, json.dumps({"error": message}).encode(), headers)

    def encode(self, *, close: bool, server: str, head: bool = False) -> bytes:
        """The bytes on the wire (RFC 9112 section 4 and 6); ``head`` leaves the body out."""
        lines = [f"HTTP/1.1 {self.status.value} {self.status.phrase}", f"Server: {server}"]
        if self.status is not HTTPStatus.NO_CONTENT:
            lines.append("Content-Type: application/json")
            lines.append(f"Content-Length: {len(self.body)}")
        lines.extend(f"{name}: {value}" for name, value in self.headers)
        if close:
            lines.append("Connection: close")
        header = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return header if head or self.status is HTTPStatus.NO_CONTENT else header + self.body
