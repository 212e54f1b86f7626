"""Structured output: grammars from JSON schemas, regexes, choices and Lark; the matcher's masks; the sampler and a
sequence held to them, on the tiny model's byte-level tokenizer with random logits (any token the model might
prefer)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cake_py.engine.sequence import Sequence
from cake_py.errors import RequestError
from cake_py.models.grammar import (
    MAX_CHOICES,
    choice_grammar,
    compiler_for,
    json_grammar,
    lark_grammar,
    regex_grammar,
)
from cake_py.models.sampling import Sampler, SamplingParams
from cake_py.models.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Tokenizer:
    return Tokenizer.from_folder(tiny_llama)


def _generate(
    tokenizer: Tokenizer, grammar: str, *, seed: int, max_tokens: int = 300, greedy: bool = False
) -> Sequence:
    """Run a sequence on random logits (a model that wants anything) until it ends; returns it."""
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, grammar=grammar)
    events: list[object] = []
    seq = Sequence(1, tokenizer.encode("hi"), params, tokenizer, events.append)
    random = torch.Generator().manual_seed(seed)
    width = tokenizer.vocab_size + 5  # logits wider than the tokenizer (padded embeddings): never drawn
    for _ in range(max_tokens):
        logits = torch.randn(width, generator=random) * 3
        event = seq.accept(seq.sampler.sample(logits, seq.all_ids))
        assert all(token.token_id < tokenizer.vocab_size for token in event.tokens)
        if event.finished:
            seq.last_event = event  # type: ignore[attr-defined]
            return seq
    raise AssertionError("the sequence never finished")


def _text(tokenizer: Tokenizer, seq: Sequence) -> str:
    return tokenizer.decode([t for t in seq.output_ids if t not in tokenizer.eos_token_ids])


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_is_valid_json_of_that_schema(tokenizer: Tokenizer, seed: int) -> None:
    seq = _generate(tokenizer, json_grammar(SCHEMA), seed=seed)
    value = json.loads(_text(tokenizer, seq))
    assert set(value) == {"ok", "color"}
    assert isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue")
    assert seq.last_event.finish_reason == "stop"  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", range(4))
def test_choice_and_regex_outputs_match_whole(tokenizer: Tokenizer, seed: int) -> None:
    choices = ["yes", "no", "maybe later", 'say "hi"\n']
    assert _text(tokenizer, _generate(tokenizer, choice_grammar(choices), seed=seed)) in choices
    pattern = r"[0-9]{3}-[a-z]{2}"
    assert re.fullmatch(pattern, _text(tokenizer, _generate(tokenizer, regex_grammar(pattern), seed=seed)))
    lark = 'start: "(" NUMBER ")"\nNUMBER: /[1-9][0-9]?/'
    assert re.fullmatch(r"\([1-9][0-9]?\)", _text(tokenizer, _generate(tokenizer, lark_grammar(lark), seed=seed)))


def test_greedy_with_a_grammar_takes_the_best_allowed_token(tokenizer: Tokenizer) -> None:
    grammar = choice_grammar(["alpha", "beta"])
    matcher = compiler_for(tokenizer).matcher(grammar)
    logits = torch.zeros(tokenizer.vocab_size)
    allowed = matcher.allowed(tokenizer.vocab_size)
    assert 0 < int(allowed.sum()) < tokenizer.vocab_size
    favourite = int(torch.nonzero(~allowed)[0])
    logits[favourite] = 100.0  # what the model wants most is forbidden
    best_allowed = int(torch.nonzero(allowed)[-1])
    logits[best_allowed] = 50.0
    sampler = Sampler(SamplingParams(temperature=0.0, logprobs=True), grammar=matcher)
    token = sampler.sample(logits, [])
    assert token.token_id == best_allowed
    assert token.logprob == pytest.approx(0.0, abs=1e-6)  # logprobs are of what could be drawn


def test_the_json_object_mode_gives_an_object(tokenizer: Tokenizer) -> None:
    for seed in range(3):
        seq = _generate(tokenizer, json_grammar(None), seed=seed, max_tokens=2000)
        if seq.last_event.finish_reason == "stop":  # type: ignore[attr-defined]
            assert isinstance(json.loads(_text(tokenizer, seq)), dict)
        else:  # random logits may write a long object: what there is starts one
            assert _text(tokenizer, seq).startswith("{")


def test_a_grammar_ending_with_max_tokens_stops_for_length(tokenizer: Tokenizer) -> None:
    seq = _generate(tokenizer, regex_grammar(r"a{50}"), seed=1, max_tokens=5)
    assert seq.last_event.finish_reason == "length"  # type: ignore[attr-defined]
    assert set(_text(tokenizer, seq)) == {"a"}


def test_each_sequence_gets_its_own_matcher(tokenizer: Tokenizer) -> None:
    grammar = choice_grammar(["left", "right"])
    first, second = (compiler_for(tokenizer).matcher(grammar) for _ in range(2))
    token = tokenizer.encode("left", add_special_tokens=False)[0]
    first.consume(token)
    assert not torch.equal(first.allowed(tokenizer.vocab_size), second.allowed(tokenizer.vocab_size))
    with pytest.raises(ValueError, match="does not allow token"):
        first.consume(tokenizer.encode("zzz", add_special_tokens=False)[0])


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: json_grammar([1, 2]), "must be an object"),  # type: ignore[arg-type]
        (lambda: json_grammar({"type": object()}), "cannot be read"),
        (lambda: regex_grammar(""), "non-empty string"),
        (lambda: regex_grammar(5), "non-empty string"),  # type: ignore[arg-type]
        (lambda: choice_grammar("yes"), "list of non-empty strings"),
        (lambda: choice_grammar([]), "list of non-empty strings"),
        (lambda: choice_grammar(["a", ""]), "list of non-empty strings"),
        (lambda: choice_grammar(["x"] * (MAX_CHOICES + 1)), f"at most {MAX_CHOICES}"),
        (lambda: lark_grammar("  "), "non-empty string"),
        (lambda: json_grammar({"description": "x" * 200_000}), "characters long"),
    ],
)
def test_bad_grammar_inputs_are_named(build: object, needle: str) -> None:
    with pytest.raises(RequestError, match=needle):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("grammar", "needle"),
    [
        (lambda: json_grammar({"type": "nonsense"}), "nonsense"),
        (lambda: json_grammar({"properties": {"a": {"$ref": "#/nowhere"}}}), "nowhere"),
        (lambda: regex_grammar("(unclosed"), "invalid"),
        (lambda: lark_grammar("start: missing_rule"), "missing_rule"),
    ],
)
def test_grammars_that_do_not_compile_are_request_errors(tokenizer: Tokenizer, grammar: object, needle: str) -> None:
    with pytest.raises(RequestError, match=needle):
        compiler_for(tokenizer).check(grammar())  # type: ignore[operator]


def test_a_sequence_with_a_bad_grammar_is_refused(tokenizer: Tokenizer) -> None:
    params = SamplingParams(grammar=json_grammar({"type": "nonsense"}))
    with pytest.raises(RequestError, match="nonsense"):
        Sequence(1, [1, 2], params, tokenizer, lambda event: None)
