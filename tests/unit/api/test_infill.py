"""/infill's editor limits (llama.cpp's n_indent and t_max_predict_ms) on a middle as it streams."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cake_py.api.infill import EditorLimits, fitted_prompt
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.fill_in_middle import fim_prompt
from cake_py.models.sampling import SampledToken
from cake_py.models.tokenizer import Tokenizer


def feed(limits: EditorLimits, pieces: list[str]) -> tuple[str, bool]:
    """What goes out of `pieces` through `limits`, and whether they ended it."""
    out = []
    for piece in pieces:
        event = limits(GenerationEvent(1, text=piece, tokens=[SampledToken(5)]))
        out.append(event.text)
        if event.finished:
            return "".join(out), True
    return "".join(out), False


def test_n_indent_ends_the_middle_before_a_line_indented_less() -> None:
    pieces = ["x = 1\n", "    y", " = 2\n", "\n", "  ", "  z = 3\n", "  ", "w", " = 4\n", "v"]
    assert feed(EditorLimits(4, 0), pieces) == ("x = 1\n    y = 2\n\n    z = 3\n  ", True)  # cut where w's line begins
    assert feed(EditorLimits(2, 0), pieces) == ("x = 1\n    y = 2\n\n    z = 3\n  w = 4\n", True)  # v's line: 0
    assert feed(EditorLimits(2, 0), pieces[:-1]) == ("".join(pieces[:-1]), False)  # every later line has 2 or more
    assert feed(EditorLimits(4, 0), ["a\n", "b"]) == ("a\n", True)  # the first line itself is never judged
    assert feed(EditorLimits(4, 0), ["  a", "b\n    c"]) == ("  ab\n    c", False)


def test_t_max_predict_ms_ends_it_at_a_line_break_once_the_time_is_up() -> None:
    limits = EditorLimits(0, 1)
    assert feed(limits, ["a", "b"]) == ("ab", False)
    time.sleep(0.01)
    assert feed(limits, ["c"]) == ("c", False)  # late, but no line break yet
    assert feed(limits, ["\nd"]) == ("\nd", True)
    assert feed(EditorLimits(0, 60_000), ["a\n", "b\n"]) == ("a\nb\n", False)


def test_a_prefix_of_megabytes_is_cut_before_it_is_tokenized(
    tiny_llama_fim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every bisection step tokenized the whole prefix again: seconds each for a few megabytes, to be cut anyway."""
    tokenizer = Tokenizer.from_folder(tiny_llama_fim)
    longest = 0
    original = tokenizer.encode_literal

    def spy(text: str) -> list[int]:
        nonlocal longest
        longest = max(longest, len(text))
        return original(text)

    monkeypatch.setattr(tokenizer, "encode_literal", spy)
    prefix, suffix = "value = bake(value)\n" * 200_000, "return value\n" * 300_000  # 4 MB, 3.9 MB
    ids, cut = fitted_prompt(tokenizer, prefix, suffix, "", [], 100)
    assert cut and len(ids) == 100 and longest <= tokenizer.most_characters(100)
    short = fitted_prompt(tokenizer, prefix[-60:], suffix[:30], "", [], 100)
    assert short == (fim_prompt(tokenizer, prefix[-60:], suffix[:30]), False)  # what fits is not cut
    assert "bake(value)" in tokenizer.decode(ids) and "return value" in tokenizer.decode(ids)  # both kept a part
