"""The error seam: a bug in a route is a JSON 500 that keeps the client's keep-alive connection usable."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from cake_py.api.errors import EXCEPTION_HANDLERS, api_error
from cake_py.api.json_body import json_body
from cake_py.api.middleware import BodyLimitMiddleware
from cake_py.errors import ClusterError, KVMemoryError, OverloadedError, RequestError
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


async def _echo(request: Request) -> Response:
    return JSONResponse(await json_body(request))


def test_a_client_that_leaves_while_sending_is_no_error(
    tiny_state: TinyState, caplog: pytest.LogCaptureFixture
) -> None:
    """It used to be a 500 with two tracebacks in the log, and counted as one."""
    caplog.set_level(logging.INFO)
    with serving(tiny_state(None)) as server:
        server.app.router.routes.append(Route("/v1/echo", _echo, methods=["POST"]))
        port = int(server.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b'POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{"partial":')
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while "left before its request was sent" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "left before its request was sent" in caplog.text
        assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        assert 'status="499"' in metrics and 'status="500"' not in metrics


def test_a_body_that_stops_arriving_is_a_408() -> None:
    app = Starlette(
        routes=[Route("/v1/echo", _echo, methods=["POST"])],
        middleware=[Middleware(BodyLimitMiddleware, max_bytes=0, read_timeout=0.2)],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
    )

    async def stalls() -> AsyncIterator[bytes]:
        yield b'{"a": '
        await asyncio.sleep(30)  # far past the bound below: a 2 s stall left a loaded machine's client 1.5 s to start
        yield b"1}"

    async def send(content: object) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/echo", content=content)  # type: ignore[arg-type]

    began = time.monotonic()
    answer = asyncio.run(send(stalls()))
    assert answer.status_code == 408 and time.monotonic() - began < 10
    assert answer.headers["connection"] == "close"  # the rest of that body would be read as the next request
    assert answer.json() == {"error": "the request body stopped arriving: nothing came for 0.2 s"}
    assert asyncio.run(send(b'{"a": 1}')).json() == {"a": 1}  # a body that comes in time is read


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (ClusterError("worker 'w1' died"), "5"),
        (OverloadedError("full"), "5"),
        (KVMemoryError(f"{KVMemoryError.MARK}: …"), "5"),  # the master's own stage; a worker's is a ClusterError
        (RequestError("x"), None),
    ],
)
def test_an_answer_to_retry_says_when(error: Exception, retry: str | None) -> None:
    """A request in flight when a worker died gets the same Retry-After as one refused while it is down."""
    assert isinstance(error, ClusterError | OverloadedError | RequestError | KVMemoryError)
    headers = api_error(error, "/v1/chat/completions").headers or {}
    assert headers.get("Retry-After") == retry


def test_a_full_disk_is_a_507_saying_so_and_other_os_errors_a_500() -> None:
    async def full(request: Request) -> Response:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/files/file-1")

    async def other(request: Request) -> Response:
        raise PermissionError(errno.EACCES, "Permission denied")

    app = Starlette(
        routes=[Route("/v1/files", full, methods=["POST"]), Route("/v1/other", other)],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/v1/files")
        assert answer.status_code == 507
        assert answer.json() == {"error": "the server's disk is full: nothing was stored; retry once space is freed"}
        assert client.get("/v1/other").status_code == 500


def test_request_bodies_in_flight_have_a_byte_budget() -> None:
    """Each request holds its body until it is answered: past the budget a new one is a 503 with Retry-After, whether
    its length is declared or not, until answered requests give their bytes back. Uploads are not counted."""
    read, release = asyncio.Event(), asyncio.Event()

    async def held(request: Request) -> Response:
        body = await json_body(request)
        read.set()
        await release.wait()  # a request waiting for a slot, holding its body
        return JSONResponse(body)

    app = Starlette(
        routes=[Route("/v1/held", held, methods=["POST"]), Route("/v1/echo", _echo, methods=["POST"])],
        middleware=[Middleware(BodyLimitMiddleware, max_bytes=0, overrides={"/v1/echo": 0}, in_flight_bytes=100)],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
    )
    padded = {"a": "x" * 60}  # 71 bytes

    async def chunks() -> AsyncIterator[bytes]:  # no declared length
        yield b'{"b": "'
        yield b"y" * 40 + b'"}'

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            first = asyncio.create_task(client.post("/v1/held", json=padded))
            await asyncio.wait_for(read.wait(), 10)  # the first request read its body and waits in its handler
            # Answered at once: without the budget they would wait for the release with the first one.
            declared = await asyncio.wait_for(client.post("/v1/held", json=padded), 10)
            streamed = await asyncio.wait_for(client.post("/v1/held", content=chunks()), 10)
            upload = await client.post("/v1/echo", json=padded)  # another path's own limit: not counted
            release.set()
            return [await first, declared, streamed, upload, await client.post("/v1/held", json=padded)]

    first, declared, streamed, upload, after = asyncio.run(scenario())
    assert first.status_code == 200 and first.json() == padded
    for refused in (declared, streamed):
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "bytes of request bodies being answered, its limit of 100" in refused.json()["error"]
    assert upload.status_code == 200
    assert after.status_code == 200  # the first one's bytes were given back


def test_a_request_whose_kv_caches_find_no_memory_is_a_503_saying_so(
    tiny_llama: Path, tiny_state: TinyState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone on a host without room for its first caches, it cannot wait for anyone: 503, with why and Retry-After."""
    import torch

    from cake_py.api.app import create_app
    from cake_py.cluster.pipeline import local_pipeline
    from cake_py.engine.engine import Engine
    from cake_py.models import kv_pool
    from cake_py.models.hub import resolve_model

    source = resolve_model(str(tiny_llama))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer)
    monkeypatch.setattr(kv_pool, "host_memory", lambda: (1 << 40, 1 << 10))  # 1 KiB free
    monkeypatch.setattr(kv_pool, "KEEP_FREE_BYTES", 0)
    with TestClient(create_app(tiny_state(engine))) as client:
        answer = client.post("/v1/completions", json={"prompt": "The oven", "max_tokens": 5})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert answer.json()["error"].startswith(f"{KVMemoryError.MARK}: ")
