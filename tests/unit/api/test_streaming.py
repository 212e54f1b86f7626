"""SSE and NDJSON lines: one event per line, whatever characters the generated text holds."""

from __future__ import annotations

import json

import pytest

from cake_py.api.streaming import ndjson, sse

# str.splitlines breaks at each of these; JSON without ensure_ascii leaves the last three raw.
ODD = "line\nfeed\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029 é 猫 🎂"


@pytest.mark.parametrize("write", [lambda data: sse(data)[len("data: ") :], ndjson])
def test_an_event_stays_on_one_line_and_keeps_its_text(write: object) -> None:
    line = write({"text": ODD}).rstrip("\n")  # type: ignore[operator]
    assert len(line.splitlines()) == 1
    assert json.loads(line) == {"text": ODD}
    assert "é 猫 🎂" in line  # other text is not escaped


def test_sse_passes_done_through() -> None:
    assert sse("[DONE]") == "data: [DONE]\n\n"
