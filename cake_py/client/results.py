"""What the SDK returns: `GenerateResult`, `AudioBuffer`, the stream events, and the streams that yield them.

A blocking `/generate` answer is `{request_id, outputs: {text|image|audio: [{data: <base64>, metadata}]}}`; a stream
is NDJSON, one `{request_id, modality, data: <base64>, metadata, done?}` per line, or `{request_id, error}` when the
generation fails after the answer started.
"""

from __future__ import annotations

import base64
import io
import json
import os
import wave
from collections.abc import AsyncGenerator, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from cake_py.client.errors import CakeClientError, StreamError, stream_interrupted

if TYPE_CHECKING:
    import numpy
    import numpy.typing

DEFAULT_SAMPLE_RATE = 24_000  # Cake's TTS rate; seed 000's base64 PCM carries its own in metadata
PCM_SAMPLE_BYTES = 2  # signed 16-bit little-endian


@dataclass
class AudioBuffer:
    """Decoded PCM audio: signed 16-bit little-endian samples, interleaved by channel. `len()` counts frames."""

    pcm: bytes
    sample_rate: int = DEFAULT_SAMPLE_RATE
    channels: int = 1

    def __len__(self) -> int:
        return len(self.pcm) // (PCM_SAMPLE_BYTES * self.channels)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self) / self.sample_rate

    def to_wav(self, path: str | os.PathLike[str] | None = None) -> bytes:
        """The audio as a WAV file's bytes; written to `path` too when given."""
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as out:
            out.setnchannels(self.channels)
            out.setsampwidth(PCM_SAMPLE_BYTES)
            out.setframerate(self.sample_rate)
            out.writeframes(self.pcm)
        data = buffer.getvalue()
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def to_numpy(self) -> numpy.typing.NDArray[numpy.int16]:
        """Samples as int16, shape (frames,) for mono or (frames, channels). Needs numpy."""
        import numpy

        samples = numpy.frombuffer(self.pcm, dtype="<i2").astype(numpy.int16)
        return samples if self.channels == 1 else samples.reshape(-1, self.channels)

    @classmethod
    def from_wav(cls, data: bytes) -> AudioBuffer:
        """Parse a 16-bit PCM WAV file."""
        try:
            with wave.open(io.BytesIO(data), "rb") as source:
                if source.getsampwidth() != PCM_SAMPLE_BYTES:
                    raise CakeClientError(f"WAV audio has {8 * source.getsampwidth()}-bit samples, expected 16-bit")
                return cls(source.readframes(source.getnframes()), source.getframerate(), source.getnchannels())
        except (wave.Error, EOFError) as error:
            raise CakeClientError(f"the server's audio is not a WAV file: {error}") from error


@dataclass
class GenerateResult:
    """A blocking `/generate` answer: `text` (all text outputs joined), `images` (PNG bytes), `audio`, and `raw`."""

    request_id: str
    text: str
    images: list[bytes]
    audio: AudioBuffer | None
    raw: dict[str, Any]

    @property
    def metadata(self) -> dict[str, Any]:
        """Metadata of the text output: `finish_reason`, `usage`, `model`."""
        items = self.raw.get("outputs", {}).get("text") or [{}]
        return dict(items[0].get("metadata") or {})

    @property
    def finish_reason(self) -> str | None:
        return self.metadata.get("finish_reason")

    @property
    def usage(self) -> dict[str, int]:
        return dict(self.metadata.get("usage") or {})

    def save_image(self, path: str | os.PathLike[str], index: int = 0) -> Path:
        if index >= len(self.images):
            raise CakeClientError(f"the result has {len(self.images)} image(s), no image #{index}")
        target = Path(path)
        target.write_bytes(self.images[index])
        return target

    def save_audio(self, path: str | os.PathLike[str]) -> Path:
        if self.audio is None:
            raise CakeClientError("the result has no audio (ask for output_modalities=('audio',))")
        self.audio.to_wav(path)
        return Path(path)


@dataclass(frozen=True)
class TextChunk:
    """A text delta. The last event of a stream has `done=True` and `metadata` {finish_reason, usage}."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    request_id: str | None = None


@dataclass(frozen=True)
class ImageChunk:
    """An image (PNG bytes) from a stream."""

    data: bytes
    metadata: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    request_id: str | None = None

    def save(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        target.write_bytes(self.data)
        return target


@dataclass(frozen=True)
class AudioChunk:
    """A piece of 16-bit PCM audio from a stream."""

    pcm: bytes
    sample_rate: int = DEFAULT_SAMPLE_RATE
    metadata: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    request_id: str | None = None


StreamEvent = TextChunk | ImageChunk | AudioChunk


def _decode(item: dict[str, Any]) -> bytes:
    return base64.b64decode(item.get("data") or "", validate=True)


def parse_result(body: Any) -> GenerateResult:
    """A blocking multipart `/generate` answer → `GenerateResult` (text outputs are base64 UTF-8)."""
    try:
        outputs = body.get("outputs") or {}
        text = "".join(_decode(item).decode("utf-8") for item in outputs.get("text") or [])
        images = [_decode(item) for item in outputs.get("image") or []]
        audio_items = outputs.get("audio") or []
        audio = None
        if audio_items:
            rate = int((audio_items[0].get("metadata") or {}).get("sample_rate", DEFAULT_SAMPLE_RATE))
            audio = AudioBuffer(b"".join(_decode(item) for item in audio_items), rate)
    except (AttributeError, TypeError, ValueError) as error:
        raise CakeClientError(f"the server's /generate answer is malformed ({error}): {str(body)[:200]}") from error
    return GenerateResult(str(body.get("request_id", "")), text, images, audio, body)


def parse_stream_line(line: str | bytes) -> StreamEvent | None:
    """One NDJSON line → an event; None for blank lines and modalities this SDK does not know."""
    if not line.strip():
        return None
    try:
        item = json.loads(line)
        request_id = item.get("request_id")
        if "error" in item:
            raise StreamError(str(item["error"]), request_id)
        data = _decode(item)
        metadata = dict(item.get("metadata") or {})
        done = bool(item.get("done", False))
        modality = item.get("modality", "text")
        if modality == "text":
            return TextChunk(data.decode("utf-8"), metadata, done, request_id)
        if modality == "image":
            return ImageChunk(data, metadata, done, request_id)
        if modality == "audio":
            rate = int(metadata.get("sample_rate", DEFAULT_SAMPLE_RATE))
            return AudioChunk(data, rate, metadata, done, request_id)
    except (AttributeError, TypeError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError included
        raise CakeClientError(f"malformed stream line ({error}): {line[:200]!r}") from error
    return None


class LineSplitter:
    """NDJSON lines out of byte chunks, split at b"\\n" only. httpx's `iter_lines` splits like `str.splitlines`,
    which also breaks a line at U+2028, U+0085 and other separators that JSON strings may hold raw."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        return lines

    def end(self) -> list[bytes]:
        rest, self._pending = self._pending, b""
        return [rest] if rest.strip() else []


class EventStream:
    """The events of one streamed generation, read as they arrive. Closing it early (or leaving its `with` block)
    disconnects, and the server then cancels the generation."""

    def __init__(self, response: httpx.Response, base_url: str) -> None:
        self._response = response
        # A function of the response, not a method: a generator holding `self` would make a cycle, and a stream
        # dropped after a `break` would stay open, generating, until the cycle collector ran.
        self._events = _read_events(response, base_url)

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()
        self._response.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncEventStream:
    """`EventStream` for `AsyncCakeClient`: iterate with `async for`; `aclose()` or `async with` to stop early."""

    def __init__(self, response: httpx.Response, base_url: str) -> None:
        self._response = response
        self._events = _aread_events(response, base_url)  # not a method, as in EventStream

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> StreamEvent:
        return await anext(self._events)

    async def aclose(self) -> None:
        await self._events.aclose()
        await self._response.aclose()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _parsed(lines: Iterable[bytes]) -> Iterator[StreamEvent]:
    """The events of whole lines, one at a time (an error line raises after the events before it are out)."""
    return (event for line in lines if (event := parse_stream_line(line)) is not None)


class _Progress:
    """What a stream has shown so far: its request id, and whether its last event (done) came."""

    def __init__(self) -> None:
        self.request_id: str | None = None
        self.done = False

    def saw(self, event: StreamEvent) -> StreamEvent:
        self.request_id = event.request_id or self.request_id
        self.done = self.done or event.done
        return event


def _read_events(response: httpx.Response, base_url: str) -> Generator[StreamEvent, None, None]:
    lines, progress = LineSplitter(), _Progress()
    try:
        for chunk in response.iter_bytes():
            yield from map(progress.saw, _parsed(lines.feed(chunk)))
        yield from map(progress.saw, _parsed(lines.end()))
    except httpx.TransportError as error:  # the server died, went quiet, or a proxy cut the connection
        raise stream_interrupted(base_url, error, progress.request_id) from error
    finally:
        response.close()
    if not progress.done:  # a connection closed cleanly before the end: the answer is cut short, not complete
        raise stream_interrupted(base_url, None, progress.request_id)


async def _aread_events(response: httpx.Response, base_url: str) -> AsyncGenerator[StreamEvent, None]:
    lines, progress = LineSplitter(), _Progress()
    try:
        async for chunk in response.aiter_bytes():
            for event in _parsed(lines.feed(chunk)):
                yield progress.saw(event)
        for event in _parsed(lines.end()):
            yield progress.saw(event)
    except httpx.TransportError as error:
        raise stream_interrupted(base_url, error, progress.request_id) from error
    finally:
        await response.aclose()
    if not progress.done:
        raise stream_interrupted(base_url, None, progress.request_id)
