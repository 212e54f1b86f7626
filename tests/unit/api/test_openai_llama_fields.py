"""llama.cpp's sampler and penalty fields read on the OpenAI routes (api/llama_sampler_fields.py): none sent leaves
the route's own sampling as it was; any sent brings llama.cpp's chain and its order; `repeat_penalty` is
`repetition_penalty` by llama.cpp's name, `repeat_last_n` its window."""

from __future__ import annotations

from typing import Any

import pytest

from cake_py.api.errors import ApiError
from cake_py.api.llama_sampler_fields import openai_llama_fields, repeat_penalty_fields
from cake_py.api.schemas import openai_sampling
from cake_py.models.llama_samplers import DEFAULT_ORDER

VOCAB = 100


def read(body: dict[str, Any]) -> Any:
    return openai_llama_fields(openai_sampling(body, vocab_size=VOCAB), body)


def test_without_llama_fields_nothing_changes() -> None:
    body = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.2, "stop": "x"}
    assert read(body) == openai_sampling(body, vocab_size=VOCAB)
    assert read({**body, "mirostat": None}) == openai_sampling(body, vocab_size=VOCAB)  # null: not sent


def test_any_llama_field_brings_its_chain_with_the_temperature_last() -> None:
    params = read({"temperature": 0.7, "mirostat": 2, "mirostat_tau": 3})
    assert params.temperature_last and params.llama is not None
    assert (params.llama.mirostat, params.llama.mirostat_tau, params.llama.mirostat_eta) == (2, 3.0, 0.1)
    assert params.llama.samplers == DEFAULT_ORDER
    neutral = read({"typical_p": 1.0})
    assert neutral.temperature_last and neutral.llama is not None and neutral.llama.typical_p == 1.0
    assert read({"samplers": "kt"}).llama.samplers == ("top_k", "temperature")


@pytest.mark.parametrize(
    ("body", "penalty", "window"),
    [
        ({"repeat_penalty": 1.3}, 1.3, 0),  # every token, as repetition_penalty weighs them on these routes
        ({"repeat_penalty": 1.3, "repeat_last_n": 64}, 1.3, 64),
        ({"repeat_penalty": 1.3, "repeat_last_n": -1}, 1.3, 0),
        ({"repeat_penalty": 1.3, "repeat_last_n": 0}, 1.0, 0),  # 0: off, as llama.cpp reads it
        ({"repetition_penalty": 1.3, "repeat_last_n": 8}, 1.3, 8),  # the window applies under either name
        ({"repetition_penalty": 1.3, "repeat_penalty": 1.3}, 1.3, 0),  # both, agreeing
        ({"repetition_penalty": 1.3}, 1.3, 0),
    ],
)
def test_repeat_penalty_and_its_window(body: dict[str, Any], penalty: float, window: int) -> None:
    params = repeat_penalty_fields(openai_sampling(body, vocab_size=VOCAB), body)
    assert (params.repetition_penalty, params.repetition_window) == (penalty, window)
    assert params.llama is None  # penalties alone are the default path's: no chain


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"repeat_penalty": 1.3, "repetition_penalty": 1.2}, "repeat_penalty (1.3) and repetition_penalty (1.2)"),
        ({"repeat_penalty": 0}, "repeat_penalty must be in (0, 10], got 0.0"),
        ({"repeat_penalty": True}, "repeat_penalty must be a number, got True"),
        ({"repeat_last_n": 1.5}, "repeat_last_n must be an integer, got 1.5"),
        ({"repeat_last_n": -3}, "repeat_last_n must be -1 (every token), 0 (off) or more, got -3"),
        ({"xtc_threshold": 2}, "xtc_threshold must be between 0 and 1, got 2"),
        ({"samplers": ["top_k", "adaptive_p"]}, "sampler 'adaptive_p' is not supported"),
        ({"dry_allowed_length": -1}, "dry_allowed_length must be 0 or more, got -1"),
    ],
)
def test_bad_values_are_named(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiError) as refused:
        read(body)
    assert refused.value.status == 400 and message in refused.value.message
