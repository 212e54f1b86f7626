"""llama.cpp's POST /infill: fill in the middle for code editors (llama.vscode, llama.vim), with a code model's FIM
tokens. `input_prefix` and `input_suffix` are the code around the cursor, `prompt` the start of the cursor's line
(after the prefix, as llama.cpp puts it), `input_extra` other files' chunks (`[{"filename", "text"}]`); the answer
is llama.cpp's completion object (`content`, `stop`, `tokens_predicted`, `stop_type`, `timings`,
`generation_settings`, …), or with `stream` its SSE events, `data: {"content": "<piece>", "stop": false}`, then the
whole object with `stop: true` (no `[DONE]`, as llama.cpp sends none). Sampling takes llama.cpp's names and
defaults; `n_predict: 0` only reads the prompt into the prefix cache (the editors' warm-up requests); `n_indent` and
`t_max_predict_ms` end the middle as llama.cpp's server does (EditorLimits). As llama.cpp's, it takes /completion's
other options too: `grammar` and `json_schema`, `return_tokens`, `response_fields`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.completions import no_fill_in_middle
from cake_py.api.errors import ApiError
from cake_py.api.llama_completion import llama_grammar
from cake_py.api.llama_cpp import (
    Completion,
    EditorLimits,
    completion_events,
    llama_sampling,
    one_event,
    requested_repeat_last_n,
    response_fields,
)
from cake_py.api.llama_sampler_fields import with_dry_breakers
from cake_py.api.middleware import request_key_name
from cake_py.api.schemas import flag
from cake_py.api.state import generation_request
from cake_py.api.streaming import GenerationResponse, collect_all, open_streams
from cake_py.models.fill_in_middle import fim_prompt, fim_stops, fim_tokens
from cake_py.models.tokenizer import Tokenizer

DEFAULT_ANSWER_ROOM = 256  # tokens kept free for the answer when a long request is cut to fit (n_predict -1 or 0)


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{key} must be a string, got {value!r}"[:300])
    return value


def _files(body: dict[str, Any]) -> list[tuple[str, str]]:
    """`input_extra`: chunks `{"filename", "text"}`, `text` required, the name `tmp` by default (as llama.cpp)."""
    chunks = body.get("input_extra") or []
    if not isinstance(chunks, list) or not all(
        isinstance(chunk, dict) and isinstance(chunk.get("text"), str) and isinstance(chunk.get("filename", "tmp"), str)
        for chunk in chunks
    ):
        raise ApiError(400, f'input_extra must be a list of {{"filename", "text"}} strings, got {chunks!r}'[:300])
    return [(chunk.get("filename", "tmp"), chunk["text"]) for chunk in chunks]


def fitted_prompt(
    tokenizer: Tokenizer, prefix: str, suffix: str, typed: str, files: list[tuple[str, str]], budget: int
) -> tuple[list[int], bool]:
    """The FIM prompt within `budget` tokens, and whether it was cut, as llama.cpp fits an editor's request to the
    context instead of refusing it: the oldest chunks of other files go first, then the prefix loses its start and
    the suffix its end, keeping three tokens of the prefix's end to one of the suffix's start."""
    # More of the prefix (suffix) than `budget` tokens can stand for is cut before it is tokenized: tokenizing
    # megabytes once per bisection step below would take seconds each, only to be cut.
    most = tokenizer.most_characters(budget)
    cut = len(prefix) > most or len(suffix) > most
    prefix, suffix = prefix[len(prefix) - most :] if len(prefix) > most else prefix, suffix[:most]
    ids = fim_prompt(tokenizer, prefix, suffix, typed=typed, files=files)
    if len(ids) <= budget:
        return ids, cut
    # The fewest oldest chunks to drop, by bisection: each try tokenizes the whole prompt again, and an editor's ring
    # holds dozens of chunks, so dropping them one at a time would cost a quadratic number of chunk encodes.
    low, high = 0, len(files)  # dropping `high` chunks fits, or none do and the prefix/suffix cut below must
    while low < high:
        middle = (low + high) // 2
        if len(fim_prompt(tokenizer, prefix, suffix, typed=typed, files=files[middle:])) <= budget:
            high = middle
        else:
            low = middle + 1
    files = files[high:]
    ids = fim_prompt(tokenizer, prefix, suffix, typed=typed, files=files)
    before, after = tokenizer.encode_literal(prefix), tokenizer.encode_literal(suffix)
    if len(ids) > budget:  # as llama.cpp: the prefix's end fills three quarters of the room, the suffix's start one
        room = max(budget - (len(ids) - len(before) - len(after)), 0)
        take_suffix = min(len(after), room // 4)
        take_prefix = min(len(before), room - take_suffix)
        take_suffix = min(len(after), room - take_prefix)  # a short prefix leaves its share to the suffix
        before, after = before[len(before) - take_prefix :], after[:take_suffix]
        ids = fim_prompt(tokenizer, before, after, typed=typed)
    return ids, True


async def infill(request: Request) -> Response:
    state, engine, source, body = await generation_request(request)
    tokenizer = source.tokenizer
    if fim_tokens(tokenizer) is None:
        raise ApiError(400, no_fill_in_middle("/infill", state.model_name))
    prefix, suffix, typed, files = (
        _text(body, "input_prefix"),
        _text(body, "input_suffix"),
        _text(body, "prompt"),
        _files(body),
    )
    params, n_predict = llama_sampling(body, engine.context_length, tokenizer, engine.vocab_size)
    params = replace(params, grammar=await llama_grammar(body, tokenizer))
    params = await with_dry_breakers(params, tokenizer)
    if not params.ignore_eos:  # the markers and file tokens a code model may write after the middle end it too
        params = replace(params, stop_token_ids=params.stop_token_ids | fim_stops(tokenizer))

    reserve = min(n_predict if n_predict > 0 else DEFAULT_ANSWER_ROOM, engine.context_length // 4)

    def prompt() -> tuple[list[int], bool]:
        return fitted_prompt(tokenizer, prefix, suffix, typed, files, engine.context_length - max(reserve, 1))

    prompt_ids, truncated = await run_in_threadpool(prompt)
    params = engine.check_prompt(len(prompt_ids), params)  # n_predict -1: what room the context has
    limits = EditorLimits.of(body)
    # Checked before anything is submitted: a 400 must not leave it running.
    stream, return_tokens = flag(body, "stream", False), flag(body, "return_tokens", False)
    fields, timings_per_token = response_fields(body), flag(body, "timings_per_token", False)
    streams = open_streams(state, engine, [prompt_ids], [params], request_key_name(request))
    streams[0].limit = limits
    answer = Completion(
        state.model_name,
        tokenizer,
        len(prompt_ids),
        params,
        n_predict,
        engine.context_length,
        return_tokens=return_tokens,
        stream=stream,
        repeat_last_n=requested_repeat_last_n(body),
        fields=fields,
        timings_per_token=timings_per_token,
    )
    answer.truncated = truncated
    if stream and n_predict:
        return GenerationResponse(completion_events(request, streams, [answer]), streams, "text/event-stream")
    result = (await collect_all(request, streams))[0]
    final = answer.final(result.text, result.last, streams[0], result.tokens)
    if stream:  # n_predict 0, streamed: its one event
        return GenerationResponse(one_event(final), [], "text/event-stream")
    return JSONResponse(final)


ROUTES = [Route("/infill", infill, methods=["POST"])]
