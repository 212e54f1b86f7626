"""/infill's editor limits (llama.cpp's n_indent and t_max_predict_ms) on a middle as it streams."""

from __future__ import annotations

import time

from cake_py.api.infill import EditorLimits
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.sampling import SampledToken


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
