"""The error seam: a bug in a route is a JSON 500 that keeps the client's keep-alive connection usable."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fixtures.server import serving
from tests.unit.api.conftest import TinyState


def _exchange(sock: socket.socket, path: str) -> tuple[int, bytes]:
    """One GET on an open HTTP/1.1 connection: its status and body (b"" and status 0 if the server closed it)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, b""
        received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), body


async def _broken(request: Request) -> Response:
    raise RuntimeError("a bug in a route")


def test_a_bug_is_a_json_500_and_the_connection_serves_the_next_request(
    tiny_state: TinyState, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(tiny_state(None)) as server:
        server.app.router.routes.append(Route("/v1/broken", _broken))
        port = int(server.base_url.rsplit(":", 1)[1])
        with caplog.at_level(logging.ERROR), socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            status, body = _exchange(sock, "/v1/broken")
            assert status == 500
            assert json.loads(body) == {"error": "internal error: RuntimeError: a bug in a route"}
            time.sleep(0.3)  # a server that closes the connection after the error has done so by now
            status, body = _exchange(sock, "/v1/models")
            assert status == 200 and json.loads(body)["object"] == "list"
        assert "a bug in a route" in caplog.text  # the traceback is in the log, not in the answer
