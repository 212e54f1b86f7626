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
    while its last token agrees there. Otherwise the model wrote something else: the output is placed again where
    its last 3 tokens (anywhere ahead) or 2 (near `expected`) occur in the prediction next, and where they occur
    nowhere it is taken for a substitution, and the prediction goes on from `expected`."""

    def __init__(self, prediction: Sequence[int]) -> None:
        super().__init__()
        self.prediction = list(prediction)
        self.ends: dict[int, list[int]] = {}  # token → the positions just after its occurrences in the prediction
        for end, token in enumerate(self.prediction, start=1):
            self.ends.setdefault(token, []).append(end)
        self.cursor = 0  # where in the prediction the output stood when last placed …
        self.placed_at = 0  # … and how many tokens it had then
        self.confirmed = 0  # the last place its own tokens matched (a substitution's guess is not one)

    def propose(self, output: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens of the prediction that follow where `output` (the generated tokens) stands in it."""
        if self._skips(limit):
            return []
        self.cursor, self.placed_at = self._place(output), len(output)
        return self.prediction[self.cursor : self.cursor + limit]

    def _place(self, output: Sequence[int]) -> int:
        if not output:
            return 0
        expected = min(self.cursor + len(output) - self.placed_at, len(self.prediction))
        if self._shared(expected, output):
            self.confirmed = expected
            return expected
        best, best_key = expected, (0, 0)
        ends = self.ends.get(output[-1], [])
        first = bisect_right(ends, self.confirmed)  # past where it last matched: the output does not go back
        for end in ends[first : first + MAX_PLACES_TRIED]:
            shared, distance = self._shared(end, output), abs(end - expected)
            if shared == PREDICTION_NGRAM or (shared == 2 and distance <= PREDICTION_WINDOW):
                key = (shared, -distance)
                if key > best_key:
                    best, best_key = end, key
        if best_key[0]:
            self.confirmed = best
        return best

    def _shared(self, end: int, output: Sequence[int]) -> int:
        """How many of the output's last tokens (at most PREDICTION_NGRAM) end the prediction's first `end`."""
        shared = 0
        while (
            shared < min(PREDICTION_NGRAM, end, len(output))
            and self.prediction[end - 1 - shared] == output[len(output) - 1 - shared]
        ):
            shared += 1
        return shared
