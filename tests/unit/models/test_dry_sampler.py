"""DRY (models/dry.py) against llama.cpp's own cases (tests/test-sampling.cpp's test_dry: the penalties its
expected probabilities imply), cases worked out by hand from its algorithm (repeat lengths, the exponent, sequence
breakers cutting a repeat, a breaker token never penalised, breakers found in a vocabulary), and a line-by-line
transcription of llama_sampler_dry_apply (its Z-algorithm) on random histories."""

import math
import random

import pytest

from cake_py.models.dry import dry_penalties, overlapping_sequences


@pytest.mark.parametrize(
    ("history", "multiplier", "allowed_length", "breakers", "expected"),
    [
        ([0, 1], 1.0, 2, {}, {}),  # no longer than the allowed length: nothing to repeat
        # "0 1" was followed by 2: 2 would extend a repeat of length 2 (exponent 0): 1.0 * 1.1**0
        ([0, 1, 2, 0, 1], 1.0, 2, {}, {2: 1.0}),
        ([0, 1, 2, 0, 1], 2.0, 2, {}, {2: 2.0}),
        ([0, 1, 3, 4, 0, 1], 1.0, 2, {3: ((),)}, {}),  # 3 is a breaker on its own: never penalised
        ([0, 1, 2, 3, 4, 0, 1], 1.0, 4, {}, {}),  # a repeat of 2 is within an allowed length of 4
    ],
)
def test_llama_cpps_cases(
    history: list[int],
    multiplier: float,
    allowed_length: int,
    breakers: dict[int, tuple[tuple[int, ...], ...]],
    expected: dict[int, float],
) -> None:
    assert dry_penalties(history, multiplier, 1.1, allowed_length, breakers) == pytest.approx(expected)


def test_llama_cpps_probabilities_follow() -> None:
    """test_dry's second case: uniform over 4 tokens, history 0 1 2 0 1 → 0.296923 ×3 and 0.109232 for token 2."""
    penalties = dry_penalties([0, 1, 2, 0, 1], 1.0, 1.1, 2, {})
    weights = [math.exp(-penalties.get(token, 0.0)) for token in range(4)]
    probs = [weight / sum(weights) for weight in weights]
    assert probs == pytest.approx([0.296923, 0.296923, 0.109232, 0.296923], abs=1e-5)


def test_the_longest_repeat_sets_the_exponent() -> None:
    # 0 1 2 0 1 2 0 1: the suffix "0 1 2 0 1" (5 tokens) also ends at position 4, followed by 2: 1 * 2**(5 - 2)
    assert dry_penalties([0, 1, 2, 0, 1, 2, 0, 1], 1.0, 2.0, 2, {}) == {2: 8.0}


def test_a_breaker_cuts_a_repeat_short() -> None:
    history = [5, 6, 0, 1, 5, 6, 0, 1]  # "5 6 0 1" repeats: 5 would extend a repeat of 4
    assert dry_penalties(history, 1.0, 2.0, 2, {}) == {5: 4.0}
    # the breaker "5 6" (head 5, tail 6) last seen 3 tokens back: no repeat reaches past it, 2 at most
    assert dry_penalties(history, 1.0, 2.0, 2, {5: ((6,),)}) == {5: 1.0}


def test_the_exponent_is_capped_below_float32s_range() -> None:
    history = [7] * 200  # a run: 7 extends a repeat of 198, and 10**196 is past float32
    (penalty,) = dry_penalties(history, 1.0, 10.0, 2, {}).values()
    assert penalty == 10.0 ** int(88.7228391 / math.log(10.0))


def test_breakers_are_found_as_llama_cpp_finds_them() -> None:
    """A token holding the whole breaker is one on its own (empty tail); a token ending in its start is its head,
    with the tokens of the rest as its tail."""
    vocab = [b"a", b"\n", b"x\n", b"ab", b"b:", b"c", b"ca"]
    assert overlapping_sequences(vocab, b"\n", lambda text: []) == {1: {()}, 2: {()}}
    tails: list[str] = []

    def encode(text: str) -> list[int]:
        tails.append(text)
        return [9]

    # "a" and "ca" end with its start (the rest, "b", is token 9 here); "ab" holds it whole; "b:" only ends it
    assert overlapping_sequences(vocab, b"ab", encode) == {0: {(9,)}, 3: {()}, 6: {(9,)}}
    assert tails == ["b", "b"]


def llama_cpp_dry(
    history: list[int], multiplier: float, base: float, allowed: int, breakers: dict[int, tuple[tuple[int, ...], ...]]
) -> dict[int, float]:
    """llama_sampler_dry_apply, transcribed: the breakers' limit, the reversed Z-algorithm (comparing against capped
    lengths, as it does), the longest repeat per next token, the capped exponent."""
    n = len(history)
    if n <= allowed:
        return {}

    def rat(i: int) -> int:
        return history[n - 1 - i]

    rep_limit = n
    for i in range(n):
        longest = -1
        for tail in breakers.get(rat(i), ()):
            if longest < len(tail) <= i and all(tail[o] == rat(i - o - 1) for o in range(len(tail))):
                longest = len(tail)
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed:
        return {}
    count = [0] * n
    last, lt, rt = n - 1, 0, 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and rat(m) == rat(m + k):
                m += 1
            count[last - k] = min(m, rep_limit)
            if m > 0:
                lt, rt = k, k + m - 1
        elif count[last - (k - lt)] < rt - k + 1:
            count[last - k] = min(count[last - (k - lt)], rep_limit)
        else:
            i = rt + 1
            while i < n and rat(i) == rat(i - k):
                i += 1
            count[last - k] = min(i - k, rep_limit)
            lt, rt = k, i - 1
    best: dict[int, int] = {}
    for i in range(n - 1):
        if count[i] >= allowed:
            token = rat(n - 2 - i)
            best[token] = max(best.get(token, -1), count[i])
    cap = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    return {
        token: multiplier * base ** (min(length - allowed, cap) if cap > 0 else length - allowed)
        for token, length in best.items()
        if not any(not tail for tail in breakers.get(token, ()))
    }


def test_the_vectorised_lengths_are_llama_cpps() -> None:
    draw = random.Random(0)
    for _ in range(400):
        alphabet = draw.randint(1, 5)
        history = [draw.randrange(alphabet) for _ in range(draw.randint(0, 60))]
        if draw.random() < 0.3:  # a long loop
            history += history[-draw.randint(1, 4) :] * draw.randint(2, 8) if history else []
        breakers: dict[int, tuple[tuple[int, ...], ...]] = {}
        for _ in range(draw.randint(0, 2)):
            head = draw.randrange(alphabet + 1)
            tail = tuple(draw.randrange(alphabet) for _ in range(draw.randint(0, 2)))
            breakers[head] = (*breakers.get(head, ()), tail)
        allowed, base = draw.randint(0, 4), draw.choice([1.0, 1.1, 1.75, 3.0])
        expected = llama_cpp_dry(history, 0.8, base, allowed, breakers)
        assert dry_penalties(history, 0.8, base, allowed, breakers) == pytest.approx(expected), (history, breakers)


def test_a_base_too_large_for_any_power_penalises_without_limit() -> None:
    """llama.cpp computes base ** exponent in float: past float's range, infinity (the token cannot be drawn)."""
    assert dry_penalties([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2], 1.0, 1e308, 2, {}) == {3: math.inf}
