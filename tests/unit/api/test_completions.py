"""The legacy completions' text offsets, from the tokens' bytes."""

from __future__ import annotations

from cake_py.api.completions import text_offsets


def test_a_token_holding_part_of_a_character_starts_where_the_character_does() -> None:
    text = "hé日"
    pieces = [b"h", b"\xc3", b"\xa9", "日".encode()[:1], "日".encode()[1:]]
    assert b"".join(pieces).decode() == text
    assert text_offsets(pieces, 0, len(text)) == ([0, 1, 1, 2, 2], 3)


def test_offsets_go_on_from_an_earlier_chunk_and_stop_at_the_texts_end() -> None:
    """A second chunk starting mid-character; tokens a stop string cut from the text point at its end."""
    assert text_offsets([b"\xa9", b"x"], 2, 10) == ([1, 2], 3)
    assert text_offsets([b"ab", b"cd", b"ef"], 0, 3) == ([0, 2, 3], 6)
    assert text_offsets([], 4, 4) == ([], 4)
