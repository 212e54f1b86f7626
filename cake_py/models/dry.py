"""DRY ("Don't Repeat Yourself"), llama.cpp's repetition sampler: a token that would extend a sequence already seen
in the sequence's history (the prompt and the output) loses `multiplier * base ** (length - allowed_length)` from
its logit, `length` being the longest such repeat it would continue. Sequence breakers (strings such as a newline)
cut a repeat short: no repeat reaches back past the last breaker in the history.

The algorithm is llama.cpp's (`llama_sampler_dry_apply`, from koboldcpp): the breakers are matched as token
sequences ("head" token → "tail" tokens), found once per tokenizer by scanning its vocabulary
(`get_overlapping_token_sequences`), and the repeat lengths come from a reversed Z-algorithm over the history, linear
in its length. Pure Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

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
    nothing). `history` is the window DRY looks at, oldest first."""
    n = len(history)
    if n <= allowed_length:
        return {}

    def back(i: int) -> int:  # the i-th token from the end (llama.cpp's ring_buffer::rat)
        return history[n - 1 - i]

    # Step 1: the latest breaker limits how long a repeat can be.
    rep_limit = n
    for i in range(n):
        tails = breakers.get(back(i))
        if tails is None:
            continue
        longest = -1
        for tail in tails:
            size = len(tail)
            if longest < size <= i and all(tail[offset] == back(i - offset - 1) for offset in range(size)):
                longest = size
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed_length:
        return {}

    # Step 2: repeat[j] is the length of the longest suffix of `history` that also ends at history[j] (capped by
    # rep_limit), by the Z-algorithm run from the end. llama.cpp compares against the capped lengths: so do we.
    repeat = [0] * n
    last = n - 1
    left = right = 0
    for k in range(1, n):
        if k > right:
            length = 0
            while length + k < n and back(length) == back(length + k):
                length += 1
            repeat[last - k] = min(length, rep_limit)
            if length > 0:
                left, right = k, k + length - 1
        else:
            pair = k - left
            if repeat[last - pair] < right - k + 1:
                repeat[last - k] = min(repeat[last - pair], rep_limit)
            else:
                i = right + 1
                while i < n and back(i) == back(i - k):
                    i += 1
                repeat[last - k] = min(i - k, rep_limit)
                left, right = k, i - 1

    # Step 3: the token after each long enough repeat would extend it; each token keeps its longest.
    longest_before: dict[int, int] = {}
    for j in range(n - 1):
        length = repeat[j]
        if length >= allowed_length:
            token = history[j + 1]
            if longest_before.get(token, -1) < length:
                longest_before[token] = length

    # Step 4: the penalties, the exponent capped so the power stays a float32.
    max_exponent = int(FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    penalties: dict[int, float] = {}
    for token, length in longest_before.items():
        if any(not tail for tail in breakers.get(token, ())):  # a breaker on its own is never penalised
            continue
        exponent = length - allowed_length
        if max_exponent > 0 and exponent > max_exponent:
            exponent = max_exponent
        penalties[token] = multiplier * base**exponent
    return penalties


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
