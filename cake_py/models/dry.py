"""DRY ("Don't Repeat Yourself"), llama.cpp's repetition sampler: a token that would extend a sequence already seen
in the sequence's history (the prompt and the output) loses `multiplier * base ** (length - allowed_length)` from
its logit, `length` being the longest such repeat it would continue. Sequence breakers (strings such as a newline)
cut a repeat short: no repeat reaches back past the last breaker in the history.

The algorithm is llama.cpp's (`llama_sampler_dry_apply`, from koboldcpp): the breakers are matched as token
sequences ("head" token → "tail" tokens), found once per tokenizer by scanning its vocabulary
(`get_overlapping_token_sequences`), and the repeat lengths are those of its reversed Z-algorithm, computed with
numpy (no torch): a per-token cost of a few vectorised passes over the history.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cake_py.models.tokenizer import Tokenizer

# head token → the tails that complete a breaker after it (an empty tail: the head alone holds a whole breaker)
Breakers = Mapping[int, tuple[tuple[int, ...], ...]]

MAX_BREAKER_BYTES = 40  # llama.cpp's MAX_CHAR_LEN: a longer breaker is cut to this
MAX_TAIL_TOKENS = 20  # llama.cpp's MAX_SEQ_LEN: a breaker's tail is at most this many tokens
FLOAT_MAX_LOG = 88.7228391  # log of float32's largest value: base ** exponent is capped below it


def dry_penalties(
    history: Sequence[int], multiplier: float, base: float, allowed_length: int, breakers: Breakers
) -> dict[int, float]:
    """What each token that would extend a repeat of `history`'s end loses from its logit (tokens absent lose
    nothing). `history` is the window DRY looks at, oldest first.

    llama.cpp's steps, vectorised: its Z-algorithm gives, for each position, the length of the longest suffix of
    the history that also ends there, capped by the breakers' limit; only positions holding the history's last token
    can have one, and their lengths grow a token at a time (a few steps in prose, not one per token of history)."""
    n = len(history)
    if n <= allowed_length:
        return {}
    tokens = np.fromiter(history, dtype=np.int64, count=n)
    rep_limit = _repeat_limit(tokens, breakers)
    if rep_limit < allowed_length:
        return {}
    # lengths[j]: how many tokens ending at position j (< n - 1) match the history's last ones, at most rep_limit
    lengths = np.zeros(n - 1, dtype=np.int64)
    alive = np.flatnonzero(tokens[:-1] == tokens[-1]) if rep_limit > 0 else np.zeros(0, dtype=np.int64)
    size = 0
    while alive.size and size < rep_limit:
        lengths[alive] += 1
        size += 1
        before = alive - size
        alive = alive[(before >= 0) & (tokens[np.maximum(before, 0)] == tokens[n - 1 - size])]
    # The token after each long enough repeat would extend it; each token keeps its longest.
    ends = np.flatnonzero(lengths >= allowed_length)
    longest_before: dict[int, int] = {}
    for token, length in zip(tokens[ends + 1].tolist(), lengths[ends].tolist(), strict=True):
        if longest_before.get(token, -1) < length:
            longest_before[token] = length
    # The penalties, the exponent capped so the power stays a float32.
    max_exponent = int(FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    penalties: dict[int, float] = {}
    for token, length in longest_before.items():
        if any(not tail for tail in breakers.get(token, ())):  # a breaker on its own is never penalised
            continue
        exponent = length - allowed_length
        if max_exponent > 0 and exponent > max_exponent:
            exponent = max_exponent
        try:
            penalties[token] = multiplier * base**exponent
        except OverflowError:  # a base too large for even the cap (llama.cpp's float power: infinity)
            penalties[token] = math.inf
    return penalties


def _repeat_limit(tokens: np.ndarray, breakers: Breakers) -> int:
    """How far back a repeat may reach: to just after the latest complete breaker (its head and, after it, its
    tail, the longest one that matches), or the whole history."""
    n = len(tokens)
    if not breakers:
        return n
    heads = np.flatnonzero(np.isin(tokens, np.fromiter(breakers, dtype=np.int64, count=len(breakers))))
    for position in heads[::-1].tolist():
        i = n - 1 - position  # counted from the end, as llama.cpp's ring buffer counts
        longest = -1
        for tail in breakers[int(tokens[position])]:
            size = len(tail)
            if longest < size <= i and tuple(tokens[position + 1 : position + 1 + size].tolist()) == tail:
                longest = size
        if longest >= 0:
            return i - longest
    return n


def overlapping_sequences(
    vocab: Sequence[bytes], breaker: bytes, encode: Callable[[str], list[int]]
) -> dict[int, set[tuple[int, ...]]]:
    """llama.cpp's get_overlapping_token_sequences for one breaker: each token holding the whole breaker (empty
    tail), and each token whose end starts it, with the tokens of the breaker's rest as the tail."""
    found: dict[int, set[tuple[int, ...]]] = {}
    first = breaker[:1]
    for token_id, word in enumerate(vocab):
        if breaker in word:
            found.setdefault(token_id, set()).add(())
            continue
        position = word.find(first)
        while position >= 0:
            matched, i = True, 1
            while i < len(breaker) and position + i < len(word):
                if word[position + i] != breaker[i]:
                    matched = False
                    break
                i += 1
            if matched:
                rest = breaker[i:].decode("utf-8", "ignore")
                found.setdefault(token_id, set()).add(tuple(encode(rest))[:MAX_TAIL_TOKENS])
            position = word.find(first, position + 1)
    return found


@lru_cache(maxsize=4)
def _vocab_bytes(tokenizer: Tokenizer) -> tuple[bytes, ...]:
    """Each token's bytes, special tokens as their text (llama.cpp detokenizes with `special: true`)."""
    return tuple(tokenizer.token_bytes(token_id) for token_id in range(tokenizer.vocab_size))


@lru_cache(maxsize=16)
def dry_breakers(tokenizer: Tokenizer, strings: tuple[str, ...]) -> Breakers:
    """The breakers `strings` stand for in `tokenizer`'s vocabulary (a scan of it: cached, and to be run off the
    event loop). Empty strings are skipped and long ones cut to MAX_BREAKER_BYTES, as llama.cpp does."""
    vocab = _vocab_bytes(tokenizer)
    merged: dict[int, set[tuple[int, ...]]] = {}
    for text in strings:
        raw = text.encode("utf-8")[:MAX_BREAKER_BYTES]
        if not raw:
            continue
        for token_id, tails in overlapping_sequences(vocab, raw, tokenizer.encode_literal).items():
            merged.setdefault(token_id, set()).update(tails)
    return {token_id: tuple(sorted(tails)) for token_id, tails in merged.items()}
