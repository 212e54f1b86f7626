"""Prompt lookup decoding: draft tokens taken from the sequence's own text (or from the output a request predicts,
OpenAI's Predicted Outputs), verified in one step.

When a sequence's last few tokens appeared earlier in its prompt or output, the tokens that followed them then are
a good guess for what comes next (quoting, summarising, editing code, repeating a name). The step computes the last
token and the guesses together; the engine samples each row in turn and keeps the guesses while its own sample
equals them, so the output is what it would have been one token at a time (the same distribution, and for a seed
the same draws), only in fewer steps: fewer passes over the weights, and on a cluster fewer round trips per token.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

NGRAM_SIZES = (3, 2)  # longest first: a longer match predicts better
MAX_BACKOFF_STEPS = 16
PREDICTION_NGRAM = 3  # the output's last tokens that place it in a prediction
PREDICTION_WINDOW = 64  # how far from where it should be two shared tokens may place it
MAX_PLACES_TRIED = 256  # occurrences of its last token looked at, per step


class _Backoff:
    """After a draft that was wholly rejected, wait (1, 2, 4 … 16 decode steps) before drafting again, so text the
    drafts do not predict costs little."""

    def __init__(self) -> None:
        self.wait = 0  # decode steps to skip before the next draft
        self.backoff = 1

    def _skips(self, limit: int) -> bool:
        """Whether this step drafts nothing (no room, or waiting)."""
        if limit <= 0:
            return True
        if self.wait:
            self.wait -= 1
            return True
        return False

    def verified(self, proposed: int, accepted: int) -> None:
        """How a draft fared: all rejected → wait longer before the next; any accepted → draft again at once."""
        if accepted or not proposed:
            self.backoff = 1
            return
        self.wait = self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF_STEPS)


class PromptLookup(_Backoff):
    """One sequence's drafts from its own text. Indexes its n-grams as it grows."""

    def __init__(self) -> None:
        super().__init__()
        self.indexed = 0  # n-grams ending before this position are in `last_end`
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram → where its latest indexed occurrence ends

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the sequence's last n-gram."""
        if self._skips(limit):
            return []
        end = len(tokens)
        for position in range(max(self.indexed, min(NGRAM_SIZES)), end):  # n-grams ending before the last token
            for size in NGRAM_SIZES:
                if position >= size:
                    self.last_end[tuple(tokens[position - size : position])] = position
        self.indexed = max(self.indexed, end)
        for size in NGRAM_SIZES:
            found = self.last_end.get(tuple(tokens[end - size :])) if end > size else None
            if found is not None and found < end:
                # The text goes on as it went on after that occurrence; where that runs into the present (a pattern
                # repeating with period end - found), it goes on repeating.
                drafts: list[int] = []
                for offset in range(found, found + limit):
                    drafts.append(tokens[offset] if offset < end else drafts[offset - end])
                return drafts
        return []


class PredictionLookup(_Backoff):
    """One sequence's drafts from its predicted output: the prediction's next tokens from where the output stands in
    it. That is where the output would be had it followed the prediction since it was last placed (`expected`),
    while its last token agrees there. Otherwise the model wrote something else, and the output is placed again from
    what it wrote since it last agreed (the tokens before say nothing about where it went: in repetitive text, a
    list or JSON records, they occur all over the prediction):
    - a token added or dropped: its last token one or two places from `expected`;
    - else the last 2 or 3 new tokens near where it should be (from `expected`, or from the last agreed place),
      nearest first; only when none is near, the last 3 further ahead, a guess that moves nothing until the output
      agrees with it;
    - else a substitution: the prediction goes on from `expected`."""

    def __init__(self, prediction: Sequence[int]) -> None:
        super().__init__()
        self.prediction = list(prediction)
        self.ends: dict[int, list[int]] = {}  # token → the positions just after its occurrences in the prediction
        for end, token in enumerate(self.prediction, start=1):
            self.ends.setdefault(token, []).append(end)
        self.cursor = 0  # where in the prediction the output stood when last placed …
        self.placed_at = 0  # … and how many tokens it had then
        self.confirmed = 0  # the last place its own tokens agreed with (a guess is not one) …
        self.confirmed_at = 0  # … and how many tokens the output had then
        self.guessing = False  # whether the last placing was a guess (a substitution, a far place)

    def propose(self, output: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens of the prediction that follow where `output` (the generated tokens) stands in it."""
        if self._skips(limit):
            return []
        self.cursor, self.placed_at = self._place(output), len(output)
        return self.prediction[self.cursor : self.cursor + limit]

    def _place(self, output: Sequence[int]) -> int:
        if not output:
            return 0
        size = len(self.prediction)
        expected = min(self.cursor + len(output) - self.placed_at, size)
        agreeing = 0  # of the tokens since the last placing (drafts kept, and one sampled), those that followed it
        while (
            self.placed_at + agreeing < len(output)
            and self.cursor + agreeing < size
            and output[self.placed_at + agreeing] == self.prediction[self.cursor + agreeing]
        ):
            agreeing += 1
        # What a guess drafted confirms it once a few tokens agree (a separator or two agree anywhere in a list).
        if agreeing >= (PREDICTION_NGRAM if self.guessing else 1):
            self._agreed(self.cursor + agreeing, self.placed_at + agreeing)
        new = len(output) - self.confirmed_at  # tokens written since the output last agreed with the prediction
        # Its last token where it should be; or a token dropped (the next one written), or added (the prediction
        # goes on after it: seen once the output wrote the token that follows); two need two tokens to agree.
        for offset, needed in ((0, 1), (1, 1), (-1, 1), (2, 2), (-2, 2)):
            end = expected + offset
            if 0 < end <= size and (offset >= 0 or new > -offset):
                if self._shared(end, output, PREDICTION_NGRAM if offset == 0 else new) >= needed:
                    return self._agreed(end, len(output))
        from_confirmed = min(self.confirmed + len(output) - self.confirmed_at, size)
        best, best_key = expected, None
        ends = self.ends.get(output[-1], [])
        # From a little before where it last agreed: an agreement may have been a coincidence (repeated text).
        first = bisect_right(ends, self.confirmed - PREDICTION_WINDOW)
        for end in ends[first : first + MAX_PLACES_TRIED]:
            shared = self._shared(end, output, new)
            distance = min(abs(end - expected), abs(end - from_confirmed))
            near = distance <= PREDICTION_WINDOW
            if (near and shared >= 2) or shared == PREDICTION_NGRAM:
                key = (near, -distance)
                if best_key is None or key > best_key:
                    best, best_key = end, key
        if best_key is not None and best_key[0]:
            return self._agreed(best, len(output))
        self.guessing = True  # a far place, or a substitution at `expected`
        return best

    def _agreed(self, end: int, length: int) -> int:
        self.confirmed, self.confirmed_at, self.guessing = end, length, False
        return end

    def _shared(self, end: int, output: Sequence[int], limit: int) -> int:
        """How many of the output's last tokens (at most `limit` and PREDICTION_NGRAM) end the prediction's first
        `end`."""
        shared = 0
        while (
            shared < min(PREDICTION_NGRAM, limit, end, len(output))
            and self.prediction[end - 1 - shared] == output[len(output) - 1 - shared]
        ):
            shared += 1
        return shared
