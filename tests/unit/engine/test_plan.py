"""One step's plan: decodes first, then prefills shortest first, a prefill passed over too long going first."""

from __future__ import annotations

from typing import Any

import pytest

from cake_py.engine.plan import PREFILL_AGING_STEPS, plan_step
from cake_py.engine.sequence import Sequence
from cake_py.models.hub import resolve_model
from cake_py.models.sampling import SamplingParams
from cake_py.models.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_factory: Any) -> Tokenizer:
    return resolve_model(str(tiny_model_factory("llama"))).tokenizer


def _sequence(seq_id: int, n_prompt: int, tokenizer: Tokenizer) -> Sequence:
    return Sequence(seq_id, [5 + position % 200 for position in range(n_prompt)], GREEDY, tokenizer, lambda _: None)


def test_a_stream_of_short_prompts_does_not_hold_a_long_prefill_back_for_ever(tokenizer: Tokenizer) -> None:
    """Each step a new 64-token prompt arrives and takes the whole 64-token budget ahead of a 450-token one:
    shortest first alone never gave the long one a token; aged, it gets a chunk every PREFILL_AGING_STEPS + 1 steps,
    and the decodes keep their token in every step."""
    long = _sequence(1, 450, tokenizer)
    decoding = _sequence(2, 3, tokenizer)
    decoding.n_cached = 3  # its prompt is done: it decodes, one token a step
    decoding.all_ids.append(9)
    running = [long, decoding]
    progressed = []
    for step in range(3 * (PREFILL_AGING_STEPS + 1)):
        running.append(_sequence(100 + step, 64, tokenizer))  # admitted after the long one
        plan = plan_step(running, 65, lambda _: None)
        assert plan.members[0] is decoding  # decodes always come first
        for piece, seq in zip(plan.batch, plan.members, strict=True):
            seq.n_cached = piece.start_pos + piece.n_tokens
        decoding.all_ids.append(9)  # its sampled token, computed in the next step
        if long in plan.members:
            progressed.append(step)
        running = [seq for seq in running if seq is long or seq is decoding or seq.prefilling]
    assert progressed == [PREFILL_AGING_STEPS, 2 * PREFILL_AGING_STEPS + 1, 3 * PREFILL_AGING_STEPS + 2]
    assert long.n_cached == 3 * 64


def test_prefills_go_shortest_first_when_none_has_waited_long(tokenizer: Tokenizer) -> None:
    long, short = _sequence(1, 300, tokenizer), _sequence(2, 10, tokenizer)
    plan = plan_step([long, short], 64, lambda _: None)
    assert [piece.n_tokens for piece in plan.batch] == [10, 54] and plan.members == [short, long]
    assert (long.passed_over, short.passed_over) == (0, 0)
