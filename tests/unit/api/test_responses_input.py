"""The Responses API's input items turned into a chat: long inputs cost time in proportion to their length (they
are read on the event loop: a quadratic step froze every other request for minutes)."""

from __future__ import annotations

import time

import pytest

from cake_py.api.errors import ApiError
from cake_py.api.responses_input import chat_history, input_items

N = 100_000  # items: linear steps take well under a second, the quadratic ones took 30 s to 13 minutes


def test_a_repeated_id_among_many_items_is_found_in_one_pass() -> None:
    items = [{"id": f"m{i}", "role": "user", "content": "x"} for i in [*range(N), 7]]
    began = time.monotonic()
    with pytest.raises(ApiError, match="input items share the id 'm7'"):
        input_items(items)
    assert time.monotonic() - began < 10


def test_many_calls_join_one_assistant_turn_in_linear_time() -> None:
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    items = input_items([{"role": "assistant", "content": "ok"}, *[call] * N])
    began = time.monotonic()
    (turn,) = chat_history(items)
    assert time.monotonic() - began < 10
    assert turn["role"] == "assistant" and turn["content"] == "ok" and len(turn["tool_calls"]) == N


def test_a_conversations_reasoning_is_left_out_but_a_turn_of_only_thinking_stays_a_turn() -> None:
    """Stored conversations hold reasoning items (`input` drops them): thinking before an answer or a call leaves
    nothing, thinking alone stays an empty assistant turn (as a stored response's chain keeps that turn)."""
    question = {"type": "message", "id": "q", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
    answer = {"type": "message", "id": "a", "role": "assistant", "content": [{"type": "output_text", "text": "yo"}]}
    thinking = {"type": "reasoning", "id": "r", "summary": [], "content": []}
    call = {"type": "function_call", "id": "f", "call_id": "c", "name": "f", "arguments": "{}"}
    assert chat_history([question, thinking, answer]) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    assert [message["role"] for message in chat_history([question, thinking, call])] == ["user", "assistant"]
    assert chat_history([question, thinking, question]) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "hi"},
    ]
    assert chat_history([question, thinking])[-1] == {"role": "assistant", "content": ""}
