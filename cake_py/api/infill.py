"""llama.cpp's POST /infill: fill in the middle for code editors (llama.vscode, llama.vim), with a code model's FIM
tokens. `input_prefix` and `input_suffix` are the code around the cursor, `prompt` the start of the middle already
typed, `input_extra` other files' chunks (`[{"filename", "text"}]`, in the repository format where the model has
its tokens); the answer is llama.cpp's completion object (`content`, `stop`, `tokens_predicted`, `stop_type`, …),
or with `stream` its SSE events, `data: {"content": "<piece>", "stop": false}`, then the whole object with
`stop: true` (no `[DONE]`, as llama.cpp sends none). Sampling takes llama.cpp's names and defaults.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.errors import ApiError
from cake_py.api.openai import no_fill_in_middle
from cake_py.api.schemas import flag, json_body, number, stop_strings
from cake_py.api.state import ServerState
from cake_py.api.streaming import EventStream, GenerationResponse, collect_all, event_error, open_streams, sse
from cake_py.engine.sequence import GenerationEvent
from cake_py.errors import RequestError
from cake_py.models.sampling import SamplingParams
from cake_py.models.tokenizer import Tokenizer


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{key} must be a string, got {value!r}"[:300])
    return value


def _files(body: dict[str, Any]) -> list[tuple[str, str]]:
    chunks = body.get("input_extra") or []
    if not isinstance(chunks, list) or not all(
        isinstance(chunk, dict)
        and isinstance(chunk.get("text", ""), str)
        and isinstance(chunk.get("filename", ""), str)
        for chunk in chunks
    ):
        raise ApiError(400, f'input_extra must be a list of {{"filename", "text"}} strings, got {chunks!r}'[:300])
    return [(chunk.get("filename", ""), chunk.get("text", "")) for chunk in chunks]


def llama_sampling(body: dict[str, Any], context_length: int) -> SamplingParams:
    """llama.cpp's sampling fields with its defaults; `n_predict` -1 (the default) generates until the end token or
    the context is full."""
    n_predict = int(number(body, "n_predict", -1, integer=True))
    if n_predict == 0 or n_predict < -1:
        raise ApiError(400, f"n_predict must be -1 (no limit) or at least 1, got {n_predict}")
    seed = int(number(body, "seed", -1, integer=True))
    try:
        return SamplingParams(
            max_tokens=context_length if n_predict == -1 else n_predict,
            temperature=float(number(body, "temperature", 0.8)),
            top_k=int(number(body, "top_k", 40, integer=True)),
            top_p=float(number(body, "top_p", 0.95)),
            min_p=float(number(body, "min_p", 0.05)),
            repetition_penalty=float(number(body, "repeat_penalty", 1.0)),
            presence_penalty=float(number(body, "presence_penalty", 0.0)),
            frequency_penalty=float(number(body, "frequency_penalty", 0.0)),
            seed=None if seed == -1 else seed,
            stop=stop_strings(body.get("stop")),
            ignore_eos=flag(body, "ignore_eos", False),
        )
    except RequestError as error:
        raise ApiError(400, str(error)) from error


async def infill(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    engine, source = state.ready()
    tokenizer = source.tokenizer
    body = await json_body(request)
    if tokenizer.fill_in_middle is None:
        raise ApiError(400, no_fill_in_middle("/infill", state.model_name))
    prefix, suffix, typed, files = (
        _text(body, "input_prefix"),
        _text(body, "input_suffix"),
        _text(body, "prompt"),
        _files(body),
    )
    params = llama_sampling(body, engine.context_length)
    # The markers and file tokens a code model may write after the middle end it too.
    params = replace(params, stop_token_ids=params.stop_token_ids | tokenizer.fill_in_middle_stops)
    prompt_ids = await run_in_threadpool(tokenizer.fill_in_middle_prompt, prefix, suffix, middle=typed, files=files)
    params = engine.check_prompt(len(prompt_ids), params)  # n_predict -1: what room the context has
    streams = open_streams(state, engine, [prompt_ids], [params])
    answer = _Answer(state.model_name, tokenizer, len(prompt_ids))
    if flag(body, "stream", False):
        return GenerationResponse(_stream(request, streams[0], answer), streams, "text/event-stream")
    result = (await collect_all(request, streams))[0]
    return JSONResponse(answer.final(result.text, result.last))


class _Answer:
    """llama.cpp's completion object for one infill: what it counts and how it stopped."""

    def __init__(self, model: str, tokenizer: Tokenizer, prompt_tokens: int) -> None:
        self.model, self.tokenizer, self.prompt_tokens = model, tokenizer, prompt_tokens
        self.started = time.perf_counter()
        self.first: float | None = None

    def seen(self, event: GenerationEvent) -> None:
        if self.first is None and event.tokens:
            self.first = time.perf_counter()

    def final(self, content: str, last: GenerationEvent) -> dict[str, Any]:
        now = time.perf_counter()
        first = self.first or now
        ended_by_token = bool(last.tokens) and last.tokens[-1].token_id in self._ends()
        stop_type = "limit" if last.finish_reason == "length" else "eos" if ended_by_token else "word"
        return {
            "content": content,
            "stop": True,
            "model": self.model,
            "tokens_predicted": last.completion_tokens,
            "tokens_evaluated": self.prompt_tokens,
            "tokens_cached": last.cached_tokens,
            "stop_type": stop_type,
            "truncated": False,
            "timings": {
                "prompt_n": self.prompt_tokens,
                "prompt_ms": round((first - self.started) * 1000, 3),
                "predicted_n": last.completion_tokens,
                "predicted_ms": round((now - first) * 1000, 3),
            },
        }

    def _ends(self) -> frozenset[int]:
        return self.tokenizer.eos_token_ids | self.tokenizer.fill_in_middle_stops


async def _stream(request: Request, stream: EventStream, answer: _Answer) -> AsyncIterator[str]:
    pieces: list[str] = []
    async for event in stream:
        answer.seen(event)
        if event.error:
            yield sse({"error": event_error(event, request.url.path).message})
            return
        if event.text:
            pieces.append(event.text)
            yield sse({"content": event.text, "stop": False})
        if event.finished:
            yield sse(answer.final("".join(pieces), event) | {"content": ""})
            return


ROUTES = [Route("/infill", infill, methods=["POST"])]
