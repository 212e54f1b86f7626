"""Tool calls streamed as they are written (forced ones, and auto Hermes blocks): a call's header once its name is
complete, then its arguments' JSON piece by piece, spaced as json.dumps spaces it, whatever whitespace the model put
around it; blocks that are not calls of the tools are held and read at the end."""

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


def _auto(text: str, step: int, parallel: bool = True) -> tuple[str, list[CallDelta], Any]:
    """Content sent (as it came, then at the end), call deltas as they came, and the finished stream."""
    stream = ToolStream(tool_request({"tools": TOOLS, "parallel_tool_calls": parallel}))
    content, deltas = "", []
    for start in range(0, len(text), step):
        content += stream.feed(text[start : start + step])
        deltas += stream.deltas
    done = stream.finish()
    return content + done.content, deltas + done.deltas, done


def _block(name: str, arguments: Any) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, indent=2) + "\n</tool_call>"


@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_an_auto_hermes_call_streams_as_it_is_written_then_text_goes_on(step: int) -> None:
    text = f"Let me look.\n{_block('get_weather', ARGUMENTS)}\n\n{_block('search', {'q': 'x'})}\nDone."
    content, deltas, done = _auto(text, step)
    assert content == "Let me look.\n\nDone."  # the blocking answer's, less the blank lines between the calls
    calls = _calls(deltas)
    assert [call["name"] for call in calls] == ["get_weather", "search"]
    assert [json.loads(call["arguments"]) for call in calls] == [ARGUMENTS, {"q": "x"}]
    assert done.unsent == [] and [call["id"] for call in done.calls] == [call["id"] for call in calls]
    blocking = parse_answer(text, tool_request({"tools": TOOLS}))
    assert [json.loads(call["function"]["arguments"]) for call in blocking.tool_calls] == [ARGUMENTS, {"q": "x"}]
    if step == 1:
        assert len(deltas) > 20  # piece by piece
        assert deltas[0].id is not None and deltas[0].index == 0 and deltas[0].arguments == ""


def test_an_auto_call_streams_once_its_json_object_is_complete() -> None:
    """Its pieces wait until its object closes and reads as a call: pieces of JSON that then broke made the OpenAI
    SDK's partial parser raise (strict tools), and the blocking answer had no call at all."""
    stream = ToolStream(tool_request({"tools": TOOLS}))
    assert stream.feed('<tool_call>{"name": "search", "arguments": {"q": "sun') == "" and stream.deltas == []
    assert stream.feed('ny"}}</tool_') == ""
    assert _calls(stream.deltas) == [{"id": stream.deltas[0].id, "name": "search", "arguments": '{"q": "sunny"}'}]
    assert stream.feed("call> It is.") == " It is."


@pytest.mark.parametrize(
    "text",
    [
        'Sure. <tool_call>{"name": "search", "arguments": {"q": "unfin',  # cut short (max_tokens)
        'Sure. <tool_call>\n{"name": "search", "arguments": {"q": Paris}}\n</tool_call>',  # JSON that breaks
        '<tool_call>{"name": "search", "arguments": null}</tool_call>',  # arguments no parser reads
    ],
)
def test_a_call_whose_json_does_not_read_as_one_is_what_the_blocking_answer_says(text: str) -> None:
    content, deltas, done = _auto(text, 4)
    blocking = parse_answer(text, tool_request({"tools": TOOLS}))
    assert deltas == [] and done.calls == blocking.tool_calls == [] and content == blocking.content == text


@pytest.mark.parametrize("step", [1, 6])
def test_blocks_that_are_not_calls_of_the_tools_are_held_and_read_at_the_end(step: int) -> None:
    for block in (
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not one of the tools
        '<tool_call>{"arguments": {}, "name": "search"}</tool_call>',  # arguments first: nothing to announce them under
        '<tool_call>[{"name": "search", "arguments": {}}]</tool_call>',  # a list
        "<tool_call>{not json}</tool_call>",
    ):
        text = f"Hm. {block} And {_block('search', {'q': 1})} end"
        content, deltas, done = _auto(text, step)
        blocking = parse_answer(text, tool_request({"tools": TOOLS}))
        assert deltas == [] and done.unsent == done.calls
        assert content.strip() == blocking.content
        assert [call["function"]["name"] for call in done.calls] == [c["function"]["name"] for c in blocking.tool_calls]


def test_arguments_written_as_json_text_go_out_when_the_block_closes() -> None:
    text = '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>'
    content, deltas, done = _auto(text, 2)
    assert content == ""
    assert _calls(deltas) == [{"id": deltas[0].id, "name": "search", "arguments": '{"q": "x"}'}]
    assert done.calls[0]["function"]["arguments"] == '{"q": "x"}'


def test_without_parallel_calls_only_the_first_call_is_made() -> None:
    text = f"{_block('search', {'q': 1})}\n{_block('get_weather', {})} bye"
    content, deltas, done = _auto(text, 3, parallel=False)
    blocking = parse_answer(text, tool_request({"tools": TOOLS, "parallel_tool_calls": False}))
    assert [call["name"] for call in _calls(deltas)] == ["search"] and done.unsent == []
    assert len(done.calls) == len(blocking.tool_calls) == 1
    assert content.strip() == blocking.content == "bye"


def test_a_closing_tag_inside_an_argument_is_the_arguments_text() -> None:
    text = '<tool_call>{"name": "search", "arguments": {"q": "a </tool_call> b"}}</tool_call> after'
    for step in (1, 5, 10_000):
        content, deltas, done = _auto(text, step)
        assert _calls(deltas) == [{"id": deltas[0].id, "name": "search", "arguments": '{"q": "a </tool_call> b"}'}]
        assert content.strip() == "after"
    blocking = parse_answer(text, tool_request({"tools": TOOLS}))
    assert [json.loads(c["function"]["arguments"]) for c in blocking.tool_calls] == [{"q": "a </tool_call> b"}]
    assert blocking.content == "after"


def test_a_block_left_open_is_closed_by_the_next_one() -> None:
    text = (
        '<tool_call>{"name": "search", "arguments": {"q": 1}}\n'
        '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call> ok'
    )
    for step in (1, 7, 10_000):
        content, deltas, done = _auto(text, step)
        assert [(call["name"], call["arguments"]) for call in _calls(deltas)] == [
            ("search", '{"q": 1}'),
            ("get_weather", "{}"),
        ]
        assert content.strip() == "ok" and done.unsent == []
    blocking = parse_answer(text, tool_request({"tools": TOOLS}))
    assert [c["function"]["name"] for c in blocking.tool_calls] == ["search", "get_weather"]
    assert blocking.content == "ok"


def test_content_and_call_pieces_keep_their_order_within_one_feed() -> None:
    """A feed of several tokens (speculative decoding) may end a call and start text: the call's last piece goes
    first, so a client that closes a call when text comes (Anthropic's blocks) gets all of it."""
    stream = ToolStream(tool_request({"tools": TOOLS}))
    stream.feed('Hi <tool_call>{"name": "search", "arguments": {"q"')
    assert [type(piece).__name__ for piece in stream.pieces] == ["str"]  # the call waits for its whole object
    stream.feed(": 1}}</tool_call> Done.")
    *call, text = stream.pieces
    assert text == " Done." and all(isinstance(piece, CallDelta) for piece in call)
    assert "".join(piece.arguments for piece in call if isinstance(piece, CallDelta)) == '{"q": 1}'
