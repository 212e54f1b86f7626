"""Prompt lookup decoding: draft tokens taken from the sequence's own text (or from the output a request predicts,
OpenAI's Predicted Outputs), verified in one step.

When a sequence's last few tokens appeared earlier in its prompt or output, the tokens that followed them then are
a good guess for what comes next (quoting, summarising, editing code, repeating a name). The step computes the last
token and the guesses together; the engine samples each row in turn and keeps the guesses while its own sample
equals them, so the output is what it would have been one token at a time (the same distribution, and for a seed
the same draws), only in fewer steps: fewer passes over the weights, and on a cluster fewer round trips per token.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

NGRAM_SIZES = (3, 2)  # longest first: a longer match predicts better
MAX_BACKOFF_STEPS = 16
PREDICTION_NGRAM_SIZES = (3, 2, 1)  # a prediction is meant to be the output: even one shared token aligns them


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
    """One sequence's drafts from its predicted output: where the output stands in the prediction (its last tokens'
    first occurrence there at or after where it stood before), the prediction's next tokens. After a stretch the
    model wrote differently, the output's next tokens that the prediction also holds align it again."""

    def __init__(self, prediction: Sequence[int]) -> None:
        super().__init__()
        self.prediction = list(prediction)
        self.ends: dict[tuple[int, ...], list[int]] = {}  # n-gram → where its occurrences in the prediction end
        for size in PREDICTION_NGRAM_SIZES:
            for end in range(size, len(self.prediction) + 1):
                self.ends.setdefault(tuple(self.prediction[end - size : end]), []).append(end)
        self.cursor = 0  # the position in the prediction the output's end was last aligned with

    def propose(self, output: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens of the prediction that follow where `output` (the generated tokens) stands in it."""
        if self._skips(limit):
            return []
        cursor = self._align(output)
        if cursor is None:
            return []
        self.cursor = cursor
        return self.prediction[cursor : cursor + limit]

    def _align(self, output: Sequence[int]) -> int | None:
        if not output:
            return 0
        for size in PREDICTION_NGRAM_SIZES:
            ends = self.ends.get(tuple(output[-size:])) if len(output) >= size else None
            if ends:
                later = bisect_left(ends, self.cursor)
                return ends[later] if later < len(ends) else ends[-1]
        return None
