"""Forced tool calls streamed as they are written: a call's header once its name is complete, then its arguments'
JSON piece by piece, spaced as json.dumps spaces it, whatever whitespace the model put around it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cake_py.api.forced_calls import CallDelta
from cake_py.api.tool_stream import ToolStream
from cake_py.api.tools import parse_answer, tool_request

TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
    for name in ("get_weather", "search")
]
ARGUMENTS = {"q": 'a "quoted" {brace}: , yes\\', "n": [1, 2.5, {"deep": None}], "ok": True}


def _stream(text: str, tool_choice: Any, step: int) -> tuple[list[CallDelta], ToolStream]:
    stream = ToolStream(tool_request({"tools": TOOLS, "tool_choice": tool_choice}))
    deltas: list[CallDelta] = []
    for start in range(0, len(text), step):
        assert stream.feed(text[start : start + step]) == ""  # forced calls: never content
        deltas += stream.deltas
    return deltas, stream


def _calls(deltas: list[CallDelta]) -> list[dict[str, Any]]:
    """What a client accumulates from the deltas, as OpenAI's clients do (by index)."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        if delta.id is not None:
            assert delta.index not in calls and delta.name is not None
            calls[delta.index] = {"id": delta.id, "name": delta.name, "arguments": ""}
        calls[delta.index]["arguments"] += delta.arguments
    return [calls[index] for index in sorted(calls)]


@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
def test_a_named_call_streams_its_header_then_its_arguments(step: int) -> None:
    text = '{ \n "name" :\t"get_weather" ,\r\n "arguments": ' + json.dumps(ARGUMENTS, indent=3) + "\n }"
    deltas, stream = _stream(text, {"type": "function", "function": {"name": "get_weather"}}, step)
    [call] = _calls(deltas)
    assert deltas[0].id == call["id"] and deltas[0].name == "get_weather"
    assert call["arguments"] == json.dumps(ARGUMENTS, ensure_ascii=False)  # the blocking answer's own spacing
    if step == 1:
        assert len(deltas) > 10  # piece by piece, not at the end
    done = stream.finish()
    assert done.unsent == [] and done.content == ""
    assert done.calls == [
        {"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}
    ]


@pytest.mark.parametrize("step", [1, 5])
def test_required_calls_stream_one_after_the_other(step: int) -> None:
    text = '[{"name": "search", "arguments": {"q": "x"}} ,\n {"name":"get_weather","arguments":{}}]'
    deltas, stream = _stream(text, "required", step)
    calls = _calls(deltas)
    assert [(call["name"], json.loads(call["arguments"])) for call in calls] == [
        ("search", {"q": "x"}),
        ("get_weather", {}),
    ]
    assert [delta.index for delta in deltas if delta.id] == [0, 1]
    assert [call["id"] for call in stream.finish().calls] == [call["id"] for call in calls]


def test_a_call_cut_short_is_what_was_written_of_it_streamed_or_not() -> None:
    text = '[{"name": "search", "arguments": {"q": "unfinish'
    deltas, stream = _stream(text, "required", 3)
    assert _calls(deltas) == [{"id": deltas[0].id, "name": "search", "arguments": '{"q": "unfinish'}]
    done = stream.finish()
    assert done.unsent == [] and [call["function"]["arguments"] for call in done.calls] == ['{"q": "unfinish']
    blocking = parse_answer(text, tool_request({"tools": TOOLS, "tool_choice": "required"}))
    assert blocking.content is None
    assert [call["function"] for call in blocking.tool_calls] == [call["function"] for call in done.calls]


@pytest.mark.parametrize("step", [1, 4])
def test_the_blocking_answer_reads_calls_as_the_stream_does(step: int) -> None:
    """The same text either way: numbers as written (1.50, 1E400), escapes kept, json.dumps' spacing."""
    arguments = '{ "x" : 1E400,\n "p":1.50 , "b" : "\\u0008 \\" }", "d": [1,\t2] }'
    text = '{"name": "search", "arguments": ' + arguments + "}"
    deltas, stream = _stream(text, {"type": "function", "function": {"name": "search"}}, step)
    [streamed] = _calls(deltas)
    assert streamed["arguments"] == '{"x": 1E400, "p": 1.50, "b": "\\u0008 \\" }", "d": [1, 2]}'
    request = tool_request({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "search"}}})
    [call] = parse_answer(text, request).tool_calls
    assert call["function"]["arguments"] == streamed["arguments"]
    assert json.loads(call["function"]["arguments"])["p"] == 1.5


def test_an_auto_call_whose_number_no_json_parser_reads_is_text() -> None:
    text = '<tool_call>{"name": "search", "arguments": {"x": 1E400}}</tool_call>'
    answer = parse_answer(text, tool_request({"tools": TOOLS}))
    assert answer.tool_calls == [] and answer.content == text


def test_arguments_written_before_the_name_go_whole_at_the_end() -> None:
    deltas, stream = _stream(
        '{"arguments": {"q": "x"}, "name": "search"}', {"type": "function", "function": {"name": "search"}}, 4
    )
    assert deltas == []
    done = stream.finish()
    assert [call["function"]["name"] for call in done.unsent] == ["search"] and done.unsent == done.calls
