"""llama.cpp's fields for its other samplers (models/llama_samplers.py), as its server reads them on `/completion`
and `/infill`: `samplers` (a list of names or a string of letters), `typical_p`, `min_keep`, `top_n_sigma`,
`xtc_probability`/`xtc_threshold`, `dry_*`, `mirostat`/`mirostat_tau`/`mirostat_eta`, `dynatemp_range`/
`dynatemp_exponent`; and the same settings as its `generation_settings` (and `/slots`) report them.

llama.cpp's server reads them on its OpenAI-compatible routes too (one parser for all its routes), and so does
this one (`openai_llama_sampling`): on /v1/completions, /v1/chat/completions and /v1/responses, a request that sends
any of them is sampled by llama.cpp's chain as on `/completion`, the temperature where `samplers` puts it (last by
default) rather than first as vLLM's order puts it; one that sends none is sampled exactly as before. There
`repeat_penalty` is llama.cpp's name for `repetition_penalty` (both sent with different values: a 400 naming both),
and `repeat_last_n` the last tokens it weighs (-1 all, 0 off; not sent, all of them, as `repetition_penalty` weighs
them on those routes)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from starlette.concurrency import run_in_threadpool

from cake_py.api.errors import ApiError
from cake_py.api.schemas import number
from cake_py.errors import RequestError
from cake_py.models.dry import dry_breakers
from cake_py.models.llama_samplers import DEFAULT_BREAKERS, DEFAULT_ORDER, SAMPLER_LETTERS, LlamaSamplers
from cake_py.models.sampling import SamplingParams
from cake_py.models.tokenizer import Tokenizer

MAX_BREAKERS = 32  # each one is a scan of the vocabulary (cached)
# llama.cpp's samplers this server has not: named as such rather than as unknown.
UNSUPPORTED = {"infill": "i", "adaptive_p": "a"}
# The fields `llama_samplers` reads: on the OpenAI routes, sending any of them turns llama.cpp's chain on.
SAMPLER_FIELDS = (
    *("samplers", "min_keep", "typical_p", "top_n_sigma", "xtc_probability", "xtc_threshold", "dry_multiplier"),
    *("dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "mirostat", "mirostat_tau"),
    *("mirostat_eta", "dynatemp_range", "dynatemp_exponent"),
)
PENALTY_FIELDS = ("repeat_penalty", "repeat_last_n")  # llama.cpp's names for the repetition penalty and its window


def _samplers(value: Any) -> tuple[str, ...]:
    """`samplers`: llama.cpp's names (its canonical ones, as its server reads a list) or a string of its letters."""
    if value is None:
        return DEFAULT_ORDER
    if isinstance(value, str):
        names = []
        for letter in value:
            if letter in UNSUPPORTED.values():
                raise ApiError(400, f"samplers: sampler {letter!r} is not supported by this server")
            if letter not in SAMPLER_LETTERS:
                known = "".join(SAMPLER_LETTERS)
                raise ApiError(400, f"samplers: unknown sampler letter {letter!r}; known: {known}"[:300])
            names.append(SAMPLER_LETTERS[letter])
        return tuple(names)
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ApiError(400, f"samplers must be a list of sampler names or a string of letters, got {value!r}"[:300])
    for name in value:
        if name in UNSUPPORTED:
            raise ApiError(400, f"samplers: sampler {name!r} is not supported by this server")
        if name not in DEFAULT_ORDER:
            raise ApiError(400, f"samplers: unknown sampler {name!r}; known: {', '.join(DEFAULT_ORDER)}"[:300])
    return tuple(value)


def _breakers(value: Any) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_BREAKERS
    if not isinstance(value, list) or not value or not all(isinstance(text, str) for text in value):
        raise ApiError(400, f"dry_sequence_breakers must be a non-empty array of strings, got {value!r}"[:300])
    if len(value) > MAX_BREAKERS:
        raise ApiError(400, f"dry_sequence_breakers holds {len(value)} strings; at most {MAX_BREAKERS} are allowed")
    return tuple(value)


def llama_samplers(body: dict[str, Any]) -> LlamaSamplers:
    """The request's settings, llama.cpp's defaults for those it leaves out. RequestError names a value out of
    range (the caller answers it with a 400)."""
    dry_base = float(number(body, "dry_base", 1.75))
    return LlamaSamplers(
        samplers=_samplers(body.get("samplers")),
        min_keep=int(number(body, "min_keep", 0, integer=True)),
        typical_p=float(number(body, "typical_p", 1.0)),
        top_n_sigma=float(number(body, "top_n_sigma", -1.0)),
        xtc_probability=float(number(body, "xtc_probability", 0.0)),
        xtc_threshold=float(number(body, "xtc_threshold", 0.1)),
        dry_multiplier=float(number(body, "dry_multiplier", 0.0)),
        dry_base=dry_base if dry_base >= 1.0 else 1.75,  # as llama.cpp: below 1, its default
        dry_allowed_length=int(number(body, "dry_allowed_length", 2, integer=True)),
        dry_penalty_last_n=int(number(body, "dry_penalty_last_n", -1, integer=True)),
        dry_sequence_breakers=_breakers(body.get("dry_sequence_breakers")),
        mirostat=int(number(body, "mirostat", 0, integer=True)),
        mirostat_tau=float(number(body, "mirostat_tau", 5.0)),
        mirostat_eta=float(number(body, "mirostat_eta", 0.1)),
        dynatemp_range=float(number(body, "dynatemp_range", 0.0)),
        dynatemp_exponent=float(number(body, "dynatemp_exponent", 1.0)),
    )


async def with_dry_breakers(params: SamplingParams, tokenizer: Tokenizer) -> SamplingParams:
    """`params` with DRY's breakers found in the vocabulary, when DRY runs (a scan of the vocabulary the first
    time a tokenizer sees these breakers: off the event loop)."""
    settings = params.llama
    if settings is None or not settings.dry_on or settings.mirostat or "dry" not in settings.samplers:
        return params
    breakers = await run_in_threadpool(dry_breakers, tokenizer, settings.dry_sequence_breakers)
    return replace(params, llama=replace(settings, dry_breakers=breakers))


async def openai_llama_sampling(params: SamplingParams, body: dict[str, Any], tokenizer: Tokenizer) -> SamplingParams:
    """`openai_llama_fields`, then DRY's breakers found in the vocabulary (`with_dry_breakers`)."""
    return await with_dry_breakers(openai_llama_fields(params, body), tokenizer)


def openai_llama_fields(params: SamplingParams, body: dict[str, Any]) -> SamplingParams:
    """`params` (an OpenAI route's own fields, `schemas.openai_sampling`) with llama.cpp's sampler and penalty
    fields of `body`, as the module's docstring says; unchanged when it sends none of them."""
    params = repeat_penalty_fields(params, body)
    if all(body.get(name) is None for name in SAMPLER_FIELDS):
        return params
    try:
        return replace(params, llama=llama_samplers(body), temperature_last=True)
    except RequestError as error:
        raise ApiError(400, str(error)) from error


def repeat_penalty_fields(params: SamplingParams, body: dict[str, Any]) -> SamplingParams:
    """`repeat_penalty` and `repeat_last_n` on an OpenAI route, where `repetition_penalty` names the same penalty."""
    if body.get("repeat_penalty") is None and body.get("repeat_last_n") is None:
        return params
    penalty = params.repetition_penalty
    if body.get("repeat_penalty") is not None:
        penalty = float(number(body, "repeat_penalty", 1.0))
        other = body.get("repetition_penalty")  # already checked to be a number (openai_sampling)
        if other is not None and float(other) != penalty:
            raise ApiError(
                400,
                f"repeat_penalty ({penalty:g}) and repetition_penalty ({float(other):g}) name one penalty: send one "
                "of them, or both with the same value",
            )
    last_n = int(number(body, "repeat_last_n", -1, integer=True))
    if last_n < -1:
        raise ApiError(400, f"repeat_last_n must be -1 (every token), 0 (off) or more, got {last_n}")
    try:
        return replace(params, repetition_penalty=penalty if last_n else 1.0, repetition_window=max(last_n, 0))
    except RequestError as error:  # named as the request sent it
        named = "repeat_penalty" if body.get("repeat_penalty") is not None else "repetition_penalty"
        raise ApiError(400, str(error).replace("repetition_penalty", named)) from error


def sampler_settings(params: SamplingParams, context_length: int) -> dict[str, Any]:
    """The settings as llama.cpp's generation_settings name them (dry_penalty_last_n -1 shown as the context, as
    llama.cpp shows it)."""
    settings = params.llama or LlamaSamplers()
    return {
        "dynatemp_range": settings.dynatemp_range,
        "dynatemp_exponent": settings.dynatemp_exponent,
        "top_n_sigma": settings.top_n_sigma,
        "typical_p": settings.typical_p,
        "min_keep": settings.min_keep,
        "xtc_probability": settings.xtc_probability,
        "xtc_threshold": settings.xtc_threshold,
        "dry_multiplier": settings.dry_multiplier,
        "dry_base": settings.dry_base,
        "dry_allowed_length": settings.dry_allowed_length,
        "dry_penalty_last_n": context_length if settings.dry_penalty_last_n == -1 else settings.dry_penalty_last_n,
        "dry_sequence_breakers": list(settings.dry_sequence_breakers),
        "mirostat": settings.mirostat,
        "mirostat_tau": settings.mirostat_tau,
        "mirostat_eta": settings.mirostat_eta,
        "samplers": list(settings.samplers),
    }
