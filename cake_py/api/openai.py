"""OpenAI-compatible routes: /v1/chat/completions (+ Cake's /api/v1 alias), /v1/completions, /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cake_py.api.errors import ApiError
from cake_py.api.schemas import chat_messages, choice_count, json_body, openai_sampling
from cake_py.api.state import ServerState
from cake_py.api.streaming import SSE_HEADERS, EventStream, sse
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.sampling import SampledToken, SamplingParams
from cake_py.models.tokenizer import Tokenizer


def _ready(request: Request) -> tuple[ServerState, Engine, Tokenizer]:
    state: ServerState = request.app.state.cake
    if state.engine is None or state.source is None:
        raise ApiError(404, "No text model loaded")
    return state, state.engine, state.source.tokenizer


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _seeded(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of n gets seed+i, so n choices differ yet the request stays reproducible."""
    from dataclasses import replace

    return params if params.seed is None or index == 0 else replace(params, seed=params.seed + index)


def _chat_logprobs(tokens: list[SampledToken], tokenizer: Tokenizer) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [
        {**entry(t.token_id, t.logprob or 0.0), "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]}
        for t in tokens
        if t.logprob is not None
    ]


async def _collect(stream: EventStream) -> tuple[str, list[SampledToken], GenerationEvent]:
    text, tokens = [], []
    async for event in stream:
        text.append(event.text)
        tokens.extend(event.tokens)
        if event.finished:
            if event.error:
                raise ApiError(503 if "worker" in event.error or "stage" in event.error else 500, event.error)
            return "".join(text), tokens, event
    raise ApiError(500, "generation ended without a result")


async def chat_completions(request: Request) -> Response:
    state, engine, tokenizer = _ready(request)
    body = await json_body(request)
    messages = chat_messages(body)
    params = openai_sampling(body)
    n = choice_count(body)
    prompt_ids = await run_in_threadpool(tokenizer.encode_chat, messages)
    params = engine.check_prompt(len(prompt_ids), params)
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = state.model_name
    streams = [EventStream(engine, prompt_ids, _seeded(params, i)) for i in range(n)]
    if body.get("stream"):
        return StreamingResponse(
            _chat_stream(streams, completion_id, created, model, tokenizer, params),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    try:
        results = [await _collect(stream) for stream in streams]
    finally:
        for stream in streams:
            stream.cancel()
    choices = []
    for index, (text, tokens, last) in enumerate(results):
        choice: dict[str, Any] = {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": last.finish_reason,
            "logprobs": {"content": _chat_logprobs(tokens, tokenizer)} if params.logprobs else None,
        }
        choices.append(choice)
    completion_tokens = sum(last.completion_tokens for _, _, last in results)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": _usage(len(prompt_ids), completion_tokens),
        }
    )


async def _merged(streams: list[EventStream]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Events of several streams as they come, tagged with the choice index."""
    import asyncio

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


async def _chat_stream(
    streams: list[EventStream],
    completion_id: str,
    created: int,
    model: str,
    tokenizer: Tokenizer,
    params: SamplingParams,
) -> AsyncIterator[str]:
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        if "logprobs" in extra:
            choice["logprobs"] = extra.pop("logprobs")
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
            **extra,
        }

    for index in range(len(streams)):
        yield sse(chunk(index, {"role": "assistant", "content": ""}))
    completion_tokens, prompt_tokens, open_streams = 0, 0, len(streams)
    async for index, event in _merged(streams):
        if event.error:
            yield sse({"error": {"message": event.error, "type": "server_error"}})
            return
        extra: dict[str, Any] = {}
        if params.logprobs and event.tokens:
            extra["logprobs"] = {"content": _chat_logprobs(event.tokens, tokenizer)}
        if event.text or "logprobs" in extra:
            yield sse(chunk(index, {"content": event.text}, **extra))
        if event.finished:
            completion_tokens += event.completion_tokens
            prompt_tokens = event.prompt_tokens
            open_streams -= 1
            finish = "stop" if event.finish_reason == "cancelled" else event.finish_reason
            usage = {"usage": _usage(prompt_tokens, completion_tokens)} if open_streams == 0 else {}
            yield sse(chunk(index, {}, finish, **usage))
    yield sse("[DONE]")


async def completions(request: Request) -> Response:
    state, engine, tokenizer = _ready(request)
    body = await json_body(request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, f"prompt must be a non-empty string, got {prompt!r}")
    params = openai_sampling(body, default_max_tokens=16)
    n = choice_count(body)
    prompt_ids = await run_in_threadpool(tokenizer.encode, prompt)
    params = engine.check_prompt(len(prompt_ids), params)
    completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
    created, model = int(time.time()), state.model_name
    streams = [EventStream(engine, prompt_ids, _seeded(params, i)) for i in range(n)]
    echo = prompt if body.get("echo") else ""

    def legacy_logprobs(tokens: list[SampledToken]) -> dict[str, Any] | None:
        if not params.logprobs:
            return None
        texts = [tokenizer.token_text(t.token_id) for t in tokens]
        return {
            "tokens": texts,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{tokenizer.token_text(i): lp for i, lp in t.top_logprobs} for t in tokens],
            "text_offset": [sum(len(x) for x in texts[:k]) + len(echo) for k in range(len(texts))],
        }

    if body.get("stream"):

        async def stream_chunks() -> AsyncIterator[str]:
            total, open_streams = 0, n
            async for index, event in _merged(streams):
                if event.error:
                    yield sse({"error": {"message": event.error, "type": "server_error"}})
                    return
                finish = None
                if event.finished:
                    total += event.completion_tokens
                    open_streams -= 1
                    finish = "stop" if event.finish_reason == "cancelled" else event.finish_reason
                piece: dict[str, Any] = {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": index, "text": event.text, "finish_reason": finish,
                         "logprobs": legacy_logprobs(event.tokens)}
                    ],
                }  # fmt: skip
                if event.finished and open_streams == 0:
                    piece["usage"] = _usage(len(prompt_ids), total)
                yield sse(piece)
            yield sse("[DONE]")

        return StreamingResponse(stream_chunks(), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        results = [await _collect(stream) for stream in streams]
    finally:
        for stream in streams:
            stream.cancel()
    return JSONResponse(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "text": echo + text, "finish_reason": last.finish_reason,
                 "logprobs": legacy_logprobs(tokens)}
                for i, (text, tokens, last) in enumerate(results)
            ],  # fmt: skip
            "usage": _usage(len(prompt_ids), sum(last.completion_tokens for _, _, last in results)),
        }
    )


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    data = []
    if state.source is not None:
        data.append({"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "cake"})
    return JSONResponse({"object": "list", "data": data})


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/api/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
