"""OpenAI's legacy /v1/completions: a prompt (text, token ids, or several), `echo` (with `logprobs`, the prompt
scored too), `suffix` (fill in the middle, with a code model's FIM tokens), streamed as OpenAI's legacy chunks or
blocking. Shares the chat route's sampling fields, seeding and stream framing (openai.py)."""

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
from cake_py.api.llama_sampler_fields import openai_llama_sampling
from cake_py.api.middleware import request_key_name
from cake_py.api.openai import finish_reason, reject_unsupported, seeded, stream_error, usage_chunk
from cake_py.api.schemas import (
    MAX_CHOICES,
    choice_count,
    cut_prompt,
    flag,
    number,
    openai_sampling,
    prompt_cut,
    stream_usage,
)
from cake_py.api.state import generation_request
from cake_py.api.streaming import GenerationResponse, Result, collect_all, event_error, merged, open_streams, sse, usage
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


def best_of_count(body: dict[str, Any], n: int, stream: bool) -> int:
    """OpenAI's `best_of`: how many completions of each prompt are generated, of which the `n` with the highest
    log probability per token are returned (default n). Not streamed, as OpenAI's: the best is known at the end."""
    if body.get("best_of") is None:
        return n
    best_of = number(body, "best_of", n, integer=True)
    if not n <= best_of <= MAX_CHOICES:
        raise ApiError(400, f"best_of must be between n ({n}) and {MAX_CHOICES}, got {best_of}")
    if stream and best_of > n:
        raise ApiError(400, f"best_of ({best_of}) above n ({n}) cannot be streamed: the best are known at the end")
    return int(best_of)


def best_choices(results: list[Result], per_prompt: int, n: int) -> list[Result]:
    """Of each prompt's `per_prompt` results in a row, the `n` whose tokens have the highest mean logprob (the first
    drawn first among equals), best first: OpenAI's best_of."""

    def score(result: Result) -> float:
        logprobs = [t.logprob for t in result.tokens if t.logprob is not None]
        return sum(logprobs) / len(logprobs) if logprobs else 0.0

    chosen = []
    for start in range(0, len(results), per_prompt):
        candidates = results[start : start + per_prompt]
        chosen += sorted(candidates, key=score, reverse=True)[:n]
    return chosen


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


_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))  # in UTF-8, every other byte starts a character


def text_offsets(pieces: list[bytes], start: int, limit: int) -> tuple[list[int], int]:
    """Where each token (by its bytes) starts in the answer's text, the first at character `start`: at the character
    its first byte begins or continues, so a token holding part of a character (its own text only U+FFFD) starts
    where that character does. Summing the tokens' own texts counted U+FFFD as characters, past the text's end.
    Capped at `limit`, the text's length (a stop string cuts tokens' text off); also the (uncapped) offset after."""
    offsets = []
    for piece in pieces:
        continues = bool(piece) and 0x80 <= piece[0] < 0xC0 and start > 0
        offsets.append(min(start - 1 if continues else start, limit))
        start += len(piece.translate(None, _CONTINUATION_BYTES))  # bytes.translate: in C, for long echoed prompts
    return offsets, start


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
    best_of = best_of_count(body, n, stream)
    if len(prompts) * best_of > MAX_CHOICES:  # one request draws no more sequences than one prompt's n may
        raise ApiError(
            400,
            f"{len(prompts)} prompts x {best_of} samples each ({'best_of' if best_of > n else 'n'}) are "
            f"{len(prompts) * best_of} completions; a request draws at most {MAX_CHOICES}",
        )
    wants_logprobs = params.logprobs
    if best_of > n:  # ranked by the logprob of each token drawn: computed, and left out of the answer unless asked
        params = replace(params, logprobs=True)

    keep = prompt_cut(body, engine.context_length)
    if keep is not None and fim is not None:  # a cut from the left would take the FIM markers with the prefix
        raise ApiError(400, "truncate_prompt_tokens cannot be combined with suffix")
    head = tokenizer.encode("", check=False) if keep is not None else []  # what the tokenizer puts before a text
    cut = [False] * len(prompts)  # per prompt, whether it was cut short

    def encode_all() -> list[list[int]]:
        if fim is not None:  # prefix-suffix-middle: the answer is what goes between
            return [fim_prompt(tokenizer, p, fim) for p in prompts]
        # A prompt to be cut is not refused for its length first: only what is kept must fit.
        encoded = [tokenizer.encode(p, check=keep is None) if isinstance(p, str) else list(p) for p in prompts]
        kept = []
        for index, (ids, prompt) in enumerate(zip(encoded, prompts, strict=True)):
            kept.append(cut_prompt(ids, keep, head if isinstance(prompt, str) else ()))
            cut[index] = len(kept[-1]) < len(ids)
        return kept

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

    # A prompt cut short is echoed as read.
    echo = [echoed(ids if short else prompt) for prompt, ids, short in zip(prompts, prompt_ids, cut, strict=True)]
    completion_id, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), state.model_name
    # Choice k is prompt k // n, sample k % n.
    streams = open_streams(
        state,
        engine,
        [ids for ids in prompt_ids for _ in range(best_of)],
        [seeded(clipped, i) for clipped in per_prompt for i in range(best_of)],
        request_key_name(request),
        best_of,
    )
    n_prompt_tokens = sum(len(ids) for ids in prompt_ids)  # counted once per prompt, like OpenAI

    def legacy_logprobs(
        tokens: list[SampledToken], offset: int, limit: int, prompt: tuple[int, list[SampledToken]] | None = None
    ) -> tuple[dict[str, Any] | None, int]:
        """OpenAI's legacy logprobs of `tokens`, their text starting at `offset` and ending by `limit` (text_offsets),
        and the offset after them. With `prompt` (its first token id and the scored rest), the prompt's tokens come
        first, from offset 0; the first has no logprob (null)."""
        if not wants_logprobs:
            return None, offset
        entries: list[SampledToken | None] = list(tokens)
        ids = [t.token_id for t in tokens]
        if prompt is not None:
            first, scored = prompt
            entries = [None, *scored, *entries]
            ids = [first, *(t.token_id for t in scored), *ids]
            offset = 0
        offsets, end = text_offsets([tokenizer.token_bytes(i) for i in ids], offset, limit)
        logprobs = {
            "tokens": [tokenizer.token_text(i) for i in ids],
            "token_logprobs": [t.logprob if t else None for t in entries],
            "top_logprobs": [{tokenizer.token_text(i): lp for i, lp in t.top_logprobs} if t else None for t in entries],
            "text_offset": offsets,
        }
        return logprobs, end

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
            sent = list(offsets)  # the characters each choice's text has so far: no offset passes them
            for index in range(len(streams)):
                if echo[index // n] and not params.prompt_logprobs:
                    yield sse(piece(index, echo[index // n], None, None))
            async for index, event in merged(streams):
                if event.error:
                    yield stream_error(event_error(event, request.url.path))
                    break  # the stream still ends with [DONE], as vLLM's does after an error
                if event.prompt_logprobs is not None:  # scored: the echo goes out with its logprobs, first
                    scored = scored_prompt(index, event.prompt_logprobs)
                    echoed_logprobs, offsets[index] = legacy_logprobs([], 0, sent[index], scored)
                    yield sse(piece(index, echo[index // n], None, echoed_logprobs))
                finish = None
                if event.finished:
                    total += event.completion_tokens
                    open_count -= 1
                    finish = finish_reason(event.finish_reason)
                sent[index] += len(event.text)
                # by the tokens' own bytes, as the blocking answer counts (the text may come tokens later)
                logprobs, offsets[index] = legacy_logprobs(event.tokens, offsets[index], sent[index])
                chunk = piece(index, event.text, finish, logprobs, event.stop_reason)
                if event.finished and open_count == 0 and include_usage is None:
                    chunk["usage"] = usage(n_prompt_tokens, total)
                yield sse(chunk)
            if include_usage and open_count == 0:
                yield usage_chunk(completion_id, "text_completion", created, model, usage(n_prompt_tokens, total))
            yield sse("[DONE]")

        return GenerationResponse(stream_chunks(), streams, "text/event-stream")
    results = await collect_all(request, streams)
    returned = results if best_of == n else best_choices(results, best_of, n)

    def built() -> list[dict[str, Any]]:
        choices = []
        for index, result in enumerate(returned):
            prefix = echo[index // n]
            last = result.last
            text = prefix + result.text
            choice = piece(index, text, finish_reason(last.finish_reason), None, last.stop_reason)["choices"][0]
            scored = scored_prompt(index, result.prompt_logprobs)
            choice["logprobs"] = legacy_logprobs(result.tokens, len(prefix), len(text), scored)[0]
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
