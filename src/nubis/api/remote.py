"""``nubis-remote``: drive a running nubis through its REST API socket, as ``ch-remote`` does.

Usage::

    nubis-remote --api-socket PATH COMMAND [ARG]

Commands: ``ping``, ``info``, ``counters`` (print the JSON answer on standard output),
``create FILE`` (a VmConfig JSON file, ``-`` for standard input), ``boot``, ``pause``, ``resume``,
``shutdown``, ``reboot``, ``power-button``, ``delete`` and ``shutdown-vmm`` (print nothing when
they succeed).

Exit status: 0 the server did it; 1 the server refused (its one-sentence reason goes to standard
error) or could not be reached; 2 bad input (a bad command line, an unreadable or non-JSON file,
or the server answered 400/413 to what was sent).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nubis import __version__

API_PREFIX = "/api/v1"
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2

# command -> (method, endpoint)
COMMANDS: dict[str, tuple[str, str]] = {
    "ping": ("GET", "vmm.ping"),
    "info": ("GET", "vm.info"),
    "counters": ("GET", "vm.counters"),
    "create": ("PUT", "vm.create"),
    "boot": ("PUT", "vm.boot"),
    "pause": ("PUT", "vm.pause"),
    "resume": ("PUT", "vm.resume"),
    "shutdown": ("PUT", "vm.shutdown"),
    "reboot": ("PUT", "vm.reboot"),
    "power-button": ("PUT", "vm.power-button"),
    "delete": ("PUT", "vm.delete"),
    "shutdown-vmm": ("PUT", "vmm.shutdown"),
}


class RemoteError(Exception):
    """A request could not be made or was refused; the message is one sentence."""

    def __init__(self, message: str, exit_status: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class UnixHTTPConnection(http.client.HTTPConnection):
    """An ``http.client`` connection to a server listening on a Unix socket."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        """Connect to the Unix socket instead of a TCP address."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.timeout is not None:
                sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class ApiAnswer:
    """One answer from the API: its status and decoded JSON body (None when empty)."""

    status: int
    body: Any


class ApiClient:
    """A small client for the nubis REST API on a Unix socket; one connection per request."""

    def __init__(self, socket_path: str, timeout: float | None = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, endpoint: str, body: bytes | None = None) -> ApiAnswer:
        """Send ``method /api/v1/endpoint``; raise :class:`RemoteError` if nobody answers."""
        conn = UnixHTTPConnection(self.socket_path, timeout=self.timeout)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            conn.request(method, f"{API_PREFIX}/{endpoint}", body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except FileNotFoundError:
            raise RemoteError(f"the API socket {self.socket_path} does not exist") from None
        except ConnectionRefusedError:
            raise RemoteError(
                f"nothing is listening on the API socket {self.socket_path}"
            ) from None
        except (http.client.HTTPException, OSError) as error:
            raise RemoteError(
                f"the API on {self.socket_path} did not answer ({error or type(error).__name__})"
            ) from None
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode("utf-8", "replace")
        return ApiAnswer(response.status, decoded)

    def call(self, method: str, endpoint: str, body: bytes | None = None) -> Any:
        """Like :meth:`request`, and raise :class:`RemoteError` with the server's reason on 4xx/5xx."""
        answer = self.request(method, endpoint, body)
        if answer.status >= 400:
            message = answer.body.get("error") if isinstance(answer.body, dict) else None
            if not isinstance(message, str):
                message = f"the server answered {answer.status}"
            status = EXIT_BAD_INPUT if answer.status in (400, 413) else EXIT_REFUSED
            raise RemoteError(" ".join(message.split()), status)
        return answer.body


def _read_config(name: str) -> bytes:
    try:
        if name == "-":
            text = sys.stdin.read()
        else:
            with open(name, encoding="utf-8") as file:
                text = file.read()
    except OSError as error:
        raise RemoteError(
            f"cannot read {name}: {error.strerror or error}", EXIT_BAD_INPUT
        ) from None
    except UnicodeDecodeError:
        raise RemoteError(f"{name} is not UTF-8 text", EXIT_BAD_INPUT) from None
    source = "standard input" if name == "-" else name
    try:
        value = json.loads(text)
    except ValueError as error:
        raise RemoteError(f"{source} is not valid JSON ({error})", EXIT_BAD_INPUT) from None
    return json.dumps(value).encode()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise RemoteError(message, EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nubis-remote``."""
    parser = _Parser(
        prog="nubis-remote",
        description="Control a running nubis through its REST API socket.",
        epilog="Exit status: 0 done, 1 refused or unreachable, 2 bad input.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"nubis-remote {__version__}")
    parser.add_argument("--api-socket", required=True, help="the API socket: PATH or path=PATH")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, endpoint) in COMMANDS.items():
        sub = commands.add_parser(name, help=f"{endpoint}")
        if name == "create":
            sub.add_argument("file", metavar="FILE", help="VmConfig JSON file, or - for stdin")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nubis-remote``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(args_list)
        path: str = args.api_socket
        if path.startswith("path="):
            path = path[len("path=") :]
        method, endpoint = COMMANDS[args.command]
        body = _read_config(args.file) if args.command == "create" else None
        result = ApiClient(path, timeout=args.timeout).call(method, endpoint, body)
    except RemoteError as error:
        print(f"nubis-remote: error: {error}", file=sys.stderr)
        return error.exit_status
    if result is not None:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
