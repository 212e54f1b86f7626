"""HeadTimeoutProtocol on a real uvicorn server: a request head that does not arrive in time is a 408 and a closed
connection (a silent connection is just closed); requests sent in time, and answers that take longer, are untouched.
A client that stops reading its answer loses its connection (its stream ends); one that reads slowly keeps it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cake_py.api.http_protocol import HeadTimeoutProtocol


class _QuickProtocol(HeadTimeoutProtocol):
    head_timeout = 0.5
    write_stall_timeout = 0.5


CHUNK = b"x" * 65536
BIG_CHUNKS = 24  # /big: 1.5 MiB
endless_ended = threading.Event()  # set when /endless's answer stops being sent


async def _endless_chunks() -> AsyncIterator[bytes]:
    while True:
        yield CHUNK
        await asyncio.sleep(0)  # as a stream waiting for its next event does: once the client is gone, sends return
        # at once, and a body that never awaits would never let its cancellation in


class _Endless(StreamingResponse):
    """An answer that never ends, and says when the server stops sending it (as GenerationResponse cancels its
    sequences: a suspended generator's own cleanup runs only when it is collected)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            endless_ended.set()


async def _endless(request: Request) -> StreamingResponse:
    return _Endless(_endless_chunks())


async def _big_chunks() -> AsyncIterator[bytes]:
    for _ in range(BIG_CHUNKS):  # far more than the sockets' buffers hold
        yield CHUNK


async def _big(request: Request) -> StreamingResponse:
    return StreamingResponse(_big_chunks())


async def _slow(request: Request) -> PlainTextResponse:
    await asyncio.sleep(1.2)  # longer than the head timeout: the answer must not be cut
    return PlainTextResponse("slow")


async def _fast(request: Request) -> PlainTextResponse:
    return PlainTextResponse("fast")


async def _early(request: Request) -> PlainTextResponse:
    return PlainTextResponse("no", status_code=401)  # answered without reading the body, as a key check does


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = Starlette(
        routes=[
            Route("/slow", _slow),
            Route("/fast", _fast),
            Route("/early", _early, methods=["POST"]),
            Route("/endless", _endless),
            Route("/big", _big),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", loop="asyncio", http=_QuickProtocol, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    if receive_buffer is None:
        return socket.create_connection(("127.0.0.1", port), timeout=5)
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connecting: sets the window
    connection.settimeout(5)
    connection.connect(("127.0.0.1", port))
    return connection


def _read_all(connection: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_response(connection: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1]
    )
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_connection_that_sends_nothing_is_closed(port: int) -> None:
    with _connect(port) as connection:
        began = time.monotonic()
        assert _read_all(connection) == b""
        assert 0.4 < time.monotonic() - began < 3


def test_a_head_sent_too_slowly_is_a_408_and_a_closed_connection(port: int) -> None:
    with _connect(port) as connection:
        began = time.monotonic()
        connection.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)
        connection.sendall(b"X-Slow: 1\r\n")  # a byte now and then does not keep it open
        answer = _read_all(connection)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert answer.endswith(b'{"error": "the request head did not arrive within 0.5 s"}')
        assert time.monotonic() - began < 3


def test_requests_in_time_and_slow_answers_are_untouched_and_each_next_head_is_timed(port: int) -> None:
    with _connect(port) as connection:
        connection.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(connection).endswith(b"\r\n\r\nslow")  # 1.2 s: longer than the head timeout
        time.sleep(0.1)  # a pause well inside the 0.5 s head timeout (0.3 s left a loaded machine only 0.2 s)
        connection.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: the next request
        assert _read_response(connection).endswith(b"\r\n\r\nfast")
        connection.sendall(b"GET /fast HTTP/1.1\r\n")  # and the head after it stalls
        assert _read_all(connection).startswith(b"HTTP/1.1 408 ")


def test_a_body_still_arriving_after_an_early_answer_is_not_taken_for_a_slow_head(port: int) -> None:
    """A 401 sent before its request's body had all come: the body's bytes armed the timer as if they were the
    next head, and a 408 followed the 401 on a connection closed mid-upload."""
    with _connect(port) as connection:
        connection.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):  # 2 s for the body: longer than the head timeout
            connection.sendall(b"x")
            time.sleep(0.2)
        assert b" 401 " in _read_response(connection).split(b"\r\n")[0]
        connection.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection serves on
        assert _read_response(connection).endswith(b"\r\n\r\nfast")


def test_a_client_that_stops_reading_loses_its_connection_and_its_stream_ends(port: int) -> None:
    """uvicorn waited for the socket to drain for ever: the stream's generator (a generation, in the product) stayed
    suspended, holding what it had made, as long as the client kept the connection open."""
    endless_ended.clear()
    with _connect(port, receive_buffer=4096) as connection:
        connection.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        assert endless_ended.wait(10)  # never read from: dropped 0.5 s after the buffers filled


def test_a_client_reading_slowly_gets_its_whole_answer(port: int) -> None:
    with _connect(port, receive_buffer=4096) as connection:
        connection.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        began = time.monotonic()
        while received < BIG_CHUNKS * len(CHUNK) and time.monotonic() - began < 60:
            chunk = connection.recv(256 * 1024)
            assert chunk, "the server closed the connection of a client that was reading"
            received += len(chunk)
            time.sleep(0.02)  # a slow reader, much slower than the server writes, but never idle for 0.5 s
        assert received > BIG_CHUNKS * len(CHUNK)  # the whole body and the chunked framing
