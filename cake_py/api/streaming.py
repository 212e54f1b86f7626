"""Bridge from the engine thread to asyncio: one stream per sequence, collecting, merging, and the wire framings.

Leaving a stream early (client gone, task cancelled) cancels its sequence, which frees its KV caches on every
stage. Blocking routes watch for the client going away too, so an abandoned request stops generating.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from cake_py.api.errors import ApiError, api_error
from cake_py.api.keepalive import KeepAliveResponse
from cake_py.api.state import ServerState
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.sampling import SampledToken, SamplingParams

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer": only ever seen in metrics


class EventStream:
    """Receives one sequence's events on the engine thread and yields them on the event loop."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        params: SamplingParams,
        on_first_token: Callable[[float], None] | None = None,
        share_prefill_with: int | None = None,
        on_last: Callable[[GenerationEvent], None] | None = None,
    ) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.finished = False
        self.on_first_token = on_first_token
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None  # perf_counter when its first token came
        # Sees each event before it is yielded and may end the stream early (returns it finished): its sequence
        # then leaves the engine. (/infill's editor limits.)
        self.limit: Callable[[GenerationEvent], GenerationEvent] | None = None
        self.on_last = on_last  # sees the sequence's last event, on the engine thread (usage by key)
        self.seq_id = engine.submit(
            prompt_ids, params, self._sink, queue_checked=True, share_prefill_with=share_prefill_with
        )  # the room was checked by open_streams, for the whole request

    def _sink(self, event: GenerationEvent) -> None:
        if event.finished and self.on_last is not None:
            self.on_last(event)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        try:
            while True:
                event = await self.queue.get()
                if self.first_token_at is None and event.tokens:
                    self.first_token_at = time.perf_counter()
                if self.on_first_token is not None and event.tokens:
                    self.on_first_token(time.perf_counter() - self.submitted)
                    self.on_first_token = None
                if self.limit is not None:  # the last event too: its text may hold what the limit cuts
                    limited = self.limit(event)
                    if limited.finished and not event.finished:  # ended here, not by the engine: its sequence goes
                        self.finished = True
                        self.engine.cancel(self.seq_id)
                        yield limited
                        return
                    event = limited
                if event.finished:  # before the yield: a reader that stops at the last event never resumes us
                    self.finished = True
                yield event
                if event.finished:
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.cancel(self.seq_id)


def open_streams(
    state: ServerState,
    engine: Engine,
    prompts: list[list[int]],
    params: list[SamplingParams],
    key: str = "",
    choices: int = 1,
) -> list[EventStream]:
    """Submit every prompt at once (they batch together in the engine); no await between the check and the submit.
    `key`: the API key's name its usage is counted under (middleware.request_key_name; "" with one key or none);
    `choices`: each prompt comes this many times in a row (n > 1), and its tokens count once, as usage counts them."""
    state.still_serving(engine)
    engine.check_room(len(prompts))  # the whole request, not sequence by sequence: it must not crowd itself out
    metrics = state.metrics
    observe = metrics.observe_first_token if metrics else None
    on_last = metrics.key_usage(key, prompts[::choices]) if metrics and key else None
    streams: list[EventStream] = []
    first_with: dict[tuple[int, ...], int] = {}  # a prompt → the sequence that prefills it for the others (n > 1)
    try:
        with engine.submitting():  # they start together, in one step
            for prompt_ids, sampling in zip(prompts, params, strict=True):
                shared = tuple(prompt_ids)
                stream = EventStream(engine, prompt_ids, sampling, observe, first_with.get(shared), on_last)
                first_with.setdefault(shared, stream.seq_id)
                streams.append(stream)
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


@dataclass
class Result:
    """A finished generation: its text, its sampled tokens (for logprobs) and its last event."""

    text: str
    tokens: list[SampledToken]
    last: GenerationEvent
    prompt_logprobs: list[SampledToken] | None = None  # asked for with SamplingParams.prompt_logprobs


def event_error(event: GenerationEvent, path: str) -> ApiError:
    """The honest status of a failed generation: the engine's exception, mapped at the one seam in errors.py."""
    if event.exception is not None:
        return api_error(event.exception, path)
    return ApiError(500, event.error or "generation failed")


async def collect(stream: EventStream, path: str) -> Result:
    text: list[str] = []
    tokens: list[SampledToken] = []
    prompt_logprobs = None
    async for event in stream:
        text.append(event.text)
        tokens.extend(event.tokens)
        if event.prompt_logprobs is not None:  # an empty list is an answer too: a one-token prompt
            prompt_logprobs = event.prompt_logprobs
        if event.finished:
            if event.error:
                raise event_error(event, path)
            return Result("".join(text), tokens, event, prompt_logprobs)
    raise ApiError(500, "generation ended without a result")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read, so the next message says so)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_all(request: Request, streams: list[EventStream]) -> list[Result]:
    """Every stream's result, in order; the first failure fails them all, and a client that leaves cancels them."""
    path = request.url.path
    tasks = [asyncio.ensure_future(collect(stream, path)) for stream in streams]
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            for done in tasks:
                if done.done() and (error := done.exception()) is not None:
                    raise error
            if all(task.done() for task in tasks):
                return [task.result() for task in tasks]
            if watcher.done():
                raise ApiError(CLIENT_CLOSED, "the client closed the connection")
            running = [task for task in tasks if not task.done()]
            await asyncio.wait([*running, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, watcher, return_exceptions=True)
        for stream in streams:
            stream.cancel()


async def merged(streams: list[EventStream]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Events of several streams as they come, tagged with the stream's index."""
    iterators = [stream.__aiter__() for stream in streams]
    pending = {asyncio.ensure_future(anext(it)): index for index, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                yield index, event
                if not event.finished:
                    pending[asyncio.ensure_future(anext(iterators[index]))] = index
    finally:
        for task in pending:
            task.cancel()
        for stream in streams:
            stream.cancel()


class GenerationResponse(KeepAliveResponse):
    """A streamed answer that cancels its sequences however it ends, even when the client leaves before the
    first chunk (then the body's generator never starts, so its own cleanup never runs). An SSE answer keeps its
    connection alive while it is silent (keepalive); NDJSON has no line a reader would skip."""

    def __init__(
        self,
        content: AsyncIterator[str],
        streams: list[EventStream],
        media_type: str,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        headers = SSE_HEADERS if media_type == "text/event-stream" else {"Cache-Control": "no-cache"}
        super().__init__(content, media_type=media_type, headers=headers)
        self.streams = streams
        self.on_close = on_close
        if media_type != "text/event-stream":
            self.keepalive = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.streams:
                stream.cancel()
            if self.on_close is not None:
                self.on_close()


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int | None = None,
    predicted: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """OpenAI's usage; with `cached_tokens`, its `prompt_tokens_details` (prompt tokens the prefix cache gave); with
    `predicted` (a request's predicted output), its `completion_tokens_details`: the accepted and rejected tokens."""
    counts: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        counts["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if predicted is not None:
        accepted, rejected = predicted
        counts["completion_tokens_details"] = {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": rejected,
        }
    return counts


# Line breaks to `str.splitlines` (so to many clients' line readers) that JSON leaves raw inside strings when it does
# not escape non-ASCII; escaping just these keeps every event on its one line and the rest of the text readable.
_RAW_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_line(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).translate(_RAW_LINE_BREAKS)


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else _json_line(data)
    return f"data: {payload}\n\n"


def ndjson(data: dict[str, Any]) -> str:
    return _json_line(data) + "\n"
