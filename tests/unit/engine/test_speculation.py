"""Prompt lookup decoding: drafts come from the sequence's own earlier text (or from a predicted output), and the
engine keeps a draft only while its own samples equal it, so the tokens are those of decoding one at a time, in
fewer steps."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch

from cake_py.cluster.pipeline import local_pipeline
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.engine.speculation import PredictionLookup, PromptLookup
from cake_py.models.grammar import compiler_for, regex_grammar
from cake_py.models.hub import resolve_model
from cake_py.models.llama_samplers import LlamaSamplers
from cake_py.models.sampling import SamplingParams

REPEATED = [5, 17, 42, 9, 33, 8, 61, 2] * 4  # a prompt whose continuation the model tends to copy


def test_drafts_are_what_followed_the_last_ngram_before() -> None:
    lookup = PromptLookup()
    tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    assert lookup.propose(tokens, 3) == [4, 5, 9]  # (1, 2, 3) was followed by 4, 5, 9
    assert lookup.propose([*tokens, 4], 2) == [5, 9]  # (2, 3, 4) as well, found in the index as it grew
    assert PromptLookup().propose([1, 2, 3, 7, 8], 3) == []  # nothing repeats
    assert lookup.propose([*tokens, 4, 5], 0) == []
    latest = PromptLookup()
    assert latest.propose([7, 8, 1, 7, 8, 2, 7, 8], 1) == [2]  # the latest occurrence wins
    assert PromptLookup().propose([4, 7, 8, 7, 8], 5) == [7, 8, 7, 8, 7]  # a pattern that repeats goes on repeating


def test_a_wholly_rejected_draft_waits_longer_each_time() -> None:
    lookup = PromptLookup()
    tokens = [1, 2, 3, 1, 2]
    waits = []
    for _ in range(4):
        steps = 0
        while not lookup.propose(tokens, 2):
            steps += 1
        waits.append(steps)
        lookup.verified(2, 0)
    assert waits == [0, 1, 2, 4]
    lookup.verified(2, 1)  # an accepted token resets it
    while not lookup.propose(tokens, 2):
        pass
    lookup.verified(2, 2)
    assert lookup.propose(tokens, 2)


def test_a_prediction_drafts_from_where_the_output_stands_in_it() -> None:
    prediction = PredictionLookup([10, 11, 12, 13, 14, 15, 16, 11, 12, 20])
    assert prediction.propose([], 3) == [10, 11, 12]  # nothing written yet: its start
    assert prediction.propose([10, 11], 3) == [12, 13, 14]
    assert prediction.propose([10, 11, 12, 13, 99], 3) == [15, 16, 11]  # 99 is nowhere: taken for a substitution
    assert prediction.propose([10, 11, 12, 13, 99, 15], 3) == [16, 11, 12]
    # (11, 12) occurs twice: the output stands where it would had it followed the prediction
    assert prediction.propose([10, 11, 12, 13, 99, 15, 16, 11, 12], 2) == [20]
    assert PredictionLookup([1, 2]).propose([1, 2], 4) == []  # at its end
    rejected = PredictionLookup([1, 2, 3, 1, 2, 3])
    assert rejected.propose([1], 2) == [2, 3]
    rejected.verified(2, 0)
    assert rejected.propose([1, 5], 2) == []  # backing off, as prompt lookup does


def drafting(prediction: list[int], answer: list[int], limit: int = 4) -> tuple[int, int]:
    """Steps and rejected draft tokens to write `answer` with drafts from `prediction`, as the engine keeps them: a
    draft token while it equals the answer's, then one token of the answer's own."""
    lookup, output, steps, rejected = PredictionLookup(prediction), list(answer[:1]), 0, 0
    while len(output) < len(answer):
        drafts = lookup.propose(output, limit)
        kept = 0
        while kept < len(drafts) and len(output) + kept < len(answer) and drafts[kept] == answer[len(output) + kept]:
            kept += 1
        lookup.verified(len(drafts), kept)
        rejected += len(drafts) - kept
        output = answer[: len(output) + kept + 1]
        steps += 1
    return steps, rejected


def test_a_prediction_stays_in_step_with_text_that_repeats_and_realigns_after_edits() -> None:
    periodic = [1, 2, 3, 4] * 6
    assert drafting(periodic, periodic) == (5, 0)  # 24 tokens, 1 + 5 a step
    text = list(range(100, 160))
    substituted = text[:20] + [7] + text[21:]
    inserted = text[:20] + [7, 8] + text[20:]
    deleted = text[:20] + text[30:]
    for answer in (substituted, inserted, deleted):
        steps, rejected = drafting(text, answer)
        assert steps <= len(answer) // 5 + 4 and rejected <= 12, (steps, rejected)


def test_an_edit_in_repetitive_text_does_not_send_the_prediction_far_ahead() -> None:
    """In a list or JSON records the output's last tokens around an edit recur all over the prediction: a match far
    ahead (or one of a separator or two) placed it there, and drafting never came back (a 90-number list with one
    comma missing in the prediction took 75 steps instead of 12)."""
    comma, space = 10, 11

    def numbers(values: list[int]) -> list[int]:  # "1, 2, 3, …" as digit tokens, a comma and a space
        return [token for value in values for token in [*map(int, str(value)), comma, space]]

    answer = numbers(list(range(1, 61)))
    record = [20, 21, 2, 5, comma, 22, 30, comma]  # name, "age", 2 5, ",", "city", a city, ","
    records = [token for index in range(8) for token in [*record[:1], 40 + index, *record[1:]]]
    edited = records.copy()
    edited[3:5] = [3, 1]  # the first record's age 25 → 31: "age" 3 recurs in every record
    cases = {
        "comma missing": (answer[:3] + answer[4:], answer),
        "a number missing": (answer[:6] + answer[9:], answer),
        "a number twice": (answer[:18] + answer[18:21] + answer[18:], answer),
        "a value changed": (records, edited),
    }
    for name, (prediction, written) in cases.items():
        steps, rejected = drafting(prediction, written)
        assert steps <= len(written) // 5 + 6 and rejected <= 16, (name, steps, rejected)


def test_a_long_stretch_left_out_or_repeated_is_followed_far_ahead() -> None:
    """Past the window, the output's last 3 tokens place it (a guess until it agrees): a rewrite that ranked far
    places below none never left `expected` after a 100-token deletion (259 steps, 500 tokens drafted in vain)."""
    text = list(range(1000, 1400))
    for answer in (text[:50] + text[150:], text[:50] + text[250:], text[:150] + text[50:150] + text[150:]):
        steps, rejected = drafting(text, answer)
        assert steps <= len(answer) // 5 + 40 and rejected <= 80, (len(answer), steps, rejected)


@pytest.fixture
def engines(tiny_model_factory) -> Iterator:  # type: ignore[no-untyped-def]
    made: list[Engine] = []

    def make(**options: int) -> Engine:
        source = resolve_model(str(tiny_model_factory("llama")))
        engine = Engine(local_pipeline(source, torch.float32), source.tokenizer, **options)
        engine.start()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def tokens(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], GenerationEvent]:
    events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    engine.submit(prompt, params, events.put)
    out: list[int] = []
    while True:
        event = events.get(timeout=60)
        out += [token.token_id for token in event.tokens]
        if event.finished:
            return out, event


def repeating(engine: Engine, **options: object) -> SamplingParams:
    """Greedy decoding that repeats: one token far likelier than the rest (logit_bias), so drafts hold."""
    settings: dict[str, object] = {"temperature": 0.0, "logit_bias": ((77, 30.0),), **options}
    return SamplingParams(max_tokens=40, ignore_eos=True, **settings)  # type: ignore[arg-type]


def grammar_params(engine: Engine, **options: object) -> SamplingParams:
    """Text a grammar holds to a pattern that repeats and then changes: drafts of the repeats hold, those made
    before the change are rejected."""
    grammar = compiler_for(engine.tokenizer).compile(regex_grammar("(ab cd ){4}(ab ce ){4}"))
    return SamplingParams(temperature=0.0, max_tokens=60, grammar=grammar, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "options"),
    [
        (repeating, {}),
        (repeating, {"temperature": 0.9, "seed": 7, "logit_bias": ((77, 8.0),)}),  # sampled: 77 mostly, not always
        (repeating, {"repetition_penalty": 1.05, "logprobs": True, "top_logprobs": 2}),
        (grammar_params, {}),
    ],
)
def test_speculation_gives_the_tokens_of_one_at_a_time_in_fewer_steps(engines, make, options) -> None:  # type: ignore[no-untyped-def]
    plain, speculative = engines(), engines(speculative_tokens=4)
    params = make(plain, **options)
    expected, expected_last = tokens(plain, REPEATED, params)
    got, last = tokens(speculative, REPEATED, make(speculative, **options))
    assert got == expected
    assert (last.finish_reason, last.completion_tokens) == (expected_last.finish_reason, len(expected))
    stats = speculative.stats
    assert stats.tokens_generated == len(expected)
    assert stats.accepted_draft_tokens > 0 and stats.steps < plain.stats.steps
    if make is grammar_params:
        assert stats.accepted_draft_tokens < stats.draft_tokens  # the change rejected some


@pytest.mark.parametrize(
    "llama",
    [
        LlamaSamplers(mirostat=2),
        LlamaSamplers(mirostat=1, mirostat_tau=2.0),
        LlamaSamplers(dry_multiplier=0.5, dry_base=1.3),
        LlamaSamplers(xtc_probability=0.5, xtc_threshold=0.1),
    ],
    ids=["mirostat 2", "mirostat 1", "dry", "xtc"],
)
def test_llama_cpps_stateful_samplers_draw_the_same_with_speculation(engines, llama) -> None:  # type: ignore[no-untyped-def]
    """Mirostat's mu, DRY's history and XTC's coin advance once per kept token: a rejected draft is never sampled,
    so drafting changes nothing."""
    plain, speculative = engines(), engines(speculative_tokens=4)
    options = {"temperature": 0.9, "seed": 7, "logit_bias": ((77, 8.0),), "temperature_last": True, "llama": llama}
    expected, _ = tokens(plain, REPEATED, repeating(plain, **options))
    assert tokens(speculative, REPEATED, repeating(speculative, **options))[0] == expected
    assert speculative.stats.draft_tokens > 0


def test_unrepeated_text_drafts_nothing_and_costs_no_steps(engines) -> None:  # type: ignore[no-untyped-def]
    plain, speculative = engines(), engines(speculative_tokens=4)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    assert tokens(speculative, [5, 6, 7], params)[0] == tokens(plain, [5, 6, 7], params)[0]
    assert speculative.stats.steps == plain.stats.steps


def test_speculation_stops_at_max_tokens_and_stop_strings(engines) -> None:  # type: ignore[no-untyped-def]
    plain, speculative = engines(), engines(speculative_tokens=6)
    for max_tokens in (1, 2, 3, 7):
        params = replace(repeating(plain), max_tokens=max_tokens)
        assert tokens(speculative, REPEATED, params)[0] == tokens(plain, REPEATED, params)[0]
    text = plain.tokenizer.decode(tokens(plain, REPEATED, repeating(plain))[0])
    stop = text[len(text) // 2 :][:2]
    params = replace(repeating(plain), stop=(stop,))
    plain_out, plain_last = tokens(plain, REPEATED, params)
    spec_out, spec_last = tokens(speculative, REPEATED, params)
    assert spec_last.finish_reason == plain_last.finish_reason == "stop"
    assert (spec_out, spec_last.completion_tokens) == (plain_out, plain_last.completion_tokens)


def test_kept_caches_after_rejected_drafts_continue_the_sequence(engines) -> None:  # type: ignore[no-untyped-def]
    """A chat's next turn copies the kept caches of a speculative one: the rejected drafts' positions must not leak."""
    plain, speculative = engines(prefix_cache_tokens=4096), engines(prefix_cache_tokens=4096, speculative_tokens=4)
    greedy = grammar_params(plain)
    first = tokens(plain, REPEATED, greedy)[0]
    assert tokens(speculative, REPEATED, grammar_params(speculative))[0] == first
    assert speculative.stats.accepted_draft_tokens < speculative.stats.draft_tokens  # rejected drafts were written
    follow = [*REPEATED, *first, 70, 71, 72]
    after = replace(greedy, grammar=None, max_tokens=24, ignore_eos=True)
    assert tokens(speculative, follow, after)[0] == tokens(plain, follow, after)[0]
    assert speculative.stats.prefix_cached_tokens > 0


def test_a_consumer_that_breaks_mid_step_ends_its_sequence_once(engines) -> None:  # type: ignore[no-untyped-def]
    """A step gives a drafting sequence several events: when its sink fails on one, the rest are dropped and the
    sequence is let go once, not kept for later prompts (its caches are released)."""
    engine = engines(speculative_tokens=4, prefix_cache_tokens=4096)
    params = repeating(engine)
    seen: list[int] = []

    def sink(event: GenerationEvent) -> None:
        seen.append(event.completion_tokens)
        if event.completion_tokens == 10:
            raise RuntimeError("the client's stream broke")

    engine.submit(REPEATED, params, sink)
    deadline = time.monotonic() + 30
    while (10 not in seen or engine.in_flight) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # anything still sent after the failure would arrive by now
    assert seen[-1] == 10 and seen == sorted(set(seen))  # nothing after the failure
    assert len(engine.prefix_cache) == 0
    assert tokens(engine, REPEATED, params)[0]  # the next prompt with the same start runs


def test_drafts_leave_room_in_the_step_for_every_other_sequence(engines) -> None:  # type: ignore[no-untyped-def]
    engine = engines(speculative_tokens=16, max_batch_tokens=16)
    long = replace(repeating(engine), max_tokens=300)
    finished: list[str] = []
    done = threading.Semaphore(0)

    def sink(name: str) -> Callable[[GenerationEvent], None]:
        def receive(event: GenerationEvent) -> None:
            if name == "drafting" and event.completion_tokens >= 20 and not submitted:  # drafting in full by now
                submitted.append(True)
                engine.submit(list(range(40, 51)), SamplingParams(temperature=0.0, max_tokens=1), sink("short"))
            if event.finished:
                finished.append(name)
                done.release()

        return receive

    submitted: list[bool] = []
    engine.submit(REPEATED, long, sink("drafting"))
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    assert finished == ["short", "drafting"]  # its prefill got a token of every step, not none until the end
    assert engine.stats.accepted_draft_tokens > 0


def test_a_predicted_output_is_drafted_without_speculative_tokens(engines) -> None:  # type: ignore[no-untyped-def]
    """With --speculative-tokens 0 a request's prediction still drafts: the same tokens as decoding one at a time,
    in fewer steps when it holds, and its usage counts the drafts it kept and those computed in vain."""
    engine = engines()
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected, _ = tokens(engine, [5, 6, 7], params)
    steps = engine.stats.steps
    right, last = tokens(engine, [5, 6, 7], replace(params, prediction=tuple(expected)))
    assert right == expected and engine.stats.steps - steps < len(expected) // 2
    assert last.accepted_prediction_tokens >= len(expected) // 2 and last.rejected_prediction_tokens == 0
    wrong_prediction = tuple(expected[:6]) + (3,) * 6 + tuple(expected[12:])
    steps = engine.stats.steps
    wrong, last = tokens(engine, [5, 6, 7], replace(params, prediction=wrong_prediction))
    assert wrong == expected and engine.stats.steps - steps < len(expected)
    assert last.rejected_prediction_tokens > 0 and last.accepted_prediction_tokens >= 12
    assert (last.finish_reason, last.completion_tokens) == ("length", len(expected))
