"""A reasoning model's `<think>…</think>` apart from its answer, whole or as it streams, tags split anywhere."""

from __future__ import annotations

import pytest

from cake_py.api.reasoning import ReasoningStream, is_reasoning_template, opens_thinking, split_reasoning

CASES = [
    ("<think>\nweigh it up\n</think>\n\nParis.", False, ("weigh it up", "Paris.")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("weigh it up</think>Paris.", True, ("weigh it up", "Paris.")),  # the prompt opened the block
    ("<think>still thinking when max_tokens came", False, ("still thinking when max_tokens came", None)),
    ("still thinking", True, ("still thinking", None)),
    ("Paris.", False, (None, "Paris.")),
    ("<b>bold</b> <think>late</think>", False, (None, "<b>bold</b> <think>late</think>")),  # only at the start
    ("", False, (None, "")),
    ("<think>\n\n</think>\n\nHi", False, (None, "Hi")),  # an empty block is no thinking
    ("\n  plan  \n</think>  done", True, ("plan", "done")),
]


@pytest.mark.parametrize(("text", "thinking", "expected"), CASES)
def test_whole_answers_split(text: str, thinking: bool, expected: tuple[str | None, str | None]) -> None:
    assert split_reasoning(text, thinking) == expected


@pytest.mark.parametrize(("text", "thinking", "expected"), CASES)
@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_a_stream_sends_the_same_parts_in_any_pieces(text: str, thinking: bool, expected: object, step: int) -> None:
    stream = ReasoningStream(thinking)
    reasoning, content = "", ""
    for start in range(0, len(text), step):
        thought, said = stream.feed(text[start : start + step])
        assert "<think" not in said or not stream.thought  # no tag leaks into content
        reasoning, content = reasoning + thought, content + said
    thought, said = stream.finish()
    reasoning, content = reasoning + thought, content + said
    whole_reasoning, whole_content = split_reasoning(text, thinking)
    assert reasoning == (whole_reasoning or "")  # the same text, spaces included, as the blocking answer's
    assert content == (whole_content or "") if stream.thought else content == text


def test_which_templates_and_prompts_think() -> None:
    assert is_reasoning_template("{{ '<think>' }}…{{ '</think>' }}") and not is_reasoning_template("{{ m }}")
    assert not is_reasoning_template(None)
    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3's enable_thinking: false
    assert opens_thinking("…<think>\nLet me", continued="<think>\nLet me")  # continuing a message mid-thought
    assert not opens_thinking("…</think>\nSo", continued="<think>a</think>\nSo")
