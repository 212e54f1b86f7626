"""Tool call arguments cut short by max_tokens, read as the `anthropic` SDK reads a streamed tool_use block: every
prefix of some JSON documents gives what `jiter.from_json(partial_mode=True)` (the SDK's parser) gives, or fails
where it fails; and a blocking /v1/messages answer's cut tool_use `input` keeps the members written whole, where
it was `{}`."""

from __future__ import annotations

import json
from typing import Any

import jiter
import pytest

from cake_py.api.anthropic import message_of
from cake_py.api.partial_json import loads_partial

DOCUMENTS: list[Any] = [
    {
        "unit": "celsius",
        "city": 'Par"is \\ é \u00e9 \n\t',
        "n": -12.5e3,
        "yes": True,
        "no": False,
        "none": None,
        "list": [1, 0, -0.5, [], {}, {"a": [True, None]}],
        "nested": {"x": {"y": "z"}, "empty": ""},
    },
    [1, "two", {"three": 3}],
    {"big": 1e5, "zero": 0, "ten": 10, "tiny": 1.5e-7},
]


def _read(parse: Any, text: str) -> tuple[str, Any]:
    try:
        return "value", parse(text)
    except ValueError:
        return "error", None


@pytest.mark.parametrize("document", DOCUMENTS)
@pytest.mark.parametrize("layout", [{}, {"separators": (",", ":")}, {"indent": 2, "ensure_ascii": False}])
def test_every_prefix_reads_as_the_anthropic_sdk_reads_it(document: Any, layout: dict[str, Any]) -> None:
    text = json.dumps(document, **layout)
    for end in range(len(text) + 1):
        cut = text[:end]
        expected = _read(lambda t: jiter.from_json(t.encode(), partial_mode=True), cut)
        assert _read(loads_partial, cut) == expected, cut


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"unit": "celsius", "city": "Par', {"unit": "celsius"}),  # a cut string goes with its key
        ('{"a": [1, 2', {"a": [1, 2]}),  # a cut container keeps what it holds
        ('{"a": {"b": tr', {"a": {}}),
        ('{"n": 1.', {}),  # a number that cannot end there
        ('{"n": 12', {"n": 12}),
    ],
)
def test_a_cut_document_keeps_what_was_written_whole(text: str, expected: Any) -> None:
    assert loads_partial(text) == expected


@pytest.mark.parametrize("text", ['{"a" 1}', '{"a": 1,,', "{'a': 1}", '{"a": tx', "", '"cut'])
def test_wrong_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        loads_partial(text)


def _completion(arguments: str) -> dict[str, Any]:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    usage = {"prompt_tokens": 5, "completion_tokens": 9}
    return {"choices": [{"message": message, "finish_reason": "length"}], "usage": usage}


def test_a_tool_use_cut_by_max_tokens_keeps_the_input_written_whole() -> None:
    message = message_of(_completion('{"unit": "celsius", "city": "Par'), "tiny", max_tokens=9)
    assert message["stop_reason"] == "max_tokens"
    assert message["content"] == [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"unit": "celsius"}}  # Anthropic's prefix
    ]
    wrong = message_of(_completion('{"unit" "celsius"'), "tiny", max_tokens=9)  # not cut but wrong: no input
    assert wrong["content"][0]["input"] == {}


def test_nesting_too_deep_is_wrong_json_not_a_crash() -> None:
    with pytest.raises(ValueError, match="too deep"):
        loads_partial('{"a": ' + "[" * 100_000)
