"""llama.cpp's other samplers (models/llama_samplers.py) against its own cases (tests/test-sampling.cpp: XTC,
typical-p, top-n-sigma, top-p, min-p) and values worked out by hand from its algorithms (dynamic temperature,
mirostat's k and mu); and the chain in a `Sampler`: none with neutral settings, the order obeyed, mirostat's state
per sequence, XTC's coin from the sequence's own seed, penalties where the order puts them."""

import math

import pytest
import torch

from cake_py.errors import RequestError
from cake_py.models.llama_samplers import (
    LlamaSamplers,
    dynamic_temperature,
    min_p,
    mirostat_k,
    mirostat_v2,
    top_n_sigma,
    top_p,
    typical,
    xtc,
)
from cake_py.models.sampling import Sampler, SamplingParams


def logits_of(*probs: float) -> torch.Tensor:
    return torch.log(torch.tensor(probs))


def llama_params(**settings: object) -> SamplingParams:
    """/completion's defaults (top-k 40, top-p 0.95, min-p 0.05, T 0.8) with these llama samplers settings."""
    base: dict[str, object] = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 7}
    fields = {key: settings.pop(key) for key in list(settings) if key in base or key == "repetition_penalty"}
    return SamplingParams(**{**base, **fields}, temperature_last=True, llama=LlamaSamplers(**settings))


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("typical_p", 1.5, "typical_p must be between 0 and 1, got 1.5"),
        ("typical_p", -0.1, "typical_p"),
        ("xtc_probability", 2.0, "xtc_probability must be between 0 and 1"),
        ("xtc_threshold", -0.5, "xtc_threshold"),
        ("min_keep", -1, "min_keep must be 0 or more, got -1"),
        ("min_keep", 10**23, "min_keep must be at most 2147483647, got 1000"),
        ("dry_multiplier", -0.8, "dry_multiplier"),
        ("dry_allowed_length", -2, "dry_allowed_length"),
        ("dry_base", 0.5, "dry_base must be 1 or more"),
        ("dry_penalty_last_n", -2, "dry_penalty_last_n must be -1"),
        ("mirostat", 3, "mirostat must be 0 (off), 1 or 2, got 3"),
        ("mirostat_tau", -1.0, "mirostat_tau"),
        ("mirostat_eta", -0.1, "mirostat_eta"),
        ("dynatemp_range", -0.5, "dynatemp_range"),
        ("dynatemp_exponent", -1.0, "dynatemp_exponent"),
        ("samplers", ("top_k", "nucleus"), "unknown sampler 'nucleus'"),
    ],
)
def test_out_of_range_settings_are_named(field: str, value: object, needle: str) -> None:
    with pytest.raises(RequestError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        LlamaSamplers(**{field: value})


@pytest.mark.parametrize(
    ("threshold", "kept"),
    [(0.09, [3]), (0.19, [2, 3]), (0.29, [1, 2, 3]), (0.39, [0, 1, 2, 3])],  # the last: only one above it, kept
)
def test_xtc_removes_all_top_choices_but_the_least_likely(threshold: float, kept: list[int]) -> None:
    assert xtc(logits_of(0.4, 0.3, 0.2, 0.1), threshold, 0).tolist() == kept


def test_xtc_leaves_min_keep() -> None:
    assert xtc(logits_of(0.4, 0.3, 0.2, 0.1), 0.09, 2).tolist() == [0, 1, 2, 3]  # 1 left would be under 2


def test_typical_keeps_the_locally_typical_tokens() -> None:
    assert typical(logits_of(0.97, 0.01, 0.01, 0.01), 0.5, 0).tolist() == [0]
    assert typical(logits_of(0.4, 0.2, 0.2, 0.2), 0.5, 0).tolist() == [1, 2, 3]  # nearer the entropy than 0.4
    assert typical(logits_of(0.97, 0.01, 0.01, 0.01), 0.5, 3).tolist() == [0, 1, 2]  # min_keep
    assert typical(logits_of(0.4, 0.2, 0.2, 0.2), 1.0, 0).tolist() == [0, 1, 2, 3]  # 1: off


def test_top_n_sigma_keeps_the_logits_near_the_largest() -> None:
    # logits log(.1 .2 .3 .4): std 0.525, so max - 1σ keeps the last two; 3σ keeps all; 0 is off (not greedy)
    assert top_n_sigma(logits_of(0.1, 0.2, 0.3, 0.4), 1.0).tolist() == [2, 3]
    assert top_n_sigma(logits_of(0.1, 0.2, 0.3, 0.4), 3.0).tolist() == [0, 1, 2, 3]
    assert top_n_sigma(logits_of(0.1, 0.2, 0.3, 0.4), 0.0).tolist() == [0, 1, 2, 3]


def test_top_p_and_min_p_with_min_keep() -> None:
    probs = logits_of(0.1, 0.2, 0.3, 0.4)
    assert top_p(probs, 0.7, 0).tolist() == [3, 2] and top_p(probs, 0.0, 0).tolist() == [3]
    assert top_p(probs, 0.7, 3).tolist() == [3, 2, 1]
    assert min_p(probs, 0.26, 0).tolist() == [1, 2, 3] and min_p(probs, 0.76, 0).tolist() == [3]
    assert min_p(probs, 0.76, 2).tolist() == [3, 2]


def test_dynamic_temperature_follows_the_entropy() -> None:
    """probs .1 .2 .3 .4: entropy 1.279854 of ln 4 = 1.386294, normalised 0.923222."""
    probs = logits_of(0.1, 0.2, 0.3, 0.4)
    assert dynamic_temperature(probs, 1.0, 0.5, 1.0) == pytest.approx(0.5 + 1.0 * 0.923222, abs=1e-5)
    assert dynamic_temperature(probs, 1.0, 0.5, 2.0) == pytest.approx(0.5 + 1.0 * 0.923222**2, abs=1e-5)
    assert dynamic_temperature(probs, 0.3, 0.5, 1.0) == pytest.approx(0.8 * 0.923222, abs=1e-5)  # from 0, not -0.2
    assert dynamic_temperature(probs, 0.7, 0.0, 1.0) == 0.7


def test_mirostat_1_estimates_k_from_a_zipf_distribution() -> None:
    """p ∝ 1/i²: s = 2, e = 1; mu 6 and 100 tokens: k = (2**6 / (1 - 1/100)) ** (1/2) = 8.04 → 8."""
    zipf = torch.tensor([1 / (i + 1) ** 2 for i in range(20)], dtype=torch.float64)
    assert mirostat_k(zipf / zipf.sum(), 6.0, 100, 20) == 8
    assert mirostat_k(zipf / zipf.sum(), 6.0, 100, 5) == 5  # no more than there are
    assert mirostat_k(torch.tensor([1.0], dtype=torch.float64), 6.0, 100, 1) == 1


def test_mirostat_2_truncates_at_mu_and_moves_it() -> None:
    """Surprises 1, 2, 3, 3 bits: mu 2.5 keeps two (2/3 and 1/3 once renormalised); mu moves by eta times the
    drawn token's surprise less tau."""
    logits = logits_of(0.125, 0.5, 0.125, 0.25)
    for seed in range(6):
        index, mu = mirostat_v2(logits, 2.5, 1.25, 0.1, torch.Generator().manual_seed(seed))
        assert index in (1, 3)
        assert mu == pytest.approx(2.5 - 0.1 * (-math.log2({1: 2 / 3, 3: 1 / 3}[index]) - 1.25))


@pytest.mark.parametrize("mu", [-1e6, -float("inf"), float("nan"), 1e6])
def test_mirostat_2_with_mu_pushed_out_of_range_still_draws(mu: float) -> None:
    """A huge eta drives mu far below 0 (2 ** -mu would overflow): no token's surprise is that low, so the most
    likely one is drawn; far above, every token is kept."""
    logits = logits_of(0.125, 0.5, 0.125, 0.25)
    index, _ = mirostat_v2(logits, mu, 5.0, 1e300, torch.Generator().manual_seed(0))
    assert index == 1 or mu > 0


def test_neutral_settings_make_no_chain_and_draw_as_before() -> None:
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1)) * 3
    plain = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=3, temperature_last=True)
    neutral = Sampler(llama_params(seed=3, samplers=("penalties", "top_k", "top_p", "min_p", "temperature")))
    assert neutral.chain is None and Sampler(llama_params()).chain is None
    expected = Sampler(plain)
    assert [neutral.sample(logits, []).token_id for _ in range(20)] == [
        expected.sample(logits, []).token_id for _ in range(20)
    ]


@pytest.mark.parametrize(
    "settings",
    [
        {"typical_p": 0.9},
        {"top_n_sigma": 1.0},
        {"xtc_probability": 0.5},
        {"dry_multiplier": 0.8},
        {"mirostat": 2},
        {"dynatemp_range": 0.5},
        {"min_keep": 5},
        {"samplers": ("temperature", "top_k", "top_p", "min_p")},
        {"samplers": ("top_k",)},
    ],
)
def test_any_sampler_at_work_makes_a_chain(settings: dict[str, object]) -> None:
    assert Sampler(llama_params(**settings)).chain is not None


def test_xtc_at_threshold_0_5_or_above_is_off() -> None:
    assert Sampler(llama_params(xtc_probability=1.0, xtc_threshold=0.6)).chain is None


def test_the_order_decides() -> None:
    """top_p 0.5 over probabilities .5 .3 .2 keeps only the first; after a temperature of 100 (nearly flat) it
    keeps two."""
    logits = logits_of(0.5, 0.3, 0.2)
    default = Sampler(llama_params(top_k=0, min_p=0.0, top_p=0.5, temperature=100.0))
    early = Sampler(llama_params(top_k=0, min_p=0.0, top_p=0.5, temperature=100.0, samplers=("temperature", "top_p")))
    assert {default.sample(logits, []).token_id for _ in range(40)} == {0}
    assert {early.sample(logits, []).token_id for _ in range(40)} == {0, 1}


def test_a_temperature_left_out_is_not_applied() -> None:
    """temperature 0 is greedy where it runs; `samplers` without it draws from the model's distribution."""
    logits = logits_of(0.5, 0.5)
    sampler = Sampler(llama_params(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, samplers=("top_k",)))
    assert {sampler.sample(logits, []).token_id for _ in range(40)} == {0, 1}


def test_penalties_apply_where_the_order_puts_them() -> None:
    """Token 0 (logit 3) was seen; a repeat penalty of 10 takes it to 0.3. Before top-k 1, token 1 is kept; after
    it, token 0 already is the only one left."""
    logits = torch.tensor([3.0, 2.9, 0.0, 0.0])
    first = llama_params(top_k=1, repetition_penalty=10.0, samplers=("penalties", "top_k", "temperature"))
    after = llama_params(top_k=1, repetition_penalty=10.0, samplers=("top_k", "penalties", "temperature"))
    assert Sampler(first).sample(logits, [0]).token_id == 1
    assert Sampler(after).sample(logits, [0]).token_id == 0


def test_mirostat_keeps_its_mu_per_sequence_and_skips_the_penalties() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(2)) * 2
    one, two = Sampler(llama_params(mirostat=2)), Sampler(llama_params(mirostat=2))
    assert one.chain is not None and two.chain is not None and one.chain.mu == 10.0  # 2 * tau
    tokens = [one.sample(logits, []).token_id for _ in range(5)]
    assert one.chain.mu != 10.0 and two.chain.mu == 10.0  # the other sequence's is its own
    assert [two.sample(logits, []).token_id for _ in range(5)] == tokens  # same seed, same state: same tokens
    # mirostat replaces the chain, penalties included (llama.cpp): a seen top token is still the greedy choice
    greedy = Sampler(llama_params(mirostat=1, temperature=0.0, repetition_penalty=10.0))
    assert greedy.sample(logits, [int(logits.argmax())]).token_id == int(logits.argmax())


def test_xtc_draws_with_the_sequences_own_seed() -> None:
    """XTC with certainty drops every token above 0.1 but the least likely; its coin comes from the sequence's
    generator, so what else draws in between changes nothing."""
    logits = logits_of(0.45, 0.3, 0.15, 0.05, 0.05)
    settings = {"xtc_probability": 1.0, "xtc_threshold": 0.1, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    always = Sampler(llama_params(**settings))
    assert {always.sample(logits, []).token_id for _ in range(40)} == {2, 3, 4}
    half = {"xtc_probability": 0.5, "xtc_threshold": 0.1, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    alone, batched, other = Sampler(llama_params(**half)), Sampler(llama_params(**half)), Sampler(llama_params(seed=99))
    expected = [alone.sample(logits, []).token_id for _ in range(30)]
    drawn = []
    for _ in range(30):
        other.sample(logits, [])
        drawn.append(batched.sample(logits, []).token_id)
    assert drawn == expected and {0, 1} & set(expected)  # the coin sometimes let the top choices stay


def test_dry_steers_away_from_a_repetition() -> None:
    """History 4 5 6 … 4 5: 6 would extend a repeat of 2, so DRY at 0.8 takes 0.8 * 1.75**0 from its logit, 0.5:
    below the others'."""
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5])
    history = [4, 5, 6, 1, 4, 5, 6, 2, 4, 5]
    plain = Sampler(llama_params(temperature=0.0))
    dry = Sampler(llama_params(temperature=0.0, dry_multiplier=0.8))
    assert plain.sample(logits, history).token_id == 6
    assert dry.sample(logits, history).token_id != 6
