"""The Python SDK (`cake_py.client`): what it sends and how it reads answers, against httpx mock transports, then
against a real server on a tiny model (blocking, streaming, typed errors, auth, the async twin)."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import subprocess
import sys
import wave
from collections.abc import Callable, Iterator
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import httpx
import pytest

from cake_py.client import (
    AsyncCakeClient,
    AudioBuffer,
    AudioChunk,
    AuthenticationError,
    BadRequestError,
    CakeAPIError,
    CakeClient,
    CakeClientError,
    CakeConnectionError,
    ImageChunk,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    StreamError,
    StreamEvent,
    TextChunk,
)
from tests.fixtures.server import ServerHandle, running_server, tiny_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
Handler = Callable[[httpx.Request], httpx.Response]


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _client(handler: Handler, **kwargs: Any) -> CakeClient:
    return CakeClient("http://cake.test", transport=httpx.MockTransport(handler), **kwargs)


def _parts(request: httpx.Request) -> list[Message]:
    """The multipart/form-data parts of a request, parsed by the standard library."""
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data")
    document = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + request.read())
    return [part for part in document.iter_parts() if isinstance(part, Message)]


def _payload(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def _fields(request: httpx.Request) -> dict[str, str]:
    return {
        str(part.get_param("name", header="content-disposition")): _payload(part).decode()
        for part in _parts(request)
        if part.get_filename() is None
    }


def _wav(pcm: bytes, rate: int = 16_000) -> bytes:
    return AudioBuffer(pcm, rate).to_wav()


ANSWER = {
    "request_id": "r1",
    "outputs": {
        "text": [{"data": _b64("Paris"), "metadata": {"finish_reason": "stop", "usage": {"total_tokens": 3}}}],
        "image": [{"data": _b64(b"\x89PNG-1"), "metadata": {}}],
        "audio": [
            {"data": _b64(b"\x01\x00\x02\x00"), "metadata": {"sample_rate": 8000}},
            {"data": _b64(b"\x03\x00"), "metadata": {}},
        ],
    },
}


# ---------------------------------------------------------------- without a server


def test_importing_the_sdk_does_not_import_torch() -> None:
    code = "import sys, cake_py.client; assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_generate_sends_seed_000s_multipart_form_and_drops_none() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ANSWER)

    with _client(handler, api_key="sekret") as client:
        client.generate(text="Hi", temperature=0.5, top_k=None, stop=["\n"], request_id="abc")
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/generate")
    assert request.headers["authorization"] == "Bearer sekret"
    fields = _fields(request)
    assert json.loads(fields.pop("model_kwargs")) == {"temperature": 0.5, "stop": ["\n"]}
    assert fields == {"text": "Hi", "output_modalities": "text", "streaming": "false", "request_id": "abc"}


def test_generate_without_kwargs_sends_no_model_kwargs_and_names_modalities() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ANSWER)

    _client(handler).generate(text="Hi", output_modalities=["text", "audio"], input_modalities="text")
    assert _fields(seen[0]) == {
        "text": "Hi",
        "output_modalities": "text,audio",
        "input_modalities": "text",
        "streaming": "false",
    }


def test_media_is_uploaded_as_files_from_paths_bytes_and_pairs(tmp_path: Path) -> None:
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(b"jpeg-bytes")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ANSWER)

    _client(handler).generate(text="What is this?", images=[photo, b"png-bytes"], audio=("hi.mp3", b"mp3"), video=b"v")
    _client(handler).generate(text="And this?", images=bytearray(b"raw"), audio=memoryview(b"pcm"))
    files = [
        (part.get_param("name", header="content-disposition"), part.get_filename(), _payload(part))
        for part in _parts(seen[0])
        if part.get_filename() is not None
    ]
    assert files == [
        ("files", "cat.jpg", b"jpeg-bytes"),
        ("files", "image.png", b"png-bytes"),
        ("files", "hi.mp3", b"mp3"),
        ("files", "video.mp4", b"v"),
    ]
    second = [(part.get_filename(), _payload(part)) for part in _parts(seen[1]) if part.get_filename() is not None]
    assert second == [("image.png", b"raw"), ("audio.wav", b"pcm")]


def test_a_blocking_answer_becomes_a_generate_result(tmp_path: Path) -> None:
    result = _client(lambda request: httpx.Response(200, json=ANSWER)).chat("Capital of France?")
    assert (result.request_id, result.text, result.finish_reason) == ("r1", "Paris", "stop")
    assert result.usage == {"total_tokens": 3}
    assert result.images == [b"\x89PNG-1"] and result.raw == ANSWER
    assert result.audio is not None and (result.audio.sample_rate, len(result.audio)) == (8000, 3)
    assert result.save_image(tmp_path / "out.png").read_bytes() == b"\x89PNG-1"
    with wave.open(str(result.save_audio(tmp_path / "out.wav"))) as saved:
        assert (saved.getframerate(), saved.getnframes()) == (8000, 3)
    with pytest.raises(CakeClientError, match="no image #1"):
        result.save_image(tmp_path / "missing.png", index=1)


def test_a_text_only_result_has_no_audio_to_save(tmp_path: Path) -> None:
    answer = {"request_id": "r", "outputs": {"text": [{"data": _b64("é"), "metadata": {}}]}}
    result = _client(lambda request: httpx.Response(200, json=answer)).generate(text="x")
    assert (result.text, result.images, result.audio, result.finish_reason) == ("é", [], None, None)
    with pytest.raises(CakeClientError, match="no audio"):
        result.save_audio(tmp_path / "out.wav")


def _ndjson(*items: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def test_a_stream_yields_typed_events_from_ndjson_lines() -> None:
    body = _ndjson(
        {"request_id": "s", "modality": "text", "data": _b64("Hel"), "metadata": {}},
        {"request_id": "s", "modality": "text", "data": _b64("lo"), "metadata": {}},
        {"request_id": "s", "modality": "image", "data": _b64(b"png"), "metadata": {}},
        {"request_id": "s", "modality": "audio", "data": _b64(b"\x00\x00"), "metadata": {"sample_rate": 16000}},
        {"request_id": "s", "modality": "hologram", "data": "", "metadata": {}},
        {"request_id": "s", "modality": "text", "data": "", "metadata": {"finish_reason": "stop"}, "done": True},
    )
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=body, headers={"content-type": "application/x-ndjson"})

    events = list(_client(handler).stream(text="Hi", max_output_tokens=4))
    assert _fields(seen[0])["streaming"] == "true"
    assert events == [
        TextChunk("Hel", {}, False, "s"),
        TextChunk("lo", {}, False, "s"),
        ImageChunk(b"png", {}, False, "s"),
        AudioChunk(b"\x00\x00", 16000, {"sample_rate": 16000}, False, "s"),
        TextChunk("", {"finish_reason": "stop"}, True, "s"),
    ]


def test_a_stream_left_after_a_break_closes_its_connection_at_once() -> None:
    """Its reader was a method: the generator held the stream, a cycle, so a `for … break` without `with` left the
    connection open (and the server generating) until the cycle collector ran."""
    chunk = _ndjson({"request_id": "r", "modality": "text", "data": _b64("a"), "metadata": {}})
    handler = lambda request: httpx.Response(200, content=iter([chunk] * 1000))  # noqa: E731
    gc.disable()
    try:
        stream = _client(handler).stream(text="Hi")
        response = stream._response
        for _ in stream:
            break
        del stream
        assert response.is_closed

        async def read_one() -> httpx.Response:
            async def body() -> Any:
                for _ in range(1000):
                    yield chunk

            client = AsyncCakeClient(
                "http://cake.test", transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body()))
            )
            stream = await client.generate(text="Hi", stream=True)
            response = stream._response
            async for _ in stream:
                break
            del stream
            await asyncio.sleep(0.05)  # the loop runs the dropped generator's aclose
            return response

        assert asyncio.run(read_one()).is_closed
    finally:
        gc.enable()


def test_an_error_line_in_a_stream_raises_stream_error() -> None:
    body = _ndjson(
        {"request_id": "s", "modality": "text", "data": _b64("a"), "metadata": {}},
        {"request_id": "s", "error": "pipeline stage 'worker-1' failed"},
    )
    stream = _client(lambda request: httpx.Response(200, content=body)).generate(text="Hi", stream=True)
    assert next(stream) == TextChunk("a", {}, False, "s")
    with pytest.raises(StreamError, match="worker-1") as caught:
        next(stream)
    assert caught.value.request_id == "s"


def _cut_stream(request: httpx.Request, error: httpx.TransportError | None) -> Iterator[bytes]:
    """A body that sends one text event, then fails with `error` (or ends cleanly, when None) before its done."""
    yield _ndjson({"request_id": "s", "modality": "text", "data": _b64("a"), "metadata": {}})
    if error is not None:
        raise error


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (httpx.RemoteProtocolError("peer closed connection without sending complete message body"), "broke"),
        (httpx.ReadTimeout(""), "went quiet: ReadTimeout: timed out"),
        (None, "ended before its last event"),
    ],
    ids=["server died", "server went quiet", "closed before done"],
)
def test_a_stream_cut_midway_is_a_stream_error_not_an_unreachable_server(
    error: httpx.TransportError | None, needle: str
) -> None:
    """A server killed mid-stream raised CakeConnectionError "cannot reach the cake server" (it had been reached), not
    the StreamError the README promises for a failure in the middle of a stream; one whose connection closed cleanly
    before the done event ended the iteration as if the answer were whole."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_cut_stream(request, error))

    stream = _client(handler).stream(text="Hi")
    assert next(stream) == TextChunk("a", {}, False, "s")
    with pytest.raises(StreamError, match=needle) as caught:
        next(stream)
    assert isinstance(caught.value, CakeConnectionError)  # also what it was before, for code that caught that
    assert "cannot reach" not in str(caught.value) and caught.value.request_id == "s"

    async def read_async() -> list[StreamEvent]:
        async def body() -> Any:
            for chunk in _cut_stream(httpx.Request("POST", "http://cake.test"), error):
                yield chunk

        client = AsyncCakeClient(
            "http://cake.test", transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body()))
        )
        return [event async for event in await client.stream(text="Hi")]

    with pytest.raises(StreamError, match=needle):
        asyncio.run(read_async())


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        json.dumps({"modality": "text", "data": _b64(b"\xff\xfe")}).encode(),  # not UTF-8 text
        json.dumps({"modality": "audio", "data": "", "metadata": {"sample_rate": "fast"}}).encode(),
    ],
)
def test_a_malformed_stream_line_is_a_client_error(line: bytes) -> None:
    stream = _client(lambda request: httpx.Response(200, content=line + b"\n")).stream(text="Hi")
    with pytest.raises(CakeClientError, match="malformed stream line"):
        list(stream)


def test_stream_lines_split_only_at_newlines_whatever_the_chunks() -> None:
    """JSON strings may hold U+2028, U+0085… raw; str.splitlines (httpx's iter_lines) would cut the line there."""
    odd = "a\u2028b\x85c\u2029d"
    body = (
        _ndjson(
            {"request_id": odd, "modality": "text", "data": _b64(odd), "metadata": {}},
            {"request_id": odd, "modality": "text", "data": "", "metadata": {}, "done": True},
        )
        .replace(b"\\u2028", "\u2028".encode())
        .replace(b"\\u0085", "\x85".encode())
    )
    assert "\u2028".encode() in body
    chunks = [body[index : index + 7] for index in range(0, len(body), 7)]
    handler = lambda request: httpx.Response(200, content=iter(chunks))  # noqa: E731
    expected = [TextChunk(odd, {}, False, odd), TextChunk("", {}, True, odd)]
    assert list(_client(handler).stream(text="Hi")) == expected

    async def read_async() -> list[Any]:
        async def body_chunks() -> Any:
            for chunk in chunks:
                yield chunk

        client = AsyncCakeClient(
            "http://cake.test", transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body_chunks()))
        )
        return [event async for event in await client.generate(text="Hi", stream=True)]

    assert asyncio.run(read_async()) == expected


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (404, NotFoundError),
        (413, PayloadTooLargeError),
        (429, RateLimitError),
        (500, InternalServerError),
        (503, ServiceUnavailableError),
        (418, CakeAPIError),
    ],
)
@pytest.mark.parametrize("key", ["error", "detail"])
def test_error_answers_become_typed_exceptions(status: int, kind: type[CakeAPIError], key: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={key: "the message", "code": "some_code"}, headers={"Retry-After": "7"})

    with pytest.raises(kind) as caught:
        _client(handler).generate(text="Hi")
    error = caught.value
    assert type(error) is kind
    assert (error.status_code, error.message, error.code) == (status, "the message", "some_code")
    assert error.retry_after == 7.0
    assert str(error) == f"HTTP {status}: the message"


def test_openai_shaped_and_non_json_errors_keep_their_message() -> None:
    def openai_style(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "too long", "code": "context_length_exceeded"}})

    with pytest.raises(BadRequestError) as caught:
        _client(openai_style).generate(text="Hi")
    assert (caught.value.message, caught.value.code) == ("too long", "context_length_exceeded")
    with pytest.raises(InternalServerError, match="HTTP 500: <html>oops</html>") as plain:
        _client(lambda request: httpx.Response(500, text="<html>oops</html>")).generate(text="Hi")
    assert plain.value.retry_after is None


def test_a_streamed_request_raises_its_error_before_iteration() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"detail": "text must be a non-empty prompt, got ''"})

    with pytest.raises(BadRequestError, match="non-empty prompt"):
        _client(handler).generate(text="", stream=True)


def test_an_unreachable_server_is_a_connection_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(CakeConnectionError, match=r"cannot reach the cake server at http://cake.test"):
        _client(handler).health()


def test_a_server_that_goes_quiet_is_a_timeout_not_unreachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("", request=request)  # as httpx's async client raises it: no message

    with pytest.raises(CakeConnectionError, match=r"did not answer in time: ReadTimeout: timed out$"):
        _client(handler).health()


def test_connecting_has_its_own_short_timeout_unless_one_figure_is_given() -> None:
    """As the OpenAI client: a host that is down fails after 5 s, an answer may take 10 minutes."""
    seen: list[dict[str, float]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"status": "healthy"})

    CakeClient("http://cake.test", transport=httpx.MockTransport(handler)).health()
    CakeClient("http://cake.test", timeout=30, transport=httpx.MockTransport(handler)).health()
    assert (seen[0]["connect"], seen[0]["read"]) == (5.0, 600.0)
    assert (seen[1]["connect"], seen[1]["read"]) == (30, 30)


def test_chat_is_blocking_whatever_its_keywords_say() -> None:
    """chat("hi", stream=True) returned an EventStream where its type (and the README) promise a GenerateResult."""
    client = _client(lambda request: httpx.Response(200, json=ANSWER))
    refusal = r"chat\(\) is blocking and returns a GenerateResult; for a stream use stream\(text=\.\.\.\)"
    with pytest.raises(TypeError, match=refusal):
        client.chat("Hi", stream=True)  # type: ignore[call-overload, arg-type]
    async_client = AsyncCakeClient("http://cake.test", transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    with pytest.raises(TypeError, match=refusal):
        asyncio.run(async_client.chat("Hi", stream=True))  # type: ignore[arg-type]
    assert client.chat("Hi", stream=False).text == "Paris"


@pytest.mark.parametrize("key", ["ключ", "a\nb", "two words"])
def test_an_api_key_no_header_can_carry_is_refused_when_the_client_is_made(key: str) -> None:
    """It failed each request instead: a bare UnicodeEncodeError, or a CakeConnectionError "cannot reach"."""
    for kind in (CakeClient, AsyncCakeClient):
        with pytest.raises(ValueError, match="api_key must be printable ASCII without spaces") as caught:
            kind("http://cake.test", api_key=key)
        assert key not in str(caught.value)


def test_health_returns_the_document_also_when_unhealthy_and_topology_uses_ui_auth() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/health":
            return httpx.Response(503, json={"status": "unhealthy", "running": False})
        return httpx.Response(200, json={"model": "m", "workers": []})

    client = _client(handler, api_key="k", ui_auth=("admin", "pw"))
    assert client.health() == {"status": "unhealthy", "running": False}
    assert client.topology() == {"model": "m", "workers": []}
    assert seen[0].headers["authorization"] == "Bearer k"
    assert seen[1].headers["authorization"] == f"Basic {_b64('admin:pw')}"
    with pytest.raises(InternalServerError):
        _client(lambda request: httpx.Response(500, json={"error": "boom"})).health()


def test_generate_image_reads_raw_png_or_b64_json() -> None:
    seen: list[httpx.Request] = []

    def raw(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"\x89PNG", headers={"content-type": "image/png"})

    assert _client(raw).generate_image("a cake", size=None, n=1) == b"\x89PNG"
    assert (seen[0].url.path, json.loads(seen[0].content)) == ("/v1/images/generations", {"prompt": "a cake", "n": 1})
    envelope = {"created": 1, "data": [{"b64_json": _b64(b"\x89PNG2")}]}
    assert _client(lambda request: httpx.Response(200, json=envelope)).generate_image("x") == b"\x89PNG2"


def test_tts_posts_to_the_speech_route_and_decodes_wav() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=_wav(b"\x01\x00\x02\x00", 24_000), headers={"content-type": "audio/wav"})

    audio = _client(handler).tts("hello", voice="tara")
    assert json.loads(seen[0].content) == {"input": "hello", "voice": "tara", "response_format": "wav"}
    assert (audio.pcm, audio.sample_rate, len(audio)) == (b"\x01\x00\x02\x00", 24_000, 2)
    with pytest.raises(CakeClientError, match="not a WAV"):
        _client(lambda request: httpx.Response(200, content=b"garbage")).tts("hello")


def test_audio_buffer_round_trips_through_wav_and_numpy(tmp_path: Path) -> None:
    audio = AudioBuffer(b"\x01\x00\xff\xff\x03\x00\x04\x00", 8000, channels=2)
    assert (len(audio), audio.duration) == (2, 2 / 8000)
    assert AudioBuffer.from_wav(audio.to_wav(tmp_path / "a.wav")) == audio
    assert (tmp_path / "a.wav").read_bytes() == audio.to_wav()
    assert audio.to_numpy().tolist() == [[1, -1], [3, 4]]


def test_the_async_client_sends_and_reads_the_same() -> None:
    body = _ndjson(
        {"request_id": "s", "modality": "text", "data": _b64("ok"), "metadata": {}},
        {"request_id": "s", "modality": "text", "data": "", "metadata": {"finish_reason": "stop"}, "done": True},
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/audio/speech":
            return httpx.Response(404, json={"error": "No audio model loaded"})
        if _fields(request)["streaming"] == "true":
            return httpx.Response(200, content=body)
        return httpx.Response(200, json=ANSWER)

    async def scenario() -> tuple[str, list[str]]:
        async with AsyncCakeClient("http://cake.test", transport=httpx.MockTransport(handler)) as client:
            result = await client.chat("Hi")
            async with await client.stream(text="Hi") as stream:
                texts = [event.text async for event in stream if isinstance(event, TextChunk)]
            with pytest.raises(NotFoundError, match="No audio model loaded"):
                await client.tts("hi")
            return result.text, texts

    assert asyncio.run(scenario()) == ("Paris", ["ok", ""])


# ---------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama)) as handle:
        yield handle


@pytest.fixture
def client(server: ServerHandle) -> Iterator[CakeClient]:
    with CakeClient(server.base_url, timeout=60) as sdk:
        yield sdk


def test_live_chat_and_stream_agree_under_greedy_decoding(client: CakeClient) -> None:
    result = client.chat("Hello", max_output_tokens=5, do_sample=False)
    assert result.finish_reason == "length" and result.usage["completion_tokens"] == 5
    assert result.metadata["model"] == "llama"
    with client.stream(text="Hello", max_output_tokens=5, do_sample=False, request_id="live-1") as events:
        received = list(events)
    assert all(isinstance(event, TextChunk) and event.request_id == "live-1" for event in received)
    assert "".join(event.text for event in received if isinstance(event, TextChunk)) == result.text
    assert received[-1].done and received[-1].metadata["usage"] == result.usage


def test_live_errors_are_typed_with_the_servers_message(client: CakeClient) -> None:
    with pytest.raises(NotFoundError, match="No image model loaded") as image:
        client.generate_image("a cake")
    assert image.value.status_code == 404
    with pytest.raises(NotFoundError, match="No audio model loaded"):
        client.tts("hello", voice="tara")
    with pytest.raises(BadRequestError, match="'unknown_knob'"):
        client.generate(text="Hi", unknown_knob=1)
    with pytest.raises(BadRequestError, match="image input 'photo.png'"):
        client.generate(text="Hi", images=("photo.png", b"\x89PNG"))


def test_live_health_and_topology(client: CakeClient) -> None:
    health = client.health()
    assert (health["status"], health["running"], health["model"]) == ("healthy", True, "llama")
    topology = client.topology()
    assert topology["model"] == "llama" and topology["workers"] == []
    assert len(topology["master"]["layers"]) == topology["num_layers"]


def test_live_closing_a_stream_early_leaves_the_server_serving(client: CakeClient) -> None:
    with client.stream(text="Tell me a story", max_output_tokens=200) as events:
        first = next(events)
    assert isinstance(first, TextChunk)
    # Sampled from random weights, the end token may come first: what matters is that the server still answers.
    assert client.chat("Hi", max_output_tokens=2, do_sample=False).usage["completion_tokens"] in (1, 2)


def test_live_async_client(server: ServerHandle) -> None:
    async def scenario() -> tuple[str, str]:
        async with AsyncCakeClient(server.base_url, timeout=60) as client:
            result = await client.chat("Hello", max_output_tokens=4, do_sample=False)
            stream = await client.generate(text="Hello", max_output_tokens=4, do_sample=False, stream=True)
            streamed = "".join([event.text async for event in stream if isinstance(event, TextChunk)])
            return result.text, streamed

    blocking, streamed = asyncio.run(scenario())
    assert blocking == streamed


def test_live_api_key_is_sent_as_a_bearer_token(tiny_llama: Path) -> None:
    with running_server(tiny_settings(tiny_llama, api_keys=("sekret",))) as keyed:
        with CakeClient(keyed.base_url) as anonymous, CakeClient(keyed.base_url, api_key="wrong") as wrong:
            with pytest.raises(AuthenticationError, match="HTTP 401"):
                anonymous.chat("Hi", max_output_tokens=1)
            with pytest.raises(AuthenticationError):
                wrong.topology()
            assert anonymous.health()["status"] == "healthy"  # /health never needs the key
        with CakeClient(keyed.base_url, api_key="sekret") as client:
            assert client.chat("Hi", max_output_tokens=1).usage["completion_tokens"] == 1
