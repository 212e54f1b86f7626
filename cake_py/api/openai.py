"""OpenAI-compatible routes: /v1/chat/completions (+ Cake's /api/v1 alias), /v1/completions, /v1/models.

Streams follow Cake's chunk sequence: a role chunk per choice, content deltas, a finish chunk per choice (the last
one carries `usage`), then `data: [DONE]`. With `stream_options.include_usage` they follow OpenAI's instead: no chunk
carries usage but one more, `"choices": []`, just before `data: [DONE]` (`false`: none at all).
`usage.prompt_tokens` counts tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.errors import ApiError
from cake_py.api.forced_calls import CallDelta
from cake_py.api.reasoning import ReasoningStream, is_reasoning_template, opens_thinking, split_reasoning
from cake_py.api.schemas import (
    chat_messages,
    chat_template_options,
    choice_count,
    flag,
    json_body,
    openai_sampling,
    predicted_output,
    stream_usage,
)
from cake_py.api.state import ServerState
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

MAX_PROMPTS = 16
COMPLETION_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's legacy API and vLLM (chat keeps 2048)


def _seeded(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of n gets seed+i, so n choices differ yet the request stays reproducible."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=(params.seed + index) % 2**64)  # a seed near 2**64 wraps around


def _finish_reason(reason: str | None) -> str:
    return "stop" if reason in (None, "cancelled") else reason


def _call_finish(called: bool, reason: str | None) -> str:
    """`tool_calls` for an answer that calls tools, unless max_tokens cut it (a call may be partial): `length`."""
    return "tool_calls" if called and reason != "length" else _finish_reason(reason)


def _reject_unsupported(body: dict[str, Any]) -> None:
    """Refuse what would otherwise be silently ignored and give an answer of another kind than asked for."""
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise ApiError(400, f"top_logprobs ({body['top_logprobs']!r}) needs logprobs: true")


def _reject_unsupported_completion(body: dict[str, Any]) -> None:
    """The legacy completion fields this server cannot honour, refused rather than ignored."""
    for field in ("tools", "tool_choice", "functions", "function_call"):
        if body.get(field) is not None:
            raise ApiError(400, f"{field} is a chat field: send it to /v1/chat/completions")
    best_of = body.get("best_of")
    if best_of is not None and (best_of != 1 or isinstance(best_of, bool)):
        raise ApiError(400, f"best_of ({best_of!r}) is not supported by this server; leave it out or send 1"[:300])


def _predicted(params: SamplingParams, events: list[GenerationEvent]) -> tuple[int, int] | None:
    """The usage's accepted and rejected prediction tokens over a request's choices; None without a prediction."""
    if params.prediction is None:
        return None
    return sum(e.accepted_prediction_tokens for e in events), sum(e.rejected_prediction_tokens for e in events)


def _fill_in_middle(body: dict[str, Any], tokenizer: Tokenizer, model: str, echo: bool) -> str | None:
    """OpenAI's `suffix` on /v1/completions (checked: the model has fill-in-the-middle tokens); None without one."""
    suffix = body.get("suffix")
    if suffix is None:
        return None
    if not isinstance(suffix, str):
        raise ApiError(400, f"suffix must be a string, got {suffix!r}"[:300])
    if echo:
        raise ApiError(400, "echo cannot be combined with suffix")
    if tokenizer.fill_in_middle is None:
        raise ApiError(400, no_fill_in_middle("suffix", model))
    return suffix


def no_fill_in_middle(field: str, model: str) -> str:
    return (
        f"{field} needs a model with fill-in-the-middle tokens (<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|> or "
        f"its family's); {model} has none"
    )


def _usage_chunk(completion_id: str, kind: str, created: int, model: str, usage_: dict[str, Any]) -> str:
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


def _stream_error(error: ApiError) -> str:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return sse({"error": {"message": error.message, "type": kind, "code": error.code or error.status}})


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    engine, source = state.ready()
    tokenizer = source.tokenizer
    body = await json_body(request)
    _reject_unsupported(body)
    messages = chat_messages(body)
    template = chat_template_options(body, messages)
    tools = tool_request(body, tokenizer.tool_call_id_length)
    params = openai_sampling(body, vocab_size=engine.vocab_size)
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
    messages, tool_variables = prompt_messages(messages, tools, tokenizer.reads_tools)
    prompt_text, prompt_ids = await run_in_threadpool(
        tokenizer.chat_prompt,
        messages,
        add_generation_prompt=template.add_generation_prompt,
        continue_final_message=template.continue_final_message,
        template_kwargs={**template.kwargs, **tool_variables},
    )
    params = engine.check_prompt(len(prompt_ids), params)
    # A reasoning model's thinking goes to reasoning_content; None: not one (its text is all content).
    continued = messages[-1]["content"] if template.continue_final_message else None
    reasoning_model = is_reasoning_template(tokenizer.chat_template) and not grammar
    thinking = opens_thinking(prompt_text, continued) if reasoning_model else None
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created, model = int(time.time()), state.model_name
    streams = open_streams(state, engine, [prompt_ids] * n, [_seeded(params, i) for i in range(n)])
    if stream:
        chunks = _chat_stream(
            request, streams, completion_id, created, model, tokenizer, params, include_usage, tools, thinking
        )
        return GenerationResponse(chunks, streams, "text/event-stream")
    results = await collect_all(request, streams)
    choices = []
    for index, result in enumerate(results):
        reasoning, text = split_reasoning(result.text, thinking) if thinking is not None else (None, result.text)
        answer = parse_answer(text or "", tools)
        message: dict[str, Any] = {"role": "assistant", "content": answer.content if text is not None else None}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
        finish = _call_finish(bool(answer.tool_calls), result.last.finish_reason)
        logprobs = {"content": chat_logprobs(result.tokens, tokenizer)} if params.logprobs else None
        choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
    return JSONResponse(
        {
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
    )


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
        yield sse(chunk(index, {"role": "assistant", "content": ""}))  # as OpenAI's first chunk
    completion_tokens, prompt_tokens, cached_tokens, open_count = 0, 0, 0, len(streams)
    last_events: list[GenerationEvent] = []
    answers = [ToolStream(tools) for _ in streams]  # each choice's text, held where a call may be starting
    thoughts = [ReasoningStream(thinking) if thinking is not None else None for _ in streams]
    async for index, event in merged(streams):
        if event.error:
            yield _stream_error(event_error(event, request.url.path))
            break  # the stream still ends with [DONE], as vLLM's does after an error
        extra: dict[str, Any] = {}
        if params.logprobs and event.tokens:
            extra["logprobs"] = {"content": chat_logprobs(event.tokens, tokenizer)}
        answer, thought = answers[index], thoughts[index]
        text = event.text
        if thought is not None:
            reasoning, text = thought.feed(text, last=event.finished)
            if reasoning:
                yield sse(chunk(index, {"reasoning_content": reasoning}))
        text = answer.feed(text)
        if text or "logprobs" in extra:
            yield sse(chunk(index, {"content": text}, **extra))
        if answer.deltas:  # forced calls, as they are written
            yield sse(chunk(index, {"tool_calls": [_call_delta(delta) for delta in answer.deltas]}))
        if event.finished:
            done = answer.finish()
            if done.content:
                yield sse(chunk(index, {"content": done.content}))
            if done.unsent:
                deltas = [{"index": position, **call} for position, call in enumerate(done.unsent)]
                yield sse(chunk(index, {"tool_calls": deltas}))
            completion_tokens += event.completion_tokens
            prompt_tokens = event.prompt_tokens
            cached_tokens = max(cached_tokens, event.cached_tokens)
            last_events.append(event)
            open_count -= 1
            on_finish = include_usage is None and open_count == 0  # Cake's default: usage on the last finish chunk
            counts = usage(prompt_tokens, completion_tokens, cached_tokens, _predicted(params, last_events))
            last = {"usage": counts} if on_finish else {}
            finish = _call_finish(bool(done.calls), event.finish_reason)
            yield sse(chunk(index, {}, finish, **last))
    if include_usage and open_count == 0:
        kind = "chat.completion.chunk"
        counts = usage(prompt_tokens, completion_tokens, cached_tokens, _predicted(params, last_events))
        yield _usage_chunk(completion_id, kind, created, model, counts)
    yield sse("[DONE]")


def _call_delta(delta: CallDelta) -> dict[str, Any]:
    """A streamed call's piece as OpenAI's tool_calls delta: the header first (id, name), then arguments text."""
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    function = {"name": delta.name, "arguments": delta.arguments}
    return {"index": delta.index, "id": delta.id, "type": "function", "function": function}


def _completion_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """`prompt` as OpenAI takes it: a string, a list of strings, a list of token ids, or a list of those lists (an
    empty string too with a `suffix`: filling in at the start of a file)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise ApiError(400, f"prompt must be a string, a list of strings or a list of token ids, got {prompt!r}")
    for item in prompts:
        ids_ok = isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        text_ok = isinstance(item, str) and (item or body.get("suffix") is not None)
        if not text_ok and not ids_ok:
            raise ApiError(400, f"prompt {item!r} must be a non-empty string or a non-empty list of token ids")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} are allowed")
    return prompts


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    engine, source = state.ready()
    tokenizer = source.tokenizer
    body = await json_body(request)
    _reject_unsupported(body)
    _reject_unsupported_completion(body)
    prompts = _completion_prompts(body)
    echo_prompt = flag(body, "echo", False)
    fim = _fill_in_middle(body, tokenizer, state.model_name, echo_prompt)
    # echo with logprobs scores the prompt too (each token given the ones before it), and may generate nothing.
    params = openai_sampling(
        body, vocab_size=engine.vocab_size, default_max_tokens=COMPLETION_MAX_TOKENS, prompt_logprobs=echo_prompt
    )
    params = replace(params, grammar=await structured_grammar(body, tokenizer))
    if fim is not None:  # the markers and file tokens a code model may write after the middle end it too
        params = replace(params, stop_token_ids=params.stop_token_ids | tokenizer.fill_in_middle_stops)
    n = choice_count(body)
    stream = flag(body, "stream", False)
    include_usage = stream_usage(body, stream)

    def encode_all() -> list[list[int]]:
        if fim is not None:  # prefix-suffix-middle: the answer is what goes between
            return [tokenizer.fill_in_middle_prompt(p, fim) for p in prompts]
        return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    prompt_ids = await run_in_threadpool(encode_all)
    per_prompt = []  # each prompt's max_tokens is clipped to its own room in the context, not the longest's
    for ids in prompt_ids:
        if any(not 0 <= t < tokenizer.vocab_size for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size}), got {ids!r}"[:300])
        per_prompt.append(engine.check_prompt(len(ids), params))

    def echoed(prompt: str | list[int]) -> str:
        """The prompt as sent: a string as it is, token ids with their special tokens (part of the prompt too)."""
        if not echo_prompt:
            return ""
        return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)

    echo = [echoed(prompt) for prompt in prompts]
    completion_id, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), state.model_name
    # Choice k is prompt k // n, sample k % n.
    streams = open_streams(
        state,
        engine,
        [ids for ids in prompt_ids for _ in range(n)],
        [_seeded(clipped, i) for clipped in per_prompt for i in range(n)],
    )
    n_prompt_tokens = sum(len(ids) for ids in prompt_ids)  # counted once per prompt, like OpenAI

    def legacy_logprobs(
        tokens: list[SampledToken], offset: int, prompt: tuple[int, list[SampledToken]] | None = None
    ) -> dict[str, Any] | None:
        """OpenAI's legacy logprobs of `tokens`, their text starting at `offset`. With `prompt` (its first token id
        and the scored rest), the prompt's tokens come first, from offset 0; the first has no logprob (null)."""
        if not params.logprobs:
            return None
        entries: list[SampledToken | None] = list(tokens)
        texts = [tokenizer.token_text(t.token_id) for t in tokens]
        if prompt is not None:
            first, scored = prompt
            entries = [None, *scored, *entries]
            texts = [tokenizer.token_text(first), *(tokenizer.token_text(t.token_id) for t in scored), *texts]
            offset = 0
        return {
            "tokens": texts,
            "token_logprobs": [t.logprob if t else None for t in entries],
            "top_logprobs": [{tokenizer.token_text(i): lp for i, lp in t.top_logprobs} if t else None for t in entries],
            "text_offset": [offset + sum(len(x) for x in texts[:k]) for k in range(len(texts))],
        }

    def scored_prompt(index: int, scored: list[SampledToken] | None) -> tuple[int, list[SampledToken]] | None:
        return (prompt_ids[index // n][0], scored) if params.prompt_logprobs and scored is not None else None

    def piece(index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }

    if stream:

        async def stream_chunks() -> AsyncIterator[str]:
            total, open_count = 0, len(streams)
            offsets = [len(echo[k // n]) for k in range(len(streams))]
            for index in range(len(streams)):
                if echo[index // n] and not params.prompt_logprobs:
                    yield sse(piece(index, echo[index // n], None, None))
            async for index, event in merged(streams):
                if event.error:
                    yield _stream_error(event_error(event, request.url.path))
                    break  # the stream still ends with [DONE], as vLLM's does after an error
                if event.prompt_logprobs is not None:  # scored: the echo goes out with its logprobs, first
                    echoed_logprobs = legacy_logprobs([], 0, scored_prompt(index, event.prompt_logprobs))
                    assert echoed_logprobs is not None
                    yield sse(piece(index, echo[index // n], None, echoed_logprobs))
                    offsets[index] = sum(len(token) for token in echoed_logprobs["tokens"])
                finish = None
                if event.finished:
                    total += event.completion_tokens
                    open_count -= 1
                    finish = _finish_reason(event.finish_reason)
                logprobs = legacy_logprobs(event.tokens, offsets[index])
                if logprobs is not None:  # by the tokens' own text, as the blocking answer counts (not emitted text)
                    offsets[index] += sum(len(token) for token in logprobs["tokens"])
                chunk = piece(index, event.text, finish, logprobs)
                if event.finished and open_count == 0 and include_usage is None:
                    chunk["usage"] = usage(n_prompt_tokens, total)
                yield sse(chunk)
            if include_usage and open_count == 0:
                yield _usage_chunk(completion_id, "text_completion", created, model, usage(n_prompt_tokens, total))
            yield sse("[DONE]")

        return GenerationResponse(stream_chunks(), streams, "text/event-stream")
    results = await collect_all(request, streams)
    choices = []
    for index, result in enumerate(results):
        prefix = echo[index // n]
        choice = piece(index, prefix + result.text, _finish_reason(result.last.finish_reason), None)["choices"][0]
        choice["logprobs"] = legacy_logprobs(result.tokens, len(prefix), scored_prompt(index, result.prompt_logprobs))
        choices.append(choice)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage(n_prompt_tokens, sum(result.last.completion_tokens for result in results)),
        }
    )


def _served_models(state: ServerState) -> list[dict[str, Any]]:
    if state.source is None:
        return []
    return [{"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "cake"}]


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
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
]
