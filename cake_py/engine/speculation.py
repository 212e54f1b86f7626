"""Prompt lookup decoding: draft tokens taken from the sequence's own text, verified in one step.

When a sequence's last few tokens appeared earlier in its prompt or output, the tokens that followed them then are
a good guess for what comes next (quoting, summarising, editing code, repeating a name). The step computes the last
token and the guesses together; the engine samples each row in turn and keeps the guesses while its own sample
equals them, so the output is what it would have been one token at a time (the same distribution, and for a seed
the same draws), only in fewer steps: fewer passes over the weights, and on a cluster fewer round trips per token.
"""

from __future__ import annotations

NGRAM_SIZES = (3, 2)  # longest first: a longer match predicts better
MAX_BACKOFF_STEPS = 16


class PromptLookup:
    """One sequence's drafts. Indexes its n-grams as it grows; after a draft that was wholly rejected it waits
    (1, 2, 4 … 16 decode steps) before drafting again, so text that does not repeat costs little."""

    def __init__(self) -> None:
        self.indexed = 0  # n-grams ending before this position are in `last_end`
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram → where its latest indexed occurrence ends
        self.wait = 0  # decode steps to skip before the next draft
        self.backoff = 1

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the sequence's last n-gram."""
        if limit <= 0:
            return []
        if self.wait:
            self.wait -= 1
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

    def verified(self, proposed: int, accepted: int) -> None:
        """How a draft fared: all rejected → wait longer before the next; any accepted → draft again at once."""
        if accepted or not proposed:
            self.backoff = 1
            return
        self.wait = self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF_STEPS)
