"""llama.cpp server's shapes, shared by its routes here (`/completion`, `/infill`): its sampling names and defaults
(`n_predict`, `repeat_penalty`, `n_probs`, `logit_bias` as pairs), its editor limits (`n_indent`,
`t_max_predict_ms`), its completion object (`content`, `stop`, `tokens_predicted`, `stop_type`, `stopping_word`,
`timings`, `generation_settings`, …; `response_fields` picks some of it) and its SSE stream: `data: {"content":
"<piece>", "stop": false}` events, then the whole object with `stop: true`, and no `[DONE]` (llama.cpp sends none)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from starlette.requests import Request

from cake_py.api.errors import ApiError
from cake_py.api.llama_sampler_fields import llama_samplers, sampler_settings
from cake_py.api.schemas import flag, number, stop_strings
from cake_py.api.streaming import EventStream, event_error, merged, sse
from cake_py.engine.sequence import GenerationEvent
from cake_py.errors import RequestError
from cake_py.models.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SampledToken, SamplingParams
from cake_py.models.tokenizer import Tokenizer

_TOKEN_ID = re.compile(r"-?[0-9]+")  # ASCII digits: str.isdigit() also takes "²", which int() refuses


def _logit_bias(value: Any, tokenizer: Tokenizer, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """llama.cpp's `logit_bias`: `[[token, bias], …]` or `{"token": bias}`, a token being an id or a string (each of
    its tokens, read as plain text), the bias a number or `false` (never drawn: the lowest bias there is)."""
    if value is None:
        return ()
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, list) or not all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in pairs):
        raise ApiError(400, f"logit_bias must be [[token, bias], …] or {{token: bias}}, got {value!r}"[:300])
    biases: dict[int, float] = {}
    for token, bias in pairs:
        if bias is False:
            bias = -MAX_LOGIT_BIAS
        finite = isinstance(bias, int) or (isinstance(bias, float) and math.isfinite(bias))
        if isinstance(bias, bool) or not finite:
            raise ApiError(400, f"logit_bias of {token!r} must be a number or false, got {bias!r}"[:300])
        if isinstance(token, str) and _TOKEN_ID.fullmatch(token) and isinstance(value, dict):
            # An object's keys are strings: "15043" names token 15043.
            digits = token.lstrip("-").lstrip("0") or "0"  # int() refuses 4,300 digits, leading zeros included
            if len(digits) > 18:  # no vocabulary is that large
                raise ApiError(400, f"logit_bias token id {token[:20]}… is outside the vocabulary [0, {vocab_size})")
            ids = [-int(digits) if token.startswith("-") else int(digits)]
        elif isinstance(token, str):
            ids = tokenizer.encode_literal(token)
        elif isinstance(token, int) and not isinstance(token, bool):
            ids = [token]
        else:
            raise ApiError(400, f"logit_bias token must be an id or a string, got {token!r}"[:300])
        for token_id in ids:
            if not 0 <= token_id < vocab_size:
                raise ApiError(400, f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size})")
            biases[token_id] = float(max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, bias)))  # an int past float's range too
    return tuple(biases.items())


DEFAULT_REPEAT_LAST_N = 64


def requested_repeat_last_n(body: dict[str, Any]) -> int:
    repeat_last_n = int(number(body, "repeat_last_n", DEFAULT_REPEAT_LAST_N, integer=True))
    if repeat_last_n < -1:
        raise ApiError(400, f"repeat_last_n must be -1 (every token), 0 (off) or more, got {repeat_last_n}")
    return repeat_last_n


def llama_sampling(
    body: dict[str, Any], context_length: int, tokenizer: Tokenizer, vocab_size: int
) -> tuple[SamplingParams, int]:
    """llama.cpp's sampling fields with its defaults, and `n_predict` (or else `max_tokens`): -1 (the default)
    generates until the end token or the context is full, 0 nothing (the prompt is only read). `n_probs` > 0 asks
    for that many alternatives of each generated token (at most 20 here), from the model's own distribution
    (llama.cpp's default; `post_sampling_probs` is not supported). `repeat_penalty` weighs the last
    `repeat_last_n` tokens (64; 0: off; -1: all). llama.cpp's other samplers and their order: llama_sampler_fields
    (DRY's breakers are found in the vocabulary afterwards: `with_dry_breakers`). `vocab_size` is the model's (the
    logits'), which bounds logit_bias ids."""
    if flag(body, "post_sampling_probs", False):
        raise ApiError(400, "post_sampling_probs is not supported: n_probs gives the model's own probabilities")
    repeat_last_n = requested_repeat_last_n(body)
    # As llama.cpp reads it: OpenAI's max_tokens when n_predict is not sent (clients that speak both send it).
    key = "n_predict" if body.get("n_predict") is not None else "max_tokens"
    n_predict = int(number(body, key, -1, integer=True))
    if n_predict < -1:
        raise ApiError(400, f"{key} must be -1 (no limit), 0 (read the prompt only) or more, got {n_predict}")
    seed = int(number(body, "seed", -1, integer=True))
    n_probs = int(number(body, "n_probs", 0, integer=True))
    if not 0 <= n_probs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"n_probs must be between 0 and {MAX_TOP_LOGPROBS}, got {n_probs}")
    try:
        params = SamplingParams(
            max_tokens={-1: context_length, 0: 1}.get(n_predict, n_predict),
            temperature=max(0.0, float(number(body, "temperature", 0.8))),  # llama.cpp: ≤ 0 is greedy
            top_k=max(0, int(number(body, "top_k", 40, integer=True))),  # ≤ 0: off
            top_p=float(number(body, "top_p", 0.95)),
            min_p=float(number(body, "min_p", 0.05)),
            repetition_penalty=float(number(body, "repeat_penalty", 1.0)) if repeat_last_n else 1.0,
            repetition_window=max(repeat_last_n, 0),
            presence_penalty=float(number(body, "presence_penalty", 0.0)),
            frequency_penalty=float(number(body, "frequency_penalty", 0.0)),
            logit_bias=_logit_bias(body.get("logit_bias"), tokenizer, vocab_size),
            seed=None if seed == -1 else seed,
            stop=stop_strings(body.get("stop")),
            ignore_eos=flag(body, "ignore_eos", False),
            logprobs=n_probs > 0,
            top_logprobs=n_probs,
            raw_logprobs=True,
            temperature_last=True,
            llama=llama_samplers(body),
        )
    except RequestError as error:  # named by llama.cpp's fields, as the request sent them
        raise ApiError(400, str(error).replace("repetition_penalty", "repeat_penalty")) from error
    return params, n_predict


def response_fields(body: dict[str, Any]) -> tuple[str, ...]:
    """llama.cpp's `response_fields`: the whole answer's fields to send (`generation_settings/n_predict` names a
    nested one); absent or empty: all of them."""
    fields = body.get("response_fields")
    if fields is None:
        return ()
    if not isinstance(fields, list) or not all(isinstance(field, str) for field in fields):
        raise ApiError(400, f"response_fields must be a list of field names, got {fields!r}"[:300])
    return tuple(fields)


def picked(answer: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """As llama.cpp picks `response_fields`: each path found (`a/b` reads `answer["a"]["b"]`) under its whole path
    as the key; a path not found is left out, without an error."""
    found: dict[str, Any] = {}
    for path in fields:
        value: Any = answer
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            found[path] = value
    return found


class EditorLimits:
    """llama.cpp's limits for editors, on the text as it streams: `n_indent` ends it before the first line (after
    its first) indented less than that many spaces or tabs, cut where that line's text begins; `t_max_predict_ms`
    ends it once that long has passed since its first token and it holds a line break. Either ends it `limit`."""

    def __init__(self, n_indent: int, t_max_predict_ms: float) -> None:
        self.n_indent, self.t_max = n_indent, t_max_predict_ms / 1000
        self.text = ""
        self.checked = -1  # the last line break whose next line's indentation is known
        self.started: float | None = None

    @classmethod
    def of(cls, body: dict[str, Any]) -> EditorLimits | None:
        """The request's limits; None when it sets none."""
        n_indent = int(number(body, "n_indent", 0, integer=True))
        t_max = float(number(body, "t_max_predict_ms", 0))
        if n_indent < 0 or t_max < 0:
            raise ApiError(400, f"n_indent and t_max_predict_ms must be 0 (off) or more, got {n_indent} and {t_max}")
        return cls(n_indent, t_max) if n_indent or t_max else None

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
        if self.t_max and late and "\n" in self.text and not event.finished:
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


class Completion:
    """llama.cpp's completion object for one prompt: what it counts, how it stopped, with which settings."""

    def __init__(
        self,
        model: str,
        tokenizer: Tokenizer,
        prompt_tokens: int,
        params: SamplingParams,
        n_predict: int,
        context_length: int,
        *,
        index: int = 0,
        prompt: str | None = None,
        return_tokens: bool = False,
        stream: bool = False,
        repeat_last_n: int = DEFAULT_REPEAT_LAST_N,
        fields: tuple[str, ...] = (),
        timings_per_token: bool = False,
    ) -> None:
        self.model, self.tokenizer, self.prompt_tokens = model, tokenizer, prompt_tokens
        self.params, self.n_predict, self.context_length = params, n_predict, context_length
        self.index, self.prompt, self.return_tokens = index, prompt, return_tokens
        self.stream, self.repeat_last_n = stream, repeat_last_n  # as asked: the settings report them
        self.fields = fields  # response_fields: the whole answer's fields to send (none: all)
        self.timings_per_token = timings_per_token  # each streamed piece carries the timings so far
        self.truncated = False  # the request was cut to fit the context

    def piece(self, event: GenerationEvent, stream: EventStream) -> dict[str, Any]:
        """A streamed event's object, as llama.cpp's: its text, its tokens (always) and their probabilities when
        asked for, the counts so far, and with `timings_per_token` the timings so far."""
        piece = {
            "index": self.index,
            "content": event.text,
            "stop": False,
            "id_slot": -1,
            "tokens_predicted": event.completion_tokens,
            "tokens_evaluated": self.prompt_tokens,
            **self._tokens(event.tokens, True),
        }
        if self.timings_per_token:
            piece["timings"] = self._timings(event.cached_tokens, event.completion_tokens, stream)
        return piece

    def final(
        self,
        content: str,
        last: GenerationEvent,
        stream: EventStream,
        tokens: list[SampledToken],
        *,
        streamed: bool = False,
    ) -> dict[str, Any]:
        """The whole object, once `last` ended it: `content` and `tokens` are all it generated (`streamed`: its
        pieces went out before it, and its own `content` is empty)."""
        predicted = last.completion_tokens if self.n_predict else 0  # n_predict 0: its one token is not an answer
        by_word = isinstance(last.stop_reason, str)
        stop_type = "limit" if last.finish_reason == "length" else "word" if by_word else "eos"
        if by_word and tokens:  # as llama.cpp: the stop word's tokens leave with its text (content has neither)
            tokens = tokens[: max(len(tokens) - len(self.tokenizer.encode_literal(str(last.stop_reason))), 0)]
        # Out of room: the context filled before the answer ended (llama.cpp's truncated; /infill also sets it
        # when it cut the prompt).
        full = last.finish_reason == "length" and self.prompt_tokens + last.completion_tokens >= self.context_length
        answer: dict[str, Any] = {
            "index": self.index,
            "content": content if self.n_predict and not streamed else "",
            "id_slot": -1,
            "stop": True,
            "model": self.model,
            "tokens_predicted": predicted,
            "tokens_evaluated": self.prompt_tokens,
            "tokens_cached": last.cached_tokens,
            "stop_type": "limit" if not self.n_predict else stop_type,
            "has_new_line": "\n" in content if self.n_predict else False,
            "stopping_word": last.stop_reason if by_word else "",
            "truncated": self.truncated or full,
            "generation_settings": self.settings(),
            "timings": self._timings(last.cached_tokens, predicted, stream),
        }
        if self.prompt is not None:
            answer["prompt"] = self.prompt
        answer |= self._tokens(tokens) if self.n_predict else {}
        return picked(answer, self.fields) if self.fields else answer

    def _timings(self, cached: int, predicted: int, stream: EventStream) -> dict[str, Any]:
        """llama.cpp's `timings` until now: the prompt's (until the first token), then the tokens predicted since."""
        now = time.perf_counter()
        first = stream.first_token_at or now
        computed = self.prompt_tokens - cached  # prompt tokens not given by the prefix cache
        prompt_ms, predicted_ms = (first - stream.submitted) * 1000, (now - first) * 1000
        return {
            "cache_n": cached,
            "prompt_n": computed,
            "prompt_ms": round(prompt_ms, 3),
            "prompt_per_token_ms": round(prompt_ms / max(computed, 1), 3),
            "prompt_per_second": round(computed / max(prompt_ms / 1000, 1e-9), 3),
            "predicted_n": predicted,
            "predicted_ms": round(predicted_ms, 3),
            "predicted_per_token_ms": round(predicted_ms / max(predicted, 1), 3),
            "predicted_per_second": round(predicted / max(predicted_ms / 1000, 1e-9), 3),
        }

    def _tokens(self, tokens: list[SampledToken], streamed: bool = False) -> dict[str, Any]:
        # `tokens` is always there, as llama.cpp sends it: in the whole answer empty unless return_tokens asks.
        shown = streamed or self.return_tokens
        found: dict[str, Any] = {"tokens": [token.token_id for token in tokens] if shown else []}
        if self.params.logprobs:
            found["completion_probabilities"] = [
                {
                    **self._entry(t.token_id, t.logprob or 0.0),
                    "top_logprobs": [self._entry(i, lp) for i, lp in t.top_logprobs],
                }
                for t in tokens
            ]
        return found

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self.tokenizer.token_bytes(token_id)
        # Part of a character decodes to nothing, as llama.cpp trims it; `bytes` keeps it.
        return {"id": token_id, "token": raw.decode("utf-8", "ignore"), "logprob": logprob, "bytes": list(raw)}

    def settings(self) -> dict[str, Any]:
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
            "repeat_last_n": self.repeat_last_n,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "seed": -1 if params.seed is None else params.seed,
            "stop": list(params.stop),
            "ignore_eos": params.ignore_eos,
            "n_probs": params.top_logprobs,
            "logit_bias": [list(pair) for pair in params.logit_bias],
            "stream": self.stream,
            **sampler_settings(params, self.context_length),
        }


async def completion_events(
    request: Request, streams: list[EventStream], answers: list[Completion]
) -> AsyncIterator[str]:
    """Each prompt's SSE events as they come (tagged with its `index`): each text piece, then its whole object with
    `stop: true` and empty content."""
    pieces: list[list[str]] = [[] for _ in streams]
    async for index, event in merged(streams):
        if event.error:
            yield sse({"error": event_error(event, request.url.path).message})
            return
        answer = answers[index]
        pieces[index].append(event.text)
        if event.text or event.tokens:  # a token whose text is not whole yet goes too, with its id
            yield sse(answer.piece(event, streams[index]))
        if event.finished:
            # Its tokens went out with the pieces: the last object repeats none of them.
            yield sse(answer.final("".join(pieces[index]), event, streams[index], [], streamed=True))


async def one_event(*finals: dict[str, Any]) -> AsyncIterator[str]:
    """The stream of answers that generate nothing (`n_predict: 0`, their content empty): each one's last object."""
    for final in finals:
        yield sse(final)
