"""OpenAI-compatible routes: /v1/chat/completions (+ Cake's /api/v1 alias) and /v1/models (completions.py: the rest).

Streams follow Cake's chunk sequence: a role chunk per choice, content deltas, a finish chunk per choice (the last
one carries `usage`), then `data: [DONE]`. With `stream_options.include_usage` they follow OpenAI's instead: no chunk
carries usage but one more, `"choices": []`, just before `data: [DONE]` (`false`: none at all).
`usage.prompt_tokens` counts tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.chat_store import ChatFold
from cake_py.api.errors import ApiError
from cake_py.api.forced_calls import CallDelta
from cake_py.api.llama_sampler_fields import openai_llama_sampling
from cake_py.api.middleware import request_key_name, request_owner
from cake_py.api.reasoning import ReasoningStream, is_reasoning_template, opens_thinking, split_reasoning
from cake_py.api.schemas import (
    chat_messages,
    chat_template_options,
    choice_count,
    cut_prompt,
    flag,
    metadata_field,
    openai_sampling,
    predicted_output,
    prompt_cut,
    stream_usage,
)
from cake_py.api.state import ServerState, chat_tokenizer, context_length, generation_request
from cake_py.api.streaming import (
    EventStream,
    GenerationResponse,
    collect_all,
    event_error,
    merged,
    open_streams,
    sse,
    usage,
)
from cake_py.api.structured import compiled_grammar, structured_grammar
from cake_py.api.tool_stream import ToolStream
from cake_py.api.tools import ToolRequest, calls_grammar, parse_answer, prompt_messages, tool_request
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.sampling import SampledToken, SamplingParams
from cake_py.models.tokenizer import Tokenizer


def seeded(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of n gets seed+i, so n choices differ yet the request stays reproducible."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=(params.seed + index) % 2**64)  # a seed near 2**64 wraps around


def finish_reason(reason: str | None) -> str:
    return "stop" if reason in (None, "cancelled") else reason


def _call_finish(called: bool, reason: str | None, cut: bool = False) -> str:
    """`tool_calls` for an answer that calls tools, unless it was cut short, so that a call may be partial: by
    max_tokens (`length`), or (`cut`) by a stop string or token inside forced calls (`stop`; stop_reason names it)."""
    return "tool_calls" if called and reason != "length" and not cut else finish_reason(reason)


def reject_unsupported(body: dict[str, Any]) -> None:
    """Refuse what would otherwise be silently ignored and give an answer of another kind than asked for."""
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise ApiError(400, f"top_logprobs ({body['top_logprobs']!r}) needs logprobs: true")


def _predicted(params: SamplingParams, events: list[GenerationEvent]) -> tuple[int, int] | None:
    """The usage's accepted and rejected prediction tokens over a request's choices; None without a prediction."""
    if params.prediction is None:
        return None
    return sum(e.accepted_prediction_tokens for e in events), sum(e.rejected_prediction_tokens for e in events)


def usage_chunk(completion_id: str, kind: str, created: int, model: str, usage_: dict[str, Any]) -> str:
    """OpenAI's usage chunk (stream_options.include_usage): no choices, just before `data: [DONE]`."""
    return sse(
        {"id": completion_id, "object": kind, "created": created, "model": model, "choices": [], "usage": usage_}
    )


def chat_logprobs(tokens: list[SampledToken], tokenizer: Tokenizer) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(tokenizer.token_bytes(token_id))}

    return [
        {**entry(t.token_id, t.logprob or 0.0), "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]}
        for t in tokens
        if t.logprob is not None
    ]


def stream_error(error: ApiError) -> str:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return sse({"error": {"message": error.message, "type": kind, "code": error.code or error.status}})


async def chat_completions(request: Request) -> Response:
    state, engine, source, body = await generation_request(request)
    reject_unsupported(body)
    tokenizer = await chat_tokenizer(state.settings, source.tokenizer, body)
    messages = await run_in_threadpool(chat_messages, body)  # a chat of 100,000 messages is a second of Python
    store = flag(body, "store", False)  # OpenAI's stored completions (chat_store.py)
    metadata = metadata_field(body.get("metadata"))
    template = chat_template_options(body, messages)
    tools = tool_request(body, tokenizer.tool_call_id_length)
    params = openai_sampling(body, vocab_size=engine.vocab_size)
    params = await openai_llama_sampling(params, body, source.tokenizer)  # DRY's breakers: the model's vocabulary
    grammar = await structured_grammar(body, tokenizer)
    if tools.forced and grammar is not None:
        raise ApiError(400, f"tool_choice {tools.choice!r} writes calls, so it cannot be combined with a format")
    if tools.active:  # compiled under auto too: a tool whose schema cannot hold is a 400 whatever the model does
        calls = await compiled_grammar(lambda: calls_grammar(tools), tokenizer, "tools")
        grammar = calls if tools.forced else grammar
    prediction = await run_in_threadpool(predicted_output, body, tokenizer, engine.vocab_size, engine.context_length)
    params = replace(params, grammar=grammar, prediction=prediction)
    n = choice_count(body)
    stream = flag(body, "stream", False)
    include_usage = stream_usage(body, stream)
    if flag(body, "echo", False):  # vLLM's chat echo (the last message repeated in the answer): refused, not ignored
        raise ApiError(400, "echo is not supported on chat completions (it is a /v1/completions field)")
    messages, tool_variables = await run_in_threadpool(prompt_messages, messages, tools, tokenizer.reads_tools)
    cut = prompt_cut(body, engine.context_length)
    prompt_text, prompt_ids = await run_in_threadpool(
        tokenizer.chat_prompt,
        messages,
        add_generation_prompt=template.add_generation_prompt,
        continue_final_message=template.continue_final_message,
        template_kwargs={**template.kwargs, **tool_variables},
        check=cut is None,  # a prompt to be cut is not refused for its length first: only what is kept must fit
    )
    prompt_ids = cut_prompt(prompt_ids, cut)  # its start goes, template tokens too, as vLLM cuts it
    params = engine.check_prompt(len(prompt_ids), params)
    # A reasoning model's thinking goes to reasoning_content; None: not one (its text is all content).
    continued = messages[-1]["content"] if template.continue_final_message else None
    reasoning_model = is_reasoning_template(tokenizer.chat_template) and not grammar
    thinking = opens_thinking(prompt_text, continued) if reasoning_model else None
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created, model = int(time.time()), state.model_name
    streams = open_streams(
        state, engine, [prompt_ids] * n, [seeded(params, i) for i in range(n)], request_key_name(request), n
    )

    def keep(completion: dict[str, Any]) -> None:
        state.chat_completions.put(completion, body["messages"], metadata, request_owner(request))

    if stream:
        chunks = _chat_stream(
            request,
            streams,
            completion_id,
            created,
            model,
            tokenizer,
            params,
            include_usage,
            tools,
            thinking,
            keep if store else None,
        )
        return GenerationResponse(chunks, streams, "text/event-stream")
    results = await collect_all(request, streams)

    def built() -> dict[str, Any]:
        choices = []
        for index, result in enumerate(results):
            reasoning, text = split_reasoning(result.text, thinking) if thinking is not None else (None, result.text)
            answer = parse_answer(text or "", tools)
            message: dict[str, Any] = {"role": "assistant", "content": answer.content if text is not None else None}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if answer.tool_calls:
                message["tool_calls"] = answer.tool_calls
            cut = tools.forced and result.last.stop_reason is not None  # the stop text went, and the call with it
            finish = _call_finish(bool(answer.tool_calls), result.last.finish_reason, cut)
            logprobs = {"content": chat_logprobs(result.tokens, tokenizer)} if params.logprobs else None
            choice = {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}
            choices.append({**choice, "stop_reason": result.last.stop_reason})  # vLLM's: the stop string or token id
        completion = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage(
                len(prompt_ids),
                sum(result.last.completion_tokens for result in results),
                max(result.last.cached_tokens for result in results),
                _predicted(params, [result.last for result in results]),
            ),
        }
        return completion

    # In a thread: the logprobs of 8 choices of 1,500 tokens with 20 alternatives each are seconds of Python, which
    # on the event loop stalled every other client's stream
    completion = await run_in_threadpool(built)
    if store:
        keep(completion)
    return JSONResponse(completion)


async def _chat_stream(
    request: Request,
    streams: list[EventStream],
    completion_id: str,
    created: int,
    model: str,
    tokenizer: Tokenizer,
    params: SamplingParams,
    include_usage: bool | None,
    tools: ToolRequest,
    thinking: bool | None,
    keep: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[str]:
    """The chunks; with `keep` (store: true), the completion they make up is handed to it once every choice ended."""
    fold = ChatFold() if keep is not None else None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        for key in ("logprobs", "stop_reason"):
            if key in extra:
                choice[key] = extra.pop(key)
        piece = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
            **extra,
        }
        if fold is not None:
            fold.add(piece)
        return sse(piece)

    for index in range(len(streams)):
        # As OpenAI's first chunk: content "" for an answer, null where the answer is calls (forced ones), so the
        # SDK's accumulated message reads null as the blocking answer does, not "".
        yield chunk(index, {"role": "assistant", "content": None if tools.forced else ""})
    completion_tokens, prompt_tokens, cached_tokens, open_count = 0, 0, 0, len(streams)
    last_events: list[GenerationEvent] = []
    answers = [ToolStream(tools) for _ in streams]  # each choice's text, held where a call may be starting
    thoughts = [ReasoningStream(thinking) if thinking is not None else None for _ in streams]
    async for index, event in merged(streams):
        if event.error:
            yield stream_error(event_error(event, request.url.path))
            break  # the stream still ends with [DONE], as vLLM's does after an error
        extra: dict[str, Any] = {}
        if params.logprobs and event.tokens:
            extra["logprobs"] = {"content": chat_logprobs(event.tokens, tokenizer)}
        answer, thought = answers[index], thoughts[index]
        text = event.text
        if thought is not None:
            reasoning, text = thought.feed(text, last=event.finished)
            if reasoning:
                yield chunk(index, {"reasoning_content": reasoning})
        answer.feed(text)
        for piece in _grouped(answer.pieces):  # content and calls as they are written, in their order
            if isinstance(piece, str):
                yield chunk(index, {"content": piece}, **extra)
                extra = {}  # the step's logprobs go with its first content
            else:
                yield chunk(index, {"tool_calls": [_call_delta(delta) for delta in piece]})
        if "logprobs" in extra:  # the step wrote no content: its logprobs go alone, no "" where the answer is calls
            yield chunk(index, {} if tools.forced else {"content": ""}, **extra)
        if event.finished:
            done = answer.finish()
            if done.deltas:
                yield chunk(index, {"tool_calls": [_call_delta(delta) for delta in done.deltas]})
            if done.content:
                yield chunk(index, {"content": done.content})
            if done.unsent:
                first = len(done.calls) - len(done.unsent)
                deltas = [{"index": first + position, **call} for position, call in enumerate(done.unsent)]
                yield chunk(index, {"tool_calls": deltas})
            completion_tokens += event.completion_tokens
            prompt_tokens = event.prompt_tokens
            cached_tokens = max(cached_tokens, event.cached_tokens)
            last_events.append(event)
            open_count -= 1
            on_finish = include_usage is None and open_count == 0  # Cake's default: usage on the last finish chunk
            counts = usage(prompt_tokens, completion_tokens, cached_tokens, _predicted(params, last_events))
            last = {"usage": counts} if on_finish else {}
            finish = _call_finish(bool(done.calls), event.finish_reason, tools.forced and event.stop_reason is not None)
            yield chunk(index, {}, finish, stop_reason=event.stop_reason, **last)
    if include_usage and open_count == 0:
        kind = "chat.completion.chunk"
        counts = usage(prompt_tokens, completion_tokens, cached_tokens, _predicted(params, last_events))
        yield usage_chunk(completion_id, kind, created, model, counts)
    if keep is not None and fold is not None and open_count == 0:  # every choice ended (not an error)
        # The usage a blocking answer has, whether or not the stream sent it.
        fold.usage = usage(prompt_tokens, completion_tokens, cached_tokens, _predicted(params, last_events))
        keep(fold.completion())
    yield sse("[DONE]")


def _grouped(pieces: list[str | CallDelta]) -> list[str | list[CallDelta]]:
    """Consecutive call pieces as one chunk's list (content pieces stay apart: each is one chunk)."""
    grouped: list[str | list[CallDelta]] = []
    for piece in pieces:
        last = grouped[-1] if grouped else None
        if isinstance(piece, CallDelta) and isinstance(last, list):
            last.append(piece)
        else:
            grouped.append([piece] if isinstance(piece, CallDelta) else piece)
    return grouped


def _call_delta(delta: CallDelta) -> dict[str, Any]:
    """A streamed call's piece as OpenAI's tool_calls delta: the header first (id, name), then arguments text."""
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    function = {"name": delta.name, "arguments": delta.arguments}
    return {"index": delta.index, "id": delta.id, "type": "function", "function": function}


def _served_models(state: ServerState) -> list[dict[str, Any]]:
    """OpenAI's model object, with vLLM's `root` (what was loaded) and `max_model_len` (the context clients size
    their prompts to)."""
    source = state.source
    if source is None:
        return []
    engine = state.engine
    context = engine.context_length if engine is not None else context_length(source, state.settings)
    return [
        {
            "id": state.model_name,
            "object": "model",
            "created": int(state.started),
            "owned_by": "cake",
            "root": source.model_id,
            "parent": None,
            "max_model_len": context,
        }
    ]


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": _served_models(request.app.state.cake)})


async def retrieve_model(request: Request) -> Response:
    model_id = request.path_params["model_id"]
    for model in _served_models(request.app.state.cake):
        if model["id"] == model_id:
            return JSONResponse(model)
    raise ApiError(404, f"model {model_id!r} is not served here (GET /v1/models lists what is)")


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/api/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
]
