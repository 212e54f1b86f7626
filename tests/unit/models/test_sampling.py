"""Sampling: parameter validation, greedy, seeds, top-k/top-p, logit bias, repetition, frequency and presence
penalties, and stop strings."""

import math
from dataclasses import replace

import pytest
import torch

from cake_py.errors import RequestError
from cake_py.models.sampling import (
    Sampler,
    SamplingParams,
    StopMatcher,
    apply_frequency_presence,
    apply_logit_bias,
    apply_repetition_penalty,
    candidates,
    filter_logits,
    temperature_last_candidates,
)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("max_tokens", 0, "max_tokens"),
        ("temperature", -0.5, "temperature"),
        ("top_p", -0.1, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -2, "top_k"),
        ("presence_penalty", 2.5, "presence_penalty"),
        ("presence_penalty", -2.1, "presence_penalty"),
        ("frequency_penalty", 3.0, "frequency_penalty"),
        ("frequency_penalty", -2.5, "frequency_penalty"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("top_logprobs", 50, "top_logprobs"),
        ("seed", 2**64, "seed"),
        ("seed", -(2**63) - 1, "seed"),
    ],
)
def test_bad_values_are_named(field: str, value: object, needle: str) -> None:
    with pytest.raises(RequestError, match=needle) as caught:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert str(value) in str(caught.value)


def test_greedy_picks_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits, []).token_id == 1


def test_same_seed_same_tokens_and_different_seed_differs() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def draw(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.5, seed=seed))
        return [sampler.sample(logits, []).token_id for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


@pytest.mark.parametrize("params", [{"temperature": 1e-300}, {"temperature": 1.0, "repetition_penalty": 1e-300}])
def test_extreme_values_still_sample_a_token(params: dict[str, float]) -> None:
    # Dividing by a tiny temperature or penalty overflowed to inf, and torch.multinomial raised on NaN.
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    token = Sampler(SamplingParams(**params, seed=1)).sample(logits, [0, 1]).token_id  # type: ignore[arg-type]
    assert 0 <= token < 4
    if "repetition_penalty" not in params:
        assert token == 1  # a temperature near 0 is greedy


def test_top_p_zero_is_greedy() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    params = SamplingParams(temperature=1.0, top_p=0.0)
    assert params.greedy and all(Sampler(params).sample(logits, []).token_id == 1 for _ in range(20))


def test_seeds_anywhere_in_64_bits_are_accepted() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    for seed in (-(2**63), -1, 2**64 - 1):
        Sampler(SamplingParams(temperature=1.0, seed=seed)).sample(logits, [])


def test_top_k_keeps_only_k_tokens() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    filtered = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(filtered).tolist() == [True, True, False, False, False]


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    filtered = filter_logits(probs.log(), top_k=0, top_p=0.75)
    # 0.5 < 0.75, 0.5 + 0.3 crosses it: the first two stay
    assert torch.isfinite(filtered).tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"),
    [(0, 1.0, 0.0), (40, 1.0, 0.0), (0, 0.9, 0.0), (0, 0.999, 0.0), (80, 0.9, 0.0), (0, 0.5, 0.05), (7, 0.3, 0.1)],
)
@pytest.mark.parametrize("spread", [0.5, 3.0, 10.0])  # flat (a wide nucleus) to peaked
def test_fast_candidates_are_the_filtered_distribution(top_k: int, top_p: float, min_p: float, spread: float) -> None:
    """`candidates` (what the sampler draws from) computes `filter_logits`' distribution over fewer tokens."""
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(int(spread * 10))) * spread
    expected = torch.softmax(filter_logits(logits, top_k, top_p, min_p), dim=-1)
    ids, probs = candidates(logits, top_k, top_p, min_p)
    dense = probs / probs.sum()
    if ids is not None:
        dense = torch.zeros_like(expected).index_put_((ids,), dense)
    torch.testing.assert_close(dense, expected, atol=1e-6, rtol=1e-5)


def test_tokens_tied_with_the_kth_stay_candidates() -> None:
    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0])
    ids, probs = candidates(logits, 2, 1.0)
    assert ids is not None and sorted(ids.tolist()) == [0, 1, 2, 3]
    expected = torch.softmax(filter_logits(logits, 2, 1.0), dim=-1)
    torch.testing.assert_close(torch.zeros(5).index_put_((ids,), probs / probs.sum()), expected)


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(top_k=5), SamplingParams(top_p=0.9)]
)
def test_nan_logits_are_an_error_not_a_token(params: SamplingParams) -> None:
    logits = torch.zeros(100)
    logits[7] = float("nan")
    with pytest.raises(ValueError, match="no token a probability"):
        Sampler(params).sample(logits, [])


def test_a_draw_follows_the_distribution() -> None:
    """The inverse-CDF draw picks each token as often as its probability says (and never a masked one)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0, float("-inf")])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7))
    counts = torch.bincount(torch.tensor([sampler.sample(logits, []).token_id for _ in range(20000)]), minlength=6)
    expected = torch.softmax(logits, dim=-1)
    assert counts[5] == 0
    torch.testing.assert_close(counts.double() / 20000, expected.double(), atol=0.01, rtol=0)


def test_sampling_never_leaves_the_nucleus() -> None:
    logits = torch.tensor([2.0, 1.9, -5.0, -5.0, -5.0])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    assert {sampler.sample(logits, []).token_id for _ in range(50)} <= {0, 1}


def test_repetition_penalty_matches_transformers_rule() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    penalised = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert penalised.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # input untouched


def test_logprobs_are_normalised() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0])
    token = Sampler(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2)).sample(logits, [])
    expected = torch.log_softmax(logits, -1)
    assert token.token_id == 2
    assert token.logprob == pytest.approx(float(expected[2]))
    assert [i for i, _ in token.top_logprobs] == [2, 1]


def test_stop_matcher_holds_back_partial_matches() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("hello S") == ("hello ", False)
    assert matcher.feed("T") == ("", False)
    assert matcher.feed("x") == ("STx", False)
    assert matcher.feed(" ST") == (" ", False)
    assert matcher.feed("OP and more") == ("", True)


def test_stop_matcher_earliest_of_several() -> None:
    matcher = StopMatcher(["world", "lo"])
    assert matcher.feed("hello world") == ("hel", True)
    assert matcher.matched == "lo"  # the one reached first in the text, whatever the order they were listed in
    tie = StopMatcher(["ab", "a"])
    assert tie.feed("xab") == ("x", True) and tie.matched == "ab"  # same place: the first listed


def test_top_k_minus_one_is_off_like_zero() -> None:
    # vLLM documents -1 as "all tokens".
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    params = SamplingParams(top_k=-1)
    assert not params.greedy
    assert torch.isfinite(filter_logits(logits, params.top_k, 1.0)).all()


@pytest.mark.parametrize("bias", [(5, 100.5), (5, -101.0), (-1, 1.0)], ids=str)
def test_bad_logit_bias_is_named(bias: tuple[int, float]) -> None:
    with pytest.raises(RequestError, match="logit_bias") as caught:
        SamplingParams(logit_bias=(bias,))
    assert str(bias[0]) in str(caught.value)


def test_logit_bias_adds_to_the_logits_and_steers_greedy_decoding() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert apply_logit_bias(logits, [(0, 5.0), (1, -100.0)]).tolist() == pytest.approx([5.1, -97.0, 2.9, -1.0])
    assert logits.tolist() == pytest.approx([0.1, 3.0, 2.9, -1.0])  # input untouched
    banned = Sampler(SamplingParams(temperature=0.0, logit_bias=((1, -100.0),)))
    assert banned.sample(logits, []).token_id == 2
    forced = Sampler(SamplingParams(temperature=1.0, seed=0, logit_bias=((3, 100.0),)))
    assert {forced.sample(logits, []).token_id for _ in range(20)} == {3}


def test_frequency_and_presence_follow_openais_formula() -> None:
    # logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
    logits = torch.tensor([1.0, 1.0, 1.0])
    penalised = apply_frequency_presence(logits, {0: 2, 1: 1}, frequency=0.5, presence=0.25)
    assert penalised.tolist() == pytest.approx([-0.25, 0.25, 1.0])
    assert logits.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("penalties", "expected"),
    [
        ({}, [0, 0, 0, 0]),
        ({"presence_penalty": 0.15}, [0, 1, 0, 0]),  # a seen token pays once, however often it came
        ({"frequency_penalty": 0.15}, [0, 1, 0, 2]),  # and here once per time it came
        ({"frequency_penalty": -0.5}, [0, 0, 0, 0]),  # negative: repeating is encouraged
    ],
)
def test_penalties_weigh_the_generated_tokens_not_the_prompt(penalties: dict[str, float], expected: list[int]) -> None:
    logits = torch.tensor([1.0, 0.9, 0.8])
    sampler = Sampler(SamplingParams(temperature=0.0, **penalties))  # type: ignore[arg-type]
    history = [0, 0, 0]  # the prompt is all token 0: the first greedy pick is 0 all the same
    tokens = []
    for _ in range(4):
        tokens.append(sampler.sample(logits, history).token_id)
        history.append(tokens[-1])
    assert tokens == expected


def test_penalties_apply_when_sampling_too() -> None:
    # Token 0 starts 20 logits ahead (unpenalised, every pick is 0) and loses 2 per pick plus 2 once: about ten
    # picks bring it level with the others (which then pay for their own picks too).
    logits = torch.tensor([20.0, 0.0, 0.0])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0, presence_penalty=2.0, frequency_penalty=2.0))
    tokens = [sampler.sample(logits, []).token_id for _ in range(20)]
    assert tokens[:5] == [0] * 5
    assert 8 <= tokens.count(0) <= 15
    plain = Sampler(SamplingParams(temperature=1.0, seed=0))
    assert [plain.sample(logits, []).token_id for _ in range(20)] == [0] * 20


_DEVICES = (
    ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if torch.backends.mps.is_available() else [])
)


@pytest.mark.parametrize("device", _DEVICES)
def test_seeded_sampling_draws_the_same_tokens_on_any_device(device: str) -> None:
    # The generator is a CPU one: logits on an accelerator used to make torch.multinomial raise. Only the CPU runs
    # where no accelerator is present; on a CUDA or MPS machine this checks the fix itself.
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def draw(on: str) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.5, top_k=50, seed=11, logit_bias=((3, 2.0),)))
        return [sampler.sample(logits.to(on), [1, 2]).token_id for _ in range(20)]

    assert draw(device) == draw("cpu")


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_best() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = torch.isfinite(filter_logits(probs.log(), 0, 1.0, min_p=0.2))
    assert kept.tolist() == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    params = SamplingParams(temperature=1.0, min_p=0.2, seed=3)
    sampler = Sampler(params)
    assert all(sampler.sample(probs.log(), []).token_id != 3 for _ in range(200))


def test_min_tokens_holds_end_tokens_back_until_enough_are_drawn() -> None:
    logits = torch.tensor([0.0, 0.0, 50.0])  # token 2 (the end token) all but certain
    sampler = Sampler(SamplingParams(temperature=0.0, min_tokens=2), end_ids=frozenset({2}))
    assert [sampler.sample(logits, []).token_id for _ in range(3)] == [0, 0, 2]
    # An end id past the vocabulary (a model file's mistake) is ignored, not indexed: on a GPU that would be a
    # device-side assert breaking the whole process.
    sampler = Sampler(SamplingParams(temperature=0.0, min_tokens=1), end_ids=frozenset({2, 3}))
    assert sampler.sample(logits, []).token_id == 0
    with pytest.raises(RequestError, match="min_tokens must be between 0 and max_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def _llama_cpp_distribution(logits: torch.Tensor, top_k: int, top_p: float, min_p: float, t: float) -> torch.Tensor:
    """llama.cpp's common_sampler chain written plainly: top-k, softmax, top-p, min-p, then the temperature."""
    order = torch.argsort(logits, descending=True)
    kept = order[:top_k] if top_k > 0 else order
    probs = torch.softmax(logits[kept], dim=-1)
    before = probs.cumsum(0) - probs
    kept = kept[before < top_p]
    kept = kept[logits[kept] >= logits.max() + math.log(min_p)] if min_p > 0 else kept
    dense = torch.zeros_like(logits)
    dense[kept] = torch.softmax(logits[kept] / t, dim=-1)
    return dense


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p", "temperature"),
    [(40, 0.95, 0.05, 0.8), (0, 1.0, 0.05, 0.5), (0, 0.9, 0.0, 1.5), (5, 1.0, 0.0, 0.8), (0, 1.0, 0.0, 0.8)],
)
def test_llama_cpp_routes_apply_the_temperature_last(
    top_k: int, top_p: float, min_p: float, temperature: float
) -> None:
    """/completion filtered the tokens after the temperature (vLLM's order): with its defaults (T 0.8, min_p 0.05)
    it kept logits within 2.4 of the best where llama.cpp keeps those within 3.0."""
    logits = torch.randn(3000, generator=torch.Generator().manual_seed(7)) * 2
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, temperature_last=True)
    ids, probs = temperature_last_candidates(logits, params)
    dense = probs / probs.sum()
    if ids is not None:
        dense = torch.zeros_like(logits).index_put_((ids,), dense)
    torch.testing.assert_close(dense, _llama_cpp_distribution(logits, top_k, top_p, min_p, temperature))
    edge = torch.tensor([0.0, -2.6, -10.0])  # -2.6 ≥ log(0.05) = -3.0, though -2.6 / 0.8 is not
    draws = Sampler(replace(params, min_p=0.05, top_k=0, top_p=1.0, temperature=0.8, seed=1))
    assert 1 in {draws.sample(edge, []).token_id for _ in range(200)}


def test_nan_logits_are_named_in_llama_cpps_order_too() -> None:
    params = SamplingParams(temperature=0.8, min_p=0.05, temperature_last=True, seed=1)
    with pytest.raises(ValueError, match="the logits give no token a probability"):  # it was an IndexError
        Sampler(params).sample(torch.full((10,), float("nan")), [])
