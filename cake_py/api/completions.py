"""OpenAI's legacy /v1/completions: a prompt (text, token ids, or several), `echo` (with `logprobs`, the prompt
scored too), `suffix` (fill in the middle, with a code model's FIM tokens), streamed as OpenAI's legacy chunks or
blocking. Shares the chat route's sampling fields, seeding and stream framing (openai.py)."""

from __future__ import annotations

import itertools
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
from cake_py.api.llama_sampler_fields import openai_llama_sampling
from cake_py.api.middleware import request_key_name
from cake_py.api.openai import finish_reason, reject_unsupported, seeded, stream_error, usage_chunk
from cake_py.api.schemas import choice_count, flag, openai_sampling, stream_usage
from cake_py.api.state import generation_request
from cake_py.api.streaming import GenerationResponse, collect_all, event_error, merged, open_streams, sse, usage
from cake_py.api.structured import structured_grammar
from cake_py.api.token_lists import only_ids, outside_vocabulary
from cake_py.models.fill_in_middle import fim_prompt, fim_stops, fim_tokens
from cake_py.models.sampling import SampledToken
from cake_py.models.tokenizer import Tokenizer

MAX_PROMPTS = 16
COMPLETION_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's legacy API and vLLM (chat keeps 2048)


def _reject_unsupported_completion(body: dict[str, Any]) -> None:
    """The legacy completion fields this server cannot honour, refused rather than ignored."""
    for field in ("tools", "tool_choice", "functions", "function_call"):
        if body.get(field) is not None:
            raise ApiError(400, f"{field} is a chat field: send it to /v1/chat/completions")
    best_of = body.get("best_of")
    if best_of is not None and (best_of != 1 or isinstance(best_of, bool)):
        raise ApiError(400, f"best_of ({best_of!r}) is not supported by this server; leave it out or send 1"[:300])


def _fill_in_middle(body: dict[str, Any], tokenizer: Tokenizer, model: str, echo: bool) -> str | None:
    """OpenAI's `suffix` on /v1/completions (checked: the model has fill-in-the-middle tokens); None without one."""
    suffix = body.get("suffix")
    if suffix is None:
        return None
    if not isinstance(suffix, str):
        raise ApiError(400, f"suffix must be a string, got {suffix!r}"[:300])
    if echo:
        raise ApiError(400, "echo cannot be combined with suffix")
    if fim_tokens(tokenizer) is None:
        raise ApiError(400, no_fill_in_middle("suffix", model))
    return suffix


def no_fill_in_middle(field: str, model: str) -> str:
    return (
        f"{field} needs a model with fill-in-the-middle tokens (<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|> or "
        f"its family's); {model} has none"
    )


def _completion_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """`prompt` as OpenAI takes it: a string, a list of strings, a list of token ids, or a list of those lists (an
    empty string too with a `suffix`: filling in at the start of a file)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and only_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise ApiError(400, f"prompt must be a string, a list of strings or a list of token ids, got {prompt!r}")
    for item in prompts:
        ids_ok = bool(item) and only_ids(item)
        text_ok = isinstance(item, str) and (item or body.get("suffix") is not None)
        if not text_ok and not ids_ok:
            raise ApiError(400, f"prompt {item!r} must be a non-empty string or a non-empty list of token ids")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} are allowed")
    return prompts


async def completions(request: Request) -> Response:
    state, engine, source, body = await generation_request(request)
    tokenizer = source.tokenizer
    reject_unsupported(body)
    _reject_unsupported_completion(body)
    prompts = _completion_prompts(body)
    echo_prompt = flag(body, "echo", False)
    fim = _fill_in_middle(body, tokenizer, state.model_name, echo_prompt)
    # echo with logprobs scores the prompt too (each token given the ones before it), and may generate nothing.
    params = openai_sampling(
        body,
        vocab_size=engine.vocab_size,
        default_max_tokens=COMPLETION_MAX_TOKENS,
        prompt_logprobs=echo_prompt,
        logprobs_count=True,
    )
    params = await openai_llama_sampling(params, body, tokenizer)
    params = replace(params, grammar=await structured_grammar(body, tokenizer))
    if fim is not None:  # the markers and file tokens a code model may write after the middle end it too
        params = replace(params, stop_token_ids=params.stop_token_ids | fim_stops(tokenizer))
    n = choice_count(body)
    stream = flag(body, "stream", False)
    include_usage = stream_usage(body, stream)

    def encode_all() -> list[list[int]]:
        if fim is not None:  # prefix-suffix-middle: the answer is what goes between
            return [fim_prompt(tokenizer, p, fim) for p in prompts]
        return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    prompt_ids = await run_in_threadpool(encode_all)
    per_prompt = []  # each prompt's max_tokens is clipped to its own room in the context, not the longest's
    vocab_size = tokenizer.vocab_size
    for ids in prompt_ids:
        if outside_vocabulary(ids, vocab_size) is not None:
            raise ApiError(400, f"prompt token ids must be in [0, {vocab_size}), got {ids[:40]!r}"[:300])
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
        [seeded(clipped, i) for clipped in per_prompt for i in range(n)],
        request_key_name(request),
        n,
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
            # each token's start: a running sum (summing every prefix again was quadratic: an echoed prompt of 8,000
            # tokens held the event loop for 2 s, a full context's for half a minute)
            "text_offset": list(itertools.accumulate(map(len, texts[:-1]), initial=offset)) if texts else [],
        }

    def scored_prompt(index: int, scored: list[SampledToken] | None) -> tuple[int, list[SampledToken]] | None:
        return (prompt_ids[index // n][0], scored) if params.prompt_logprobs and scored is not None else None

    def piece(
        index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None, stop: str | int | None = None
    ) -> dict[str, Any]:
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        if finish is not None:  # vLLM's: the stop string or stop_token_ids token that ended it, else null
            choice["stop_reason"] = stop
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
                    yield stream_error(event_error(event, request.url.path))
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
                    finish = finish_reason(event.finish_reason)
                logprobs = legacy_logprobs(event.tokens, offsets[index])
                if logprobs is not None:  # by the tokens' own text, as the blocking answer counts (not emitted text)
                    offsets[index] += sum(len(token) for token in logprobs["tokens"])
                chunk = piece(index, event.text, finish, logprobs, event.stop_reason)
                if event.finished and open_count == 0 and include_usage is None:
                    chunk["usage"] = usage(n_prompt_tokens, total)
                yield sse(chunk)
            if include_usage and open_count == 0:
                yield usage_chunk(completion_id, "text_completion", created, model, usage(n_prompt_tokens, total))
            yield sse("[DONE]")

        return GenerationResponse(stream_chunks(), streams, "text/event-stream")
    results = await collect_all(request, streams)

    def built() -> list[dict[str, Any]]:
        choices = []
        for index, result in enumerate(results):
            prefix = echo[index // n]
            last = result.last
            choice = piece(index, prefix + result.text, finish_reason(last.finish_reason), None, last.stop_reason)
            choice = choice["choices"][0]
            choice["logprobs"] = legacy_logprobs(
                result.tokens, len(prefix), scored_prompt(index, result.prompt_logprobs)
            )
            choices.append(choice)
        return choices

    # In a thread: the logprobs of 8 long choices (or of an echoed prompt) are seconds of Python on the event loop
    choices = await run_in_threadpool(built)
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


ROUTES = [Route("/v1/completions", completions, methods=["POST"])]
