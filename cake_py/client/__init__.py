"""Python SDK for a cake_py master: HTTP only (httpx), no torch, so it runs on any machine that can reach the server.

    from cake_py.client import CakeClient

    client = CakeClient("http://127.0.0.1:8080")          # api_key=..., timeout=600.0 (5 s to connect)
    print(client.chat("What is the capital of France?", max_output_tokens=64).text)
    for event in client.stream(text="Tell me a story"):   # NDJSON, one event per chunk
        print(getattr(event, "text", ""), end="", flush=True)

`generate` posts seed 000's multipart form to `POST /generate` and returns a `GenerateResult`, or with `stream=True`
an `EventStream` of `TextChunk` / `ImageChunk` / `AudioChunk`. `generate_image` and `tts` use Cake's
`/v1/images/generations` and `/v1/audio/speech`. An error answer raises the `CakeAPIError` subclass of its status,
carrying the server's message; a server that cannot be reached raises `CakeConnectionError`. `AsyncCakeClient` is
the same API over `httpx.AsyncClient`.

Modules: `errors` (the exception family), `results` (results, stream events, streams), `http` (the two clients).
"""

from cake_py.client.errors import (
    AuthenticationError,
    BadRequestError,
    CakeAPIError,
    CakeClientError,
    CakeConnectionError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    StreamError,
    StreamInterruptedError,
)
from cake_py.client.http import AsyncCakeClient, CakeClient, Media, MediaFile
from cake_py.client.results import (
    AsyncEventStream,
    AudioBuffer,
    AudioChunk,
    EventStream,
    GenerateResult,
    ImageChunk,
    StreamEvent,
    TextChunk,
)

__all__ = [
    "AsyncCakeClient",
    "AsyncEventStream",
    "AudioBuffer",
    "AudioChunk",
    "AuthenticationError",
    "BadRequestError",
    "CakeAPIError",
    "CakeClient",
    "CakeClientError",
    "CakeConnectionError",
    "EventStream",
    "GenerateResult",
    "ImageChunk",
    "InternalServerError",
    "Media",
    "MediaFile",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServiceUnavailableError",
    "StreamError",
    "StreamEvent",
    "StreamInterruptedError",
    "TextChunk",
]
