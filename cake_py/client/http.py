"""`CakeClient` and `AsyncCakeClient`: requests to a cake_py master over httpx, answers as SDK types.

`generate` sends seed 000's multipart form to `POST /generate` (always multipart/form-data: values as parts without
a filename, media as file parts named for their modality); images and speech use Cake's own routes.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast, overload

import httpx

from cake_py.client.errors import CakeClientError, api_error, connection_error
from cake_py.client.results import AsyncEventStream, AudioBuffer, EventStream, GenerateResult, parse_result

# As the OpenAI client: 10 minutes for an answer (a long generation, blocking), 5 s to connect (a host that is down
# fails at once, not after ten minutes). A float sets every phase alike.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)

MediaFile = str | os.PathLike[str] | bytes | bytearray | memoryview | tuple[str, bytes]
Media = MediaFile | Sequence[MediaFile]
_DEFAULT_NAMES = {"image": "image.png", "audio": "audio.wav", "video": "video.mp4"}


def _media_files(media: Media | None, kind: str) -> list[tuple[str, bytes]]:
    """A path, raw bytes, a (filename, bytes) tuple, or a list of those → (filename, bytes) uploads."""
    if media is None:
        return []
    is_pair = isinstance(media, tuple) and len(media) == 2 and isinstance(media[1], bytes | bytearray | memoryview)
    one = isinstance(media, str | bytes | bytearray | memoryview | os.PathLike)
    items: Sequence[Any] = [media] if one or is_pair else cast(Sequence[Any], media)
    files = []
    for item in items:
        if isinstance(item, bytes | bytearray | memoryview):
            files.append((_DEFAULT_NAMES[kind], bytes(item)))
        elif isinstance(item, tuple):
            files.append((str(item[0]), bytes(item[1])))
        else:
            path = Path(item)
            files.append((path.name, path.read_bytes()))
    return files


def _modalities(value: str | Sequence[str]) -> str:
    return value if isinstance(value, str) else ",".join(value)


def _generate_form(
    text: str | None,
    media: Mapping[str, Media | None],
    output_modalities: str | Sequence[str],
    input_modalities: str | Sequence[str] | None,
    stream: bool,
    request_id: str | None,
    model_kwargs: Mapping[str, Any],
) -> list[tuple[str, tuple[str | None, bytes | str]]]:
    """Seed 000's multipart fields, always sent as multipart/form-data (values as parts without a filename)."""
    fields: dict[str, str | None] = {
        "text": text,
        "output_modalities": _modalities(output_modalities),
        "input_modalities": None if input_modalities is None else _modalities(input_modalities),
        "streaming": "true" if stream else "false",
        "request_id": request_id,
    }
    kwargs = {key: value for key, value in model_kwargs.items() if value is not None}
    if kwargs:
        fields["model_kwargs"] = json.dumps(kwargs)
    form: list[tuple[str, tuple[str | None, bytes | str]]] = [
        (name, (None, value)) for name, value in fields.items() if value is not None
    ]
    for kind, value in media.items():
        form += [("files", (name, content)) for name, content in _media_files(value, kind)]
    return form


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as error:
        raise CakeClientError(f"{response.request.url.path} answered non-JSON: {response.text[:200]!r}") from error


def _document(response: httpx.Response) -> dict[str, Any]:
    body = _json(response)
    if not isinstance(body, dict):
        raise CakeClientError(f"{response.request.url.path} answered {type(body).__name__}, expected an object")
    return body


def _image_bytes(response: httpx.Response) -> bytes:
    """Cake answers raw PNG by default, or OpenAI's `{"data": [{"b64_json": …}]}`."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return response.content
    try:
        return base64.b64decode(_json(response)["data"][0]["b64_json"])
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise CakeClientError(f"malformed image answer ({error}): {response.text[:200]!r}") from error


def _refuse_chat_stream(stream: bool) -> None:
    """`chat` is blocking by its type; a stream is `stream(text=...)`'s (which returns an event stream)."""
    if stream:
        raise TypeError("chat() is blocking and returns a GenerateResult; for a stream use stream(text=...)")


def _json_body(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class _ClientBase:
    def __init__(self, base_url: str, api_key: str | None, ui_auth: tuple[str, str] | None) -> None:
        self.base_url = base_url.rstrip("/")
        # A key travels in a header: printable ASCII without spaces, as the server's --api-key takes it. Anything
        # else failed each request later, as a bare UnicodeEncodeError or as "cannot reach the cake server".
        if api_key and not all("!" <= char <= "~" for char in api_key):
            raise ValueError("api_key must be printable ASCII without spaces (as the server's --api-key)")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # The UI routes (topology) take HTTP Basic when the server runs with --ui-auth; it replaces the key there.
        self._ui_headers: dict[str, str] = {}
        if ui_auth is not None:
            token = base64.b64encode(f"{ui_auth[0]}:{ui_auth[1]}".encode()).decode("ascii")
            self._ui_headers = {"Authorization": f"Basic {token}"}


class CakeClient(_ClientBase):
    """Blocking client. `api_key` is the server's `--api-key`; `ui_auth` its `--ui-auth` (for `topology()`)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        *,
        ui_auth: tuple[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, ui_auth)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout, transport=transport)

    def _send(
        self, method: str, path: str, *, stream: bool = False, accept: tuple[int, ...] = (), **kwargs: Any
    ) -> httpx.Response:
        request = self._http.build_request(method, path, **kwargs)
        try:
            response = self._http.send(request, stream=stream)
            if response.is_error and response.status_code not in accept:
                response.read()
                response.close()
                raise api_error(response)
        except httpx.TransportError as error:
            raise connection_error(self.base_url, error) from error
        return response

    @overload
    def generate(
        self,
        *,
        text: str | None = ...,
        images: Media | None = ...,
        audio: Media | None = ...,
        video: Media | None = ...,
        output_modalities: str | Sequence[str] = ...,
        input_modalities: str | Sequence[str] | None = ...,
        stream: Literal[False] = ...,
        request_id: str | None = ...,
        **model_kwargs: Any,
    ) -> GenerateResult: ...
    @overload
    def generate(
        self,
        *,
        text: str | None = ...,
        images: Media | None = ...,
        audio: Media | None = ...,
        video: Media | None = ...,
        output_modalities: str | Sequence[str] = ...,
        input_modalities: str | Sequence[str] | None = ...,
        stream: Literal[True],
        request_id: str | None = ...,
        **model_kwargs: Any,
    ) -> EventStream: ...
    def generate(
        self,
        *,
        text: str | None = None,
        images: Media | None = None,
        audio: Media | None = None,
        video: Media | None = None,
        output_modalities: str | Sequence[str] = ("text",),
        input_modalities: str | Sequence[str] | None = None,
        stream: bool = False,
        request_id: str | None = None,
        **model_kwargs: Any,
    ) -> GenerateResult | EventStream:
        """Seed 000's `POST /generate`. Extra keyword arguments are the model's `model_kwargs` (`temperature`,
        `max_output_tokens`, `seed`, `stop`, `system`, …); None values are dropped."""
        media = {"image": images, "audio": audio, "video": video}
        form = _generate_form(text, media, output_modalities, input_modalities, stream, request_id, model_kwargs)
        response = self._send("POST", "/generate", files=form, stream=stream)
        return EventStream(response, self.base_url) if stream else parse_result(_json(response))

    def chat(
        self,
        text: str,
        *,
        images: Media | None = None,
        audio: Media | None = None,
        stream: Literal[False] = False,
        **model_kwargs: Any,
    ) -> GenerateResult:
        """One user message through the model's chat template (`system=` sets a system prompt); blocking, as its
        type says (`stream=True` is a TypeError: use `stream(text=...)`)."""
        _refuse_chat_stream(stream)
        return self.generate(text=text, images=images, audio=audio, stream=False, **model_kwargs)

    def stream(
        self,
        *,
        text: str | None = None,
        images: Media | None = None,
        audio: Media | None = None,
        video: Media | None = None,
        output_modalities: str | Sequence[str] = ("text",),
        input_modalities: str | Sequence[str] | None = None,
        request_id: str | None = None,
        **model_kwargs: Any,
    ) -> EventStream:
        """`generate(..., stream=True)`."""
        return self.generate(
            text=text,
            images=images,
            audio=audio,
            video=video,
            output_modalities=output_modalities,
            input_modalities=input_modalities,
            request_id=request_id,
            stream=True,
            **model_kwargs,
        )

    def generate_image(self, prompt: str, **kwargs: Any) -> bytes:
        """PNG bytes from `POST /v1/images/generations` (a `NotFoundError` while no image model is loaded)."""
        return _image_bytes(self._send("POST", "/v1/images/generations", json=_json_body({"prompt": prompt, **kwargs})))

    def tts(self, text: str, *, voice: str | None = None, **kwargs: Any) -> AudioBuffer:
        """Speech from `POST /v1/audio/speech` (a `NotFoundError` while no audio model is loaded)."""
        body = _json_body({"input": text, "voice": voice, "response_format": "wav", **kwargs})
        return AudioBuffer.from_wav(self._send("POST", "/v1/audio/speech", json=body).content)

    def topology(self) -> dict[str, Any]:
        """`GET /api/v1/topology`: model, master, workers, their layers and live figures."""
        return _document(self._send("GET", "/api/v1/topology", headers=self._ui_headers))

    def health(self) -> dict[str, Any]:
        """`GET /health`; the document also when the server answers 503 (`status` says why: a stage down…)."""
        return _document(self._send("GET", "/health", accept=(503,)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CakeClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncCakeClient(_ClientBase):
    """`CakeClient` over `httpx.AsyncClient`: the same methods, awaited; streams are `AsyncEventStream`s."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        *,
        ui_auth: tuple[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, ui_auth)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=timeout, transport=transport
        )

    async def _send(
        self, method: str, path: str, *, stream: bool = False, accept: tuple[int, ...] = (), **kwargs: Any
    ) -> httpx.Response:
        request = self._http.build_request(method, path, **kwargs)
        try:
            response = await self._http.send(request, stream=stream)
            if response.is_error and response.status_code not in accept:
                await response.aread()
                await response.aclose()
                raise api_error(response)
        except httpx.TransportError as error:
            raise connection_error(self.base_url, error) from error
        return response

    @overload
    async def generate(
        self,
        *,
        text: str | None = ...,
        images: Media | None = ...,
        audio: Media | None = ...,
        video: Media | None = ...,
        output_modalities: str | Sequence[str] = ...,
        input_modalities: str | Sequence[str] | None = ...,
        stream: Literal[False] = ...,
        request_id: str | None = ...,
        **model_kwargs: Any,
    ) -> GenerateResult: ...
    @overload
    async def generate(
        self,
        *,
        text: str | None = ...,
        images: Media | None = ...,
        audio: Media | None = ...,
        video: Media | None = ...,
        output_modalities: str | Sequence[str] = ...,
        input_modalities: str | Sequence[str] | None = ...,
        stream: Literal[True],
        request_id: str | None = ...,
        **model_kwargs: Any,
    ) -> AsyncEventStream: ...
    async def generate(
        self,
        *,
        text: str | None = None,
        images: Media | None = None,
        audio: Media | None = None,
        video: Media | None = None,
        output_modalities: str | Sequence[str] = ("text",),
        input_modalities: str | Sequence[str] | None = None,
        stream: bool = False,
        request_id: str | None = None,
        **model_kwargs: Any,
    ) -> GenerateResult | AsyncEventStream:
        """See `CakeClient.generate`."""
        media = {"image": images, "audio": audio, "video": video}
        form = _generate_form(text, media, output_modalities, input_modalities, stream, request_id, model_kwargs)
        response = await self._send("POST", "/generate", files=form, stream=stream)
        return AsyncEventStream(response, self.base_url) if stream else parse_result(_json(response))

    async def chat(
        self,
        text: str,
        *,
        images: Media | None = None,
        audio: Media | None = None,
        stream: Literal[False] = False,
        **model_kwargs: Any,
    ) -> GenerateResult:
        _refuse_chat_stream(stream)
        return await self.generate(text=text, images=images, audio=audio, stream=False, **model_kwargs)

    async def stream(
        self,
        *,
        text: str | None = None,
        images: Media | None = None,
        audio: Media | None = None,
        video: Media | None = None,
        output_modalities: str | Sequence[str] = ("text",),
        input_modalities: str | Sequence[str] | None = None,
        request_id: str | None = None,
        **model_kwargs: Any,
    ) -> AsyncEventStream:
        return await self.generate(
            text=text,
            images=images,
            audio=audio,
            video=video,
            output_modalities=output_modalities,
            input_modalities=input_modalities,
            request_id=request_id,
            stream=True,
            **model_kwargs,
        )

    async def generate_image(self, prompt: str, **kwargs: Any) -> bytes:
        body = _json_body({"prompt": prompt, **kwargs})
        return _image_bytes(await self._send("POST", "/v1/images/generations", json=body))

    async def tts(self, text: str, *, voice: str | None = None, **kwargs: Any) -> AudioBuffer:
        body = _json_body({"input": text, "voice": voice, "response_format": "wav", **kwargs})
        return AudioBuffer.from_wav((await self._send("POST", "/v1/audio/speech", json=body)).content)

    async def topology(self) -> dict[str, Any]:
        return _document(await self._send("GET", "/api/v1/topology", headers=self._ui_headers))

    async def health(self) -> dict[str, Any]:
        return _document(await self._send("GET", "/health", accept=(503,)))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncCakeClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
