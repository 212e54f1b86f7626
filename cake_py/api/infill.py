"""llama.cpp's POST /infill: fill in the middle for code editors (llama.vscode, llama.vim), with a code model's FIM
tokens. `input_prefix` and `input_suffix` are the code around the cursor, `prompt` the start of the cursor's line
(after the prefix, as llama.cpp puts it), `input_extra` other files' chunks (`[{"filename", "text"}]`); the answer
is llama.cpp's completion object (`content`, `stop`, `tokens_predicted`, `stop_type`, `timings`,
`generation_settings`, …), or with `stream` its SSE events, `data: {"content": "<piece>", "stop": false}`, then the
whole object with `stop: true` (no `[DONE]`, as llama.cpp sends none). Sampling takes llama.cpp's names and
defaults; `n_predict: 0` only reads the prompt into the prefix cache (the editors' warm-up requests); `n_indent` and
`t_max_predict_ms` end the middle as llama.cpp's server does (EditorLimits).
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

from cake_py.api.completions import no_fill_in_middle
from cake_py.api.errors import ApiError
from cake_py.api.schemas import flag, json_body, number, stop_strings
from cake_py.api.state import ServerState
from cake_py.api.streaming import EventStream, GenerationResponse, collect_all, event_error, open_streams, sse
from cake_py.engine.sequence import GenerationEvent
from cake_py.errors import RequestError
from cake_py.models.fill_in_middle import fim_prompt, fim_stops, fim_tokens
from cake_py.models.sampling import SamplingParams
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
    the suffix its end, three tokens to one."""
    ids = fim_prompt(tokenizer, prefix, suffix, typed=typed, files=files)
    if len(ids) <= budget:
        return ids, False
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
    over = len(ids) - budget
    if over > 0:
        from_suffix = min(len(after), over // 4)
        from_prefix = min(len(before), over - from_suffix)
        from_suffix = min(len(after), over - from_prefix)
        before, after = before[from_prefix:], after[: len(after) - from_suffix]
        ids = fim_prompt(tokenizer, before, after, typed=typed)
    return ids, True


class EditorLimits:
    """llama.cpp's limits for editors, on the middle as it streams: `n_indent` ends it before the first line (after
    its first) indented less than that many spaces or tabs, cut where that line's text begins; `t_max_predict_ms`
    ends it once that long has passed since its first token and it holds a line break. Either ends it `limit`."""

    def __init__(self, n_indent: int, t_max_predict_ms: float) -> None:
        self.n_indent, self.t_max = n_indent, t_max_predict_ms / 1000
        self.text = ""
        self.checked = -1  # the last line break whose next line's indentation is known
        self.started: float | None = None

    def __call__(self, event: GenerationEvent) -> GenerationEvent:
        if self.started is None and event.tokens:
            self.started = time.perf_counter()
        before = len(self.text)
        self.text += event.text
        cut = self._under_indented() if self.n_indent else None
        if cut is not None:
            self.text = self.text[:cut]
            return replace(event, text=self.text[before:], finish_reason="length")
        late = self.started is not None and time.perf_counter() - self.started > self.t_max
        if self.t_max and late and "\n" in self.text:
            return replace(event, finish_reason="length")
        return event

    def _under_indented(self) -> int | None:
        """Where the first under-indented line's text begins, once it is known; None while there is none."""
        while (newline := self.text.find("\n", self.checked + 1)) >= 0:
            start = newline + 1
            line = self.text[start:].split("\n", 1)[0]
            text_at = len(line) - len(line.lstrip(" \t"))
            if text_at == len(line):  # blank so far (or only indentation): not known yet
                if start + len(line) < len(self.text):  # a blank line: nothing to judge
                    self.checked = newline
                    continue
                return None
            self.checked = newline
            if text_at < self.n_indent:
                return start + text_at
        return None


def llama_sampling(body: dict[str, Any], context_length: int) -> tuple[SamplingParams, int]:
    """llama.cpp's sampling fields with its defaults, and `n_predict`: -1 (the default) generates until the end token
    or the context is full, 0 nothing (the prompt is only read)."""
    n_predict = int(number(body, "n_predict", -1, integer=True))
    if n_predict < -1:
        raise ApiError(400, f"n_predict must be -1 (no limit), 0 (read the prompt only) or more, got {n_predict}")
    seed = int(number(body, "seed", -1, integer=True))
    try:
        params = SamplingParams(
            max_tokens={-1: context_length, 0: 1}.get(n_predict, n_predict),
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
    return params, n_predict


async def infill(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    engine, source = state.ready()
    tokenizer = source.tokenizer
    body = await json_body(request)
    if fim_tokens(tokenizer) is None:
        raise ApiError(400, no_fill_in_middle("/infill", state.model_name))
    prefix, suffix, typed, files = (
        _text(body, "input_prefix"),
        _text(body, "input_suffix"),
        _text(body, "prompt"),
        _files(body),
    )
    params, n_predict = llama_sampling(body, engine.context_length)
    if not params.ignore_eos:  # the markers and file tokens a code model may write after the middle end it too
        params = replace(params, stop_token_ids=params.stop_token_ids | fim_stops(tokenizer))

    reserve = min(n_predict if n_predict > 0 else DEFAULT_ANSWER_ROOM, engine.context_length // 4)

    def prompt() -> tuple[list[int], bool]:
        return fitted_prompt(tokenizer, prefix, suffix, typed, files, engine.context_length - max(reserve, 1))

    prompt_ids, truncated = await run_in_threadpool(prompt)
    params = engine.check_prompt(len(prompt_ids), params)  # n_predict -1: what room the context has
    n_indent = int(number(body, "n_indent", 0, integer=True))
    t_max = float(number(body, "t_max_predict_ms", 0))
    if n_indent < 0 or t_max < 0:
        raise ApiError(400, f"n_indent and t_max_predict_ms must be 0 (off) or more, got {n_indent} and {t_max}")
    streams = open_streams(state, engine, [prompt_ids], [params])
    if n_indent or t_max:
        streams[0].limit = EditorLimits(n_indent, t_max)
    answer = _Answer(state.model_name, tokenizer, len(prompt_ids), params, n_predict, engine.context_length)
    answer.truncated = truncated
    if flag(body, "stream", False) and n_predict:
        return GenerationResponse(_stream(request, streams[0], answer), streams, "text/event-stream")
    result = (await collect_all(request, streams))[0]
    final = answer.final(result.text, result.last, streams[0])
    if flag(body, "stream", False):  # n_predict 0, streamed: its one event
        return GenerationResponse(_once(final), [], "text/event-stream")
    return JSONResponse(final)


class _Answer:
    """llama.cpp's completion object for one infill: what it counts, how it stopped, with which settings."""

    def __init__(
        self,
        model: str,
        tokenizer: Tokenizer,
        prompt_tokens: int,
        params: SamplingParams,
        n_predict: int,
        context_length: int,
    ) -> None:
        self.model, self.tokenizer, self.prompt_tokens = model, tokenizer, prompt_tokens
        self.params, self.n_predict, self.context_length = params, n_predict, context_length
        self.truncated = False  # the request was cut to fit the context

    def final(self, content: str, last: GenerationEvent, stream: EventStream) -> dict[str, Any]:
        now = time.perf_counter()
        first = stream.first_token_at or now
        computed = self.prompt_tokens - last.cached_tokens  # prompt tokens not given by the prefix cache
        predicted = last.completion_tokens if self.n_predict else 0  # n_predict 0: its one token is not an answer
        ended_by_token = bool(last.tokens) and last.tokens[-1].token_id in self._ends()
        stop_type = "limit" if last.finish_reason == "length" else "eos" if ended_by_token else "word"
        prompt_ms, predicted_ms = (first - stream.submitted) * 1000, (now - first) * 1000
        return {
            "content": content if self.n_predict else "",
            "stop": True,
            "model": self.model,
            "tokens_predicted": predicted,
            "tokens_evaluated": self.prompt_tokens,
            "tokens_cached": last.cached_tokens,
            "stop_type": "limit" if not self.n_predict else stop_type,
            "stopping_word": "",
            "truncated": self.truncated,
            "generation_settings": self._settings(),
            "timings": {
                "cache_n": last.cached_tokens,
                "prompt_n": computed,
                "prompt_ms": round(prompt_ms, 3),
                "prompt_per_token_ms": round(prompt_ms / max(computed, 1), 3),
                "prompt_per_second": round(computed / max(prompt_ms / 1000, 1e-9), 3),
                "predicted_n": predicted,
                "predicted_ms": round(predicted_ms, 3),
                "predicted_per_token_ms": round(predicted_ms / max(predicted, 1), 3),
                "predicted_per_second": round(predicted / max(predicted_ms / 1000, 1e-9), 3),
            },
        }

    def _settings(self) -> dict[str, Any]:
        params = self.params
        return {
            "n_ctx": self.context_length,
            "n_predict": self.n_predict,
            "model": self.model,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "min_p": params.min_p,
            "repeat_penalty": params.repetition_penalty,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "seed": -1 if params.seed is None else params.seed,
            "stop": list(params.stop),
            "ignore_eos": params.ignore_eos,
            "stream": False,
        }

    def _ends(self) -> frozenset[int]:
        return self.tokenizer.eos_token_ids | fim_stops(self.tokenizer)


async def _stream(request: Request, stream: EventStream, answer: _Answer) -> AsyncIterator[str]:
    pieces: list[str] = []
    async for event in stream:
        if event.error:
            yield sse({"error": event_error(event, request.url.path).message})
            return
        if event.text:
            pieces.append(event.text)
            yield sse({"content": event.text, "stop": False})
        if event.finished:
            yield sse(answer.final("".join(pieces), event, stream) | {"content": ""})
            return


async def _once(final: dict[str, Any]) -> AsyncIterator[str]:
    yield sse(final | {"content": ""})


ROUTES = [Route("/infill", infill, methods=["POST"])]
