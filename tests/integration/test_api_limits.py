"""Auth, rate limits, body limits and cancellation against real uvicorn servers on the tiny Llama."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from cake_py.api import topology as topology_module
from cake_py.api.http_protocol import HeadTimeoutProtocol
from cake_py.cluster.hostinfo import HostFacts
from cake_py.cluster.stage import LocalStage
from tests.fixtures.cluster import LocalCluster
from tests.fixtures.server import ServerHandle, running_server, tiny_settings

MESSAGES = [{"role": "user", "content": "Tell me about cake."}]


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_api_key_through_the_openai_client(tiny_llama: Path) -> None:
    with running_server(tiny_settings(tiny_llama, api_keys=("sekrit",))) as server:
        with OpenAI(base_url=server.openai_url, api_key="wrong", max_retries=0) as intruder:
            with pytest.raises(openai.AuthenticationError) as refused:
                intruder.chat.completions.create(model="x", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
            assert refused.value.status_code == 401
        with OpenAI(base_url=server.openai_url, api_key="sekrit", max_retries=0) as client:
            completion = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=2, temperature=0)  # type: ignore[arg-type]
            assert completion.usage is not None and completion.usage.completion_tokens == 2
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        native = httpx.post(f"{server.base_url}/generate", json={"prompt": "hi"})
        assert native.status_code == 401
        assert "Bearer" in native.json()["detail"]


def test_rate_limit_through_the_openai_client(tiny_llama: Path) -> None:
    # One a minute: at 60 a minute, two answers (the first one warming the model up) taking a second on a loaded
    # machine refilled the bucket before the third came.
    with running_server(tiny_settings(tiny_llama, rate_limit=1, rate_burst=2)) as server:
        with OpenAI(base_url=server.openai_url, api_key="client-a", max_retries=0) as client:
            for _ in range(2):
                client.completions.create(model="x", prompt="cake", max_tokens=1)
            with pytest.raises(openai.RateLimitError) as limited:
                client.completions.create(model="x", prompt="cake", max_tokens=1)
            # The rest of the minute a request takes to come back, less what the three took
            assert 50 <= int(limited.value.response.headers["retry-after"]) <= 60
            assert [m.id for m in client.models.list()]  # not a generation route: never limited


def test_bodies_over_the_limit_are_refused_unread(tiny_llama: Path) -> None:
    with running_server(tiny_settings(tiny_llama, max_body_bytes=2048)) as server:
        url = f"{server.base_url}/v1/chat/completions"
        declared = httpx.post(url, content=b"x" * 100_000, headers={"content-type": "application/json"})
        assert declared.status_code == 413
        assert declared.json()["error"] == "request body of 100000 bytes is over the limit of 2048 bytes"

        def chunked() -> Iterator[bytes]:
            for _ in range(10):
                yield b" " * 1000

        streamed = httpx.post(
            f"{server.base_url}/chat", content=chunked(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert "over the limit of 2048 bytes" in streamed.json()["detail"]
        assert httpx.post(url, json={"messages": MESSAGES, "max_tokens": 1}).status_code == 200


def test_no_body_limit_also_lifts_the_form_part_limit(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --max-body-bytes 0 turns the limit off; multipart /generate passed the 0 on as a 0-byte part limit.
    # Also: the topology document is built off the event loop (host facts may ask the accelerator).
    loop_threads: list[bool] = []
    real_facts = topology_module.host_facts

    def host_facts(device: str, tflops: float) -> HostFacts:
        try:
            asyncio.get_running_loop()
            loop_threads.append(True)
        except RuntimeError:
            loop_threads.append(False)
        return real_facts(device, tflops)

    monkeypatch.setattr(topology_module, "host_facts", host_facts)
    with running_server(tiny_settings(tiny_llama, max_body_bytes=0)) as server:
        form = {"text": "Hello", "streaming": "false", "model_kwargs": '{"max_output_tokens": 2}'}
        parts = {name: (None, value) for name, value in form.items()}  # multipart fields, as curl -F sends them
        response = httpx.post(f"{server.base_url}/generate", files=parts, timeout=60)
        assert response.status_code == 200, response.text
        assert httpx.get(f"{server.base_url}/api/v1/topology", timeout=10).status_code == 200
    assert loop_threads == [False]


@pytest.fixture
def slow_server(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ServerHandle, list[LocalStage]]]:
    """Every forward pass takes 20 ms more, so a long generation is still running when the client leaves."""
    with running_server(tiny_settings(tiny_llama)) as server:
        assert server.state.engine is not None
        stages = [stage for stage in server.state.engine.pipeline.stages if isinstance(stage, LocalStage)]
        assert stages
        for stage in stages:
            original = stage.forward

            def slowed(*args: object, _original: Callable[..., object] = original) -> object:
                time.sleep(0.02)
                return _original(*args)

            monkeypatch.setattr(stage, "forward", slowed)
        yield server, stages


def test_a_client_leaving_mid_stream_frees_its_kv_cache_on_every_stage(
    slow_server: tuple[ServerHandle, list[LocalStage]],
) -> None:
    server, stages = slow_server
    engine = server.state.engine
    assert engine is not None
    body = {"messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data: ")]
            assert len(received) >= 3
            assert engine.in_flight == 1
            assert all(stage.kv.sequence_ids() for stage in stages)  # live while streaming
        left_at = time.monotonic()
    assert _wait_for(lambda: engine.in_flight == 0 and not any(stage.kv.sequence_ids() for stage in stages))
    assert time.monotonic() - left_at < 5  # the remaining ~400 tokens would take ~8 s more
    assert engine.stats.tokens_generated < 200


def test_a_client_leaving_a_blocking_request_cancels_it(slow_server: tuple[ServerHandle, list[LocalStage]]) -> None:
    server, stages = slow_server
    engine = server.state.engine
    assert engine is not None
    body = {"prompt": "The oven", "max_length": 400, "do_sample": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/generate", json=body, timeout=0.5)
    assert _wait_for(lambda: engine.in_flight == 0 and not any(stage.kv.sequence_ids() for stage in stages))
    assert engine.stats.tokens_generated < 200


def test_a_full_queue_is_a_503_and_shutdown_ends_every_open_stream(
    tiny_llama_long_context: Path, tmp_path: Path
) -> None:
    """A real `cake serve`: one sequence runs, three wait, the fifth request is refused; then SIGTERM. Every open
    stream ends with the engine's error and [DONE] inside the grace period, none is cut mid-chunk."""
    # 1500 tokens (the long-context copy): the running one must not end before the fifth request comes, and a fast
    # machine wrote 400 in well under a second (no step can be slowed in another process).
    body = {"messages": MESSAGES, "max_tokens": 1500, "temperature": 0, "stream": True}
    with LocalCluster(tmp_path) as cluster, httpx.Client(timeout=30) as http:
        master = cluster.serve(str(tiny_llama_long_context), "--max-running", "1", "--max-queue", "3")
        with contextlib.ExitStack() as streams:
            opened = []
            for _ in range(4):
                response = streams.enter_context(http.stream("POST", f"{master.url}/v1/chat/completions", json=body))
                assert response.status_code == 200
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))  # its role chunk: admitted
                opened.append(lines)
            refused = http.post(f"{master.url}/v1/chat/completions", json={**body, "stream": False})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
            assert "--max-queue 3" in refused.json()["error"]
            master.signal(signal.SIGTERM)
            endings = [[line for line in lines if line.startswith("data: ")][-2:] for lines in opened]
        assert master.process is not None  # a clean stop on SIGTERM, as asked, is a success (README)
        assert master.process.wait(timeout=15) == 0, master.stderr[-2000:]
        assert "Traceback" not in master.stderr, master.stderr[-4000:]
    assert all(ending[-1] == "data: [DONE]" for ending in endings), endings
    stopped = [ending for ending in endings if "engine stopped" in ending[0]]
    assert len(stopped) >= 3, endings  # the queued ones at least: they never ran


def _requests_in_progress(server: ServerHandle) -> float:
    """cake_http_requests_in_progress, less the /metrics request that reads it."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith("cake_http_requests_in_progress "))
    return float(line.split()[1]) - 1


def test_a_client_that_stops_reading_its_stream_is_dropped_and_its_request_ends(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that keeps its connection open but reads nothing: once its answer passed what the sockets' buffers
    hold, the server waited for it to read for ever, holding the request, its connection and its unsent events."""
    monkeypatch.setattr(HeadTimeoutProtocol, "write_stall_timeout", 0.5)
    made = HeadTimeoutProtocol.connection_made

    def small_send_buffer(protocol: HeadTimeoutProtocol, transport: asyncio.Transport) -> None:
        # a remote client's connection buffers far less than loopback's, which grows to 4 MB
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        made(protocol, transport)

    monkeypatch.setattr(HeadTimeoutProtocol, "connection_made", small_send_buffer)
    # 400 tokens with 20 alternatives each: about 900 kB of chunks, more than the sockets buffer
    body = {
        "messages": MESSAGES,
        "max_tokens": 400,
        "min_tokens": 400,
        "stream": True,
        "logprobs": True,
        "top_logprobs": 20,
    }
    payload = json.dumps(body).encode()
    with running_server(tiny_settings(tiny_llama)) as server, socket.socket() as reader:
        engine = server.state.engine
        assert engine is not None
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window it offers
        reader.connect(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])))
        reader.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        assert _wait_for(lambda: engine.in_flight == 1)
        # never read: the server drops the connection, which cancels what is left and ends the request
        assert _wait_for(lambda: _requests_in_progress(server) == 0 and engine.in_flight == 0, 60)
        assert (
            httpx.post(f"{server.openai_url}/completions", json={"prompt": "cake", "max_tokens": 2}).status_code == 200
        )
