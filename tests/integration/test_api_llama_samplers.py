"""llama.cpp's other samplers through its routes (`/completion`, `/infill`) on a real uvicorn server with the tiny
Llama: DRY breaking a repetition the model makes, mirostat running, a seed giving the same text whatever else is
batched, `samplers` as names or letters, a 400 naming each bad field, and the settings in `generation_settings`,
`/props` and `/slots`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from cake_py.models.tokenizer import Tokenizer
from tests.fixtures.server import ServerHandle

SERVED_MODEL = "tiny_llama_fim"  # the server and client fixtures (tests/integration/conftest.py); FIM for /infill
DEFAULT_SAMPLERS = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]


def post(server: ServerHandle, body: dict[str, Any], path: str = "/completion") -> Any:
    answer = httpx.post(f"{server.base_url}{path}", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def repeated_ngrams(tokens: list[int], n: int) -> int:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_dry_breaks_the_repetition_the_model_makes(server: ServerHandle, tiny_llama_fim: Path) -> None:
    """Greedy, with two tokens favoured, the tiny model loops over them; DRY (a multiplier far above the bias, a
    breaker it never writes) penalises every token that would extend a repeat of two tokens, the prompt's
    included: no 3 tokens come twice."""
    favoured = [Tokenizer.from_folder(tiny_llama_fim).encode_literal(text) for text in ("%", "&")]
    assert all(len(ids) == 1 for ids in favoured)
    body = {"prompt": "cake cake", "temperature": 0, "n_predict": 40, "ignore_eos": True, "return_tokens": True}
    body["logit_bias"] = [[ids[0], 10] for ids in favoured]
    plain = post(server, body)["tokens"]
    assert set(plain) <= {ids[0] for ids in favoured} and repeated_ngrams(plain, 3) > 20  # the loop to break
    dry = {**body, "dry_multiplier": 50.0, "dry_sequence_breakers": ["§§"]}
    answer = post(server, dry)
    assert repeated_ngrams(answer["tokens"], 3) == 0 and len(answer["tokens"]) == 40
    assert answer["generation_settings"]["dry_multiplier"] == 50.0
    assert answer["generation_settings"]["dry_sequence_breakers"] == ["§§"]
    # no repeat here is as long as an allowed length of 100: nothing is penalised, it loops as before
    assert post(server, {**dry, "dry_allowed_length": 100})["tokens"] == plain
    # the looping tokens as breakers (found in the vocabulary: each holds one whole): no repeat reaches back past
    # the last one, so DRY has nothing to penalise and it loops as before
    breakers = ["%", "&"]
    assert post(server, {**dry, "dry_sequence_breakers": breakers})["tokens"] == plain


def test_mirostat_runs_and_a_seed_repeats_it(server: ServerHandle) -> None:
    body = {"prompt": "Once upon a time", "n_predict": 12, "seed": 5, "mirostat": 2, "mirostat_tau": 3.0}
    first, again = post(server, {**body, "return_tokens": True}), post(server, {**body, "return_tokens": True})
    assert len(first["tokens"]) == first["tokens_predicted"] > 0 and first["tokens"] == again["tokens"]
    settings = first["generation_settings"]
    assert (settings["mirostat"], settings["mirostat_tau"], settings["mirostat_eta"]) == (2, 3.0, 0.1)
    assert post(server, {**body, "mirostat": 1, "n_predict": 4})["tokens_predicted"] > 0


def test_a_seed_gives_the_same_text_whatever_is_batched(server: ServerHandle) -> None:
    """XTC's coin and the draw come from the sequence's own generator: alone, or beside other prompts."""
    sampling = {"n_predict": 16, "seed": 11, "xtc_probability": 0.5, "xtc_threshold": 0.05, "typical_p": 0.9}
    sampling |= {"top_n_sigma": 2.0, "dynatemp_range": 0.5, "dry_multiplier": 0.8, "ignore_eos": True}
    alone = post(server, {"prompt": "The cake is", **sampling})["content"]
    batched = post(server, {"prompt": ["The cake is", "Another prompt entirely", "x y z"], **sampling})
    assert batched[0]["content"] == alone
    streamed = httpx.post(f"{server.base_url}/completion", json={"prompt": "The cake is", "stream": True, **sampling})
    pieces = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert "".join(piece["content"] for piece in pieces) == alone


def test_samplers_choose_the_order_by_names_or_letters(server: ServerHandle) -> None:
    names = post(server, {"prompt": "cake", "n_predict": 2, "samplers": ["top_k", "temperature"]})
    assert names["generation_settings"]["samplers"] == ["top_k", "temperature"]
    letters = post(server, {"prompt": "cake", "n_predict": 2, "samplers": "edkypmxt"})  # as llama.cpp's --sampling-seq
    assert letters["generation_settings"]["samplers"] == [name for name in DEFAULT_SAMPLERS if name != "top_n_sigma"]
    # without the temperature in the chain, temperature 0 is no longer greedy: two seeds draw differently
    draws = {
        post(server, {"prompt": "cake", "n_predict": 6, "temperature": 0, "samplers": [], "seed": seed})["content"]
        for seed in range(4)
    }
    assert len(draws) > 1


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("typical_p", 1.5, "typical_p must be between 0 and 1, got 1.5"),
        ("min_keep", -1, "min_keep must be 0 or more, got -1"),
        ("min_keep", 1.5, "min_keep must be an integer"),
        ("xtc_probability", 2, "xtc_probability must be between 0 and 1, got 2"),
        ("xtc_threshold", -0.1, "xtc_threshold must be between 0 and 1"),
        ("dry_multiplier", -1, "dry_multiplier must be 0 or more, got -1"),
        ("dry_allowed_length", -1, "dry_allowed_length must be 0 or more"),
        ("dry_penalty_last_n", -2, "dry_penalty_last_n must be -1 (the whole context), 0 (off) or more, got -2"),
        ("dry_sequence_breakers", [], "dry_sequence_breakers must be a non-empty array of strings"),
        ("dry_sequence_breakers", "\n", "dry_sequence_breakers must be a non-empty array of strings"),
        ("dry_sequence_breakers", ["a"] * 33, "at most 32"),
        ("mirostat", 3, "mirostat must be 0 (off), 1 or 2, got 3"),
        ("mirostat_tau", -1, "mirostat_tau must be 0 or more"),
        ("mirostat_eta", "fast", "mirostat_eta must be a number"),
        ("dynatemp_range", -0.5, "dynatemp_range must be 0 or more, got -0.5"),
        ("dynatemp_exponent", -1, "dynatemp_exponent must be 0 or more"),
        ("top_n_sigma", "wide", "top_n_sigma must be a number"),
        ("samplers", ["top_k", "nucleus"], "unknown sampler 'nucleus'"),
        ("samplers", "kq", "unknown sampler letter 'q'"),
        ("samplers", ["infill"], "sampler 'infill' is not supported"),
        ("samplers", [1], "samplers must be a list of sampler names or a string of letters"),
    ],
)
def test_bad_sampler_fields_are_named(server: ServerHandle, field: str, value: Any, needle: str) -> None:
    for path, body in (("/completion", {"prompt": "a"}), ("/infill", {"input_prefix": "def f(", "input_suffix": ")"})):
        answer = httpx.post(f"{server.base_url}{path}", json={**body, field: value}, timeout=60)
        assert answer.status_code == 400 and needle in answer.json()["error"], (path, answer.text)


def test_neutral_values_are_accepted_and_dry_base_below_1_is_llama_cpps_default(server: ServerHandle) -> None:
    body = {"prompt": "The cake is", "temperature": 0, "n_predict": 6}
    neutral = {"typical_p": 1.0, "xtc_probability": 0, "dry_multiplier": 0, "mirostat": 0, "top_n_sigma": -1}
    answer = post(server, {**body, **neutral, "dry_base": 0.5, "min_keep": 1})
    assert answer["content"] == post(server, body)["content"]
    assert answer["generation_settings"]["dry_base"] == 1.75


def test_infill_honours_the_samplers(server: ServerHandle) -> None:
    body = {"input_prefix": "def area(r):\n    return ", "input_suffix": "\n", "n_predict": 8, "seed": 3}
    body |= {"mirostat": 2, "samplers": "kt"}
    answer = post(server, body, "/infill")
    assert answer["generation_settings"]["samplers"] == ["top_k", "temperature"]
    assert answer["generation_settings"]["mirostat"] == 2
    assert post(server, body, "/infill")["content"] == answer["content"]


def test_props_and_slots_report_the_settings(server: ServerHandle) -> None:
    props = httpx.get(f"{server.base_url}/props", timeout=60).json()["default_generation_settings"]
    engine = server.state.engine
    assert engine is not None
    assert props["samplers"] == DEFAULT_SAMPLERS and props["params"]["samplers"] == DEFAULT_SAMPLERS
    assert props["dry_sequence_breakers"] == ["\n", ":", '"', "*"]
    assert props["dry_penalty_last_n"] == engine.context_length  # -1: the context, shown as llama.cpp shows it
    expected = {"typical_p": 1.0, "top_n_sigma": -1.0, "xtc_probability": 0.0, "xtc_threshold": 0.1, "min_keep": 0}
    expected |= {"dry_multiplier": 0.0, "dry_base": 1.75, "dry_allowed_length": 2, "mirostat": 0}
    expected |= {"mirostat_tau": 5.0, "mirostat_eta": 0.1, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0}
    assert {key: props[key] for key in expected} == expected
    slot = httpx.get(f"{server.base_url}/slots", timeout=60).json()[0]
    assert slot["params"]["samplers"] == DEFAULT_SAMPLERS and slot["params"]["typical_p"] == 1.0
