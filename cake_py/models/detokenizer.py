"""Streaming detokenization: a growing list of token ids into text deltas, never half a UTF-8 character."""

from __future__ import annotations

from collections.abc import Sequence

from cake_py.models.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what decoding shows for bytes of a character not complete yet


class IncrementalDecoder:
    """Detokenizes a growing token list into text deltas, never emitting half of a UTF-8 character.

    Keeps two offsets into the ids (the vLLM scheme): text is decoded only from `prefix_offset`, a few tokens back,
    so each step costs a handful of tokens rather than the whole output.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens  # False: special tokens written out (vLLM's field)
        # A little prompt context lets tokenizers that mark word starts (SentencePiece "▁") place spaces right.
        context = list(prompt_ids[-4:])
        self.ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(_REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end), as replacement characters."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
