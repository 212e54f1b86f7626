"""Structured output: grammars from JSON schemas, regexes, choices and Lark; the matcher's masks; the sampler and a
sequence held to them, on the tiny model's byte-level tokenizer with random logits (any token the model might
prefer)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

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


def _generate(tokenizer: Tokenizer, grammar: str, *, seed: int, max_tokens: int = 300, **options: Any) -> Sequence:
    """Run a sequence on random logits (a model that wants anything) until it ends; returns it."""
    compiled = compiler_for(tokenizer).compile(grammar)
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, grammar=compiled, **options)
    events: list[Any] = []
    seq = Sequence(1, tokenizer.encode("hi"), params, tokenizer, events.append)
    random = torch.Generator().manual_seed(seed)
    width = tokenizer.vocab_size + 5  # logits wider than the tokenizer (padded embeddings): never drawn
    for _ in range(max_tokens):
        logits = torch.randn(width, generator=random) * 3
        event = seq.accept(seq.sampler.sample(logits, seq.all_ids))
        events.append(event)
        seq.events = events  # type: ignore[attr-defined]
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
    matcher = compiler_for(tokenizer).compile(grammar).start()
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
    first, second = (compiler_for(tokenizer).compile(grammar).start() for _ in range(2))
    token = tokenizer.encode("left", add_special_tokens=False)[0]
    first.consume(token)
    assert not torch.equal(first.allowed(tokenizer.vocab_size), second.allowed(tokenizer.vocab_size))
    with pytest.raises(RequestError, match="grammar failed"):
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
        # What is wrong with a regex: the parser's report says it after the pattern and a caret line.
        (lambda: regex_grammar("[a-"), "regex parse error: unclosed character class"),
        (lambda: json_grammar({"type": "string", "pattern": "(?=x)"}), "look-around"),
        (lambda: regex_grammar("(" * 300 + "a" + ")" * 300), r"\(\.\.\. .*nested parentheses"),
        (lambda: lark_grammar("start: missing_rule"), "missing_rule"),
        (lambda: lark_grammar("root ::= x\nx ::= root"), "matches no text"),  # GBNF; it used to fail mid-request
    ],
)
def test_grammars_that_do_not_compile_are_request_errors(tokenizer: Tokenizer, grammar: object, needle: str) -> None:
    with pytest.raises(RequestError, match=needle) as caught:
        compiler_for(tokenizer).compile(grammar())  # type: ignore[operator]
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 600


def test_errors_during_generation_are_named_and_do_not_poison_the_grammar(tokenizer: Tokenizer) -> None:
    # Compiles, then hits a parser limit at its first token: a request error naming it, and the compiled grammar
    # is dropped (copies share its exhausted state), so the next request compiles afresh.
    grammar = regex_grammar("a{1000000}")
    compiler = compiler_for(tokenizer)
    compiled = compiler.compile(grammar)
    with pytest.raises(RequestError, match="grammar failed") as caught:
        _generate(tokenizer, grammar, seed=0, max_tokens=3)
    assert len(str(caught.value)) < 400
    assert compiler.compile(grammar) is not compiled


def test_deep_grammars_compile_without_overflowing_the_stack(tokenizer: Tokenizer) -> None:
    # Each level is a recursion inside llguidance: on a normal thread's stack these killed the process.
    chain = "start: r0\n" + "\n".join(f'r{i}: "a" r{i + 1} | "b"' for i in range(3000)) + '\nr3000: "end"'
    compiler_for(tokenizer).compile(lark_grammar(chain))
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(1200)}
    defs["d1200"] = {"type": "string"}
    compiler_for(tokenizer).compile(json_grammar({"$defs": defs, "$ref": "#/$defs/d0"}))


def test_top_logprobs_list_only_tokens_that_could_be_drawn(tokenizer: Tokenizer) -> None:
    events: list[Any] = []
    compiled = compiler_for(tokenizer).compile(choice_grammar(["yes", "no"]))
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=1, logprobs=True, top_logprobs=20, grammar=compiled)
    seq = Sequence(1, [1], params, tokenizer, events.append)
    token = seq.sampler.sample(torch.randn(tokenizer.vocab_size), seq.all_ids)
    assert 1 <= len(token.top_logprobs) <= 2
    assert all(math.isfinite(logprob) for _, logprob in token.top_logprobs)


def test_the_structure_ends_the_choice_even_with_ignore_eos(tokenizer: Tokenizer) -> None:
    seq = _generate(tokenizer, choice_grammar(["done"]), seed=0, ignore_eos=True)
    assert seq.last_event.finish_reason == "stop"  # type: ignore[attr-defined]
    assert _text(tokenizer, seq) == "done"
    assert not set(seq.output_ids) & tokenizer.eos_token_ids


def test_a_grammar_and_min_tokens_that_leave_no_token_are_a_request_error(tokenizer: Tokenizer) -> None:
    # The one token the grammar allows is a stop token, which min_tokens holds back.
    (only,) = tokenizer.encode("q", add_special_tokens=False)
    with pytest.raises(RequestError, match="no token can come next"):
        _generate(tokenizer, choice_grammar(["q"]), seed=0, min_tokens=2, stop_token_ids=frozenset({only}))


def test_tokens_after_the_end_keep_finish_reason_and_stop_strings(tokenizer: Tokenizer) -> None:
    seq = _generate(tokenizer, choice_grammar(["alpha beta"]), seed=0, stop=(" beta",))
    assert seq.last_event.finish_reason == "stop"  # type: ignore[attr-defined]
    assert "".join(event.text for event in seq.events) == "alpha"  # type: ignore[attr-defined]


def test_the_compiled_grammars_kept_are_bounded_by_their_text(tokenizer: Tokenizer) -> None:
    compiler = compiler_for(tokenizer)
    big = [json_grammar({"description": f"{index}" + "x" * 90_000}) for index in range(15)]
    for grammar in big:
        compiler.compile(grammar)
    assert compiler._chars <= 1_000_000  # noqa: SLF001
    assert 1 <= len(compiler._compiled) < len(big)  # noqa: SLF001
    assert big[-1] in compiler._compiled and big[0] not in compiler._compiled  # noqa: SLF001
