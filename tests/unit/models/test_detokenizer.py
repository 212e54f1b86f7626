"""Incremental detokenization: the same text as decoding the whole output, never half a character, a few tokens
decoded per step."""

import pytest

from cake_py.models.detokenizer import IncrementalDecoder
from cake_py.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_factory) -> Tokenizer:  # type: ignore[no-untyped-def]
    return Tokenizer.from_folder(tiny_model_factory("llama"))


def test_incremental_decoding_equals_full_decoding(tokenizer: Tokenizer) -> None:
    text = "Streaming text: naïve café — 東京 🚀 done."
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character


def test_incremental_decoding_decodes_only_a_window(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tokenizer.encode("word " * 200, add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    longest = 0
    original = tokenizer.decode

    def spy(batch, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal longest
        longest = max(longest, len(batch))
        return original(batch, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", spy)
    for token in ids:
        decoder.push(token)
    assert longest < 12  # a few tokens, never the whole output
