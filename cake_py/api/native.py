"""Seed 001's native JSON routes: /generate (SSE when `stream`), /chat, /generate/batch. Errors are `{"detail": …}`.

`/generate` also takes seed 000's multipart form: the route dispatches on Content-Type to `multipart`.
Streams send one JSON object per event, `data: {"text": "<delta>"}`, a last one with `finish_reason` and `usage`,
then `data: [DONE]`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api import multipart
from cake_py.api.errors import ApiError, api_error
from cake_py.api.middleware import request_key_name
from cake_py.api.schemas import chat_messages, flag, native_sampling, string_list, text_field
from cake_py.api.state import ServerState, generation_request
from cake_py.api.streaming import (
    EventStream,
    GenerationResponse,
    Result,
    collect_all,
    event_error,
    merged,
    open_streams,
    sse,
    usage,
)
from cake_py.engine.engine import Engine
from cake_py.errors import CakeError
from cake_py.models.hub import ModelSource
from cake_py.models.sampling import SamplingParams

MAX_BATCH = 64


def check_model_id(body: dict[str, Any], state: ServerState, source: ModelSource) -> None:
    """`model_id` may name the served model (or be null); another model must be loaded with /models/load first."""
    model_id = body.get("model_id")
    if model_id is not None and not isinstance(model_id, str):
        raise ApiError(400, f"model_id must be a string (the served model's name or id) or null, got {model_id!r}")
    if model_id is None or model_id in (state.model_name, source.model_id, state.settings.model):
        return
    raise ApiError(404, f"model {model_id!r} is not loaded (serving {state.model_name!r}); load it with /models/load")


async def _prepare(request: Request) -> tuple[ServerState, Engine, ModelSource, dict[str, Any]]:
    state, engine, source, body = await generation_request(request)
    check_model_id(body, state, source)
    return state, engine, source, body


async def _native_stream(request: Request, stream: EventStream) -> AsyncIterator[str]:
    async for _, event in merged([stream]):
        if event.error:
            yield sse({"detail": event_error(event, request.url.path).message})
            break  # seed 001: [DONE] marks the end of every stream
        if event.text:
            yield sse({"text": event.text})
        if event.finished:
            yield sse(
                {
                    "text": "",
                    "finish_reason": "stop" if event.finish_reason == "cancelled" else event.finish_reason,
                    "usage": usage(event.prompt_tokens, event.completion_tokens),
                }
            )
    yield sse("[DONE]")


async def generate(request: Request) -> Response:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return await multipart.generate_form(request)
    # `curl -d '{…}'` without -H labels a JSON body as a form: a body that opens like a JSON object is read as one.
    if media_type == "application/x-www-form-urlencoded" and not (await request.body()).lstrip().startswith(b"{"):
        return await multipart.generate_form(request)
    state, engine, source, body = await _prepare(request)
    prompt = text_field(body, "prompt")
    params, stream = native_sampling(body), flag(body, "stream", False)
    prompt_ids = await run_in_threadpool(source.tokenizer.encode, prompt)
    return await _one_generation(
        request, state, engine, prompt_ids, params, stream,
        lambda result: {"response": result.text, "finish_reason": result.last.finish_reason},
    )  # fmt: skip


async def chat(request: Request) -> Response:
    state, engine, source, body = await _prepare(request)
    messages = chat_messages(body)
    params, stream = native_sampling(body), flag(body, "stream", False)
    prompt_ids = await run_in_threadpool(source.tokenizer.encode_chat, messages)
    return await _one_generation(
        request, state, engine, prompt_ids, params, stream,
        lambda result: {
            "choices": [
                {
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.last.finish_reason,
                }
            ]
        },
    )  # fmt: skip


async def _one_generation(
    request: Request,
    state: ServerState,
    engine: Engine,
    prompt_ids: list[int],
    params: SamplingParams,
    stream: bool,
    answer: Callable[[Result], dict[str, Any]],
) -> Response:
    """Run one prompt: an SSE stream, or `answer(result)` with `usage` as JSON."""
    params = engine.check_prompt(len(prompt_ids), params)
    streams = open_streams(state, engine, [prompt_ids], [params], request_key_name(request))
    if stream:
        return GenerationResponse(_native_stream(request, streams[0]), streams, "text/event-stream")
    (result,) = await collect_all(request, streams)
    return JSONResponse({**answer(result), "usage": usage(len(prompt_ids), result.last.completion_tokens)})


def _prompt_error(index: int, error: CakeError, path: str) -> ApiError:
    return ApiError(api_error(error, path).status, f"prompts[{index}]: {error}")


def _encode_each(source: ModelSource, prompts: list[str], path: str) -> list[list[int]]:
    """Every prompt's tokens; one the tokenizer refuses (far too long to count) is named by its index."""
    encoded = []
    for index, prompt in enumerate(prompts):
        try:
            encoded.append(source.tokenizer.encode(prompt))
        except CakeError as error:
            raise _prompt_error(index, error, path) from error
    return encoded


async def generate_batch(request: Request) -> Response:
    """Every prompt is submitted before any is awaited, so the engine batches them together."""
    state, engine, source, body = await _prepare(request)
    prompts = string_list(body, "prompts", max_items=MAX_BATCH)
    if flag(body, "stream", False):  # silently answered whole, it looked like a stream that never started
        raise ApiError(400, "stream is not supported on /generate/batch: its answer is one JSON document")
    params = native_sampling(body)
    prompt_ids = await run_in_threadpool(_encode_each, source, prompts, request.url.path)
    per_prompt = []
    for index, ids in enumerate(prompt_ids):
        try:
            per_prompt.append(engine.check_prompt(len(ids), params))
        except CakeError as error:
            raise _prompt_error(index, error, request.url.path) from error
    results = await collect_all(request, open_streams(state, engine, prompt_ids, per_prompt, request_key_name(request)))
    return JSONResponse(
        {
            "responses": [result.text for result in results],
            "finish_reasons": [result.last.finish_reason for result in results],
            "usage": usage(sum(map(len, prompt_ids)), sum(result.last.completion_tokens for result in results)),
        }
    )


ROUTES = [
    Route("/generate", generate, methods=["POST"]),
    Route("/chat", chat, methods=["POST"]),
    Route("/generate/batch", generate_batch, methods=["POST"]),
]
