"""Tool calling: request checks, the prompt, calls read from answers (whole and streamed), and forced calls."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from cake_py.api.errors import ApiError
from cake_py.api.tool_stream import ToolStream
from cake_py.api.tools import ToolRequest, calls_grammar, parse_answer, prompt_messages, tool_request
from cake_py.engine.sequence import Sequence
from cake_py.errors import RequestError
from cake_py.models.grammar import compiler_for
from cake_py.models.sampling import SamplingParams
from cake_py.models.tokenizer import Tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _request(choice: Any = None, parallel: bool | None = None) -> ToolRequest:
    body: dict[str, Any] = {"tools": [WEATHER, TIME]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    return tool_request(body)


def test_tool_choice_defaults_and_forms() -> None:
    assert tool_request({}).choice == "none" and not tool_request({}).active
    assert _request().choice == "auto"
    assert _request("required").forced
    named = _request({"type": "function", "function": {"name": "get_time"}})
    assert (named.choice, named.function, named.forced) == ("function", "get_time", True)
    assert not _request(parallel=False).parallel


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"tools": "get_weather"}, "tools must be a list"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0] must be"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "parameters must be"),
        ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "description"),
        ({"tools": [WEATHER, WEATHER]}, "'get_weather' twice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_value(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(ApiError, match=None) as caught:
        tool_request(body)
    assert caught.value.status == 400
    assert needle in caught.value.message


CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'


@pytest.mark.parametrize(
    ("text", "content", "names"),
    [
        (f"Let me look.\n<tool_call>\n{CALL}\n</tool_call>", "Let me look.", ["get_weather"]),
        (
            f"<tool_call>{CALL}</tool_call>\n<tool_call>" + '{"name": "get_time", "arguments": {}}</tool_call>',
            None,
            ["get_weather", "get_time"],
        ),
        (CALL, None, ["get_weather"]),
        ('{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}', None, ["get_weather"]),  # Llama 3
        ("<|python_tag|>" + CALL, None, ["get_weather"]),
        (f"[TOOL_CALLS] [{CALL}]", None, ["get_weather"]),  # Mistral
        ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}', None, ["get_weather"]),  # JSON text
        ("It is sunny in Paris.", "It is sunny in Paris.", []),
        (
            '<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>',
            [],
        ),
        ("<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
        ('{"answer": 42}', '{"answer": 42}', []),
        ('[{"name": "get_weather", "arguments": 5}]', '[{"name": "get_weather", "arguments": 5}]', []),
    ],
)
def test_calls_are_read_from_answers(text: str, content: str | None, names: list[str]) -> None:
    answer = parse_answer(text, _request())
    assert answer.content == content
    assert [call["function"]["name"] for call in answer.tool_calls] == names
    for call in answer.tool_calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    assert len({call["id"] for call in answer.tool_calls}) == len(names)
    assert parse_answer(text, tool_request({})).content == text  # no tools: text is text


def _streamed(text: str, request: ToolRequest, step: int = 1) -> tuple[list[str], str, list[dict[str, Any]]]:
    """The content pieces, the content left at the end and the calls, as a client accumulates them from the deltas
    and the whole calls sent at the end (which must be the stream's own list of calls)."""
    stream = ToolStream(request)
    pieces, deltas = [], []
    for i in range(0, len(text), step):
        pieces.append(stream.feed(text[i : i + step]))
        deltas += stream.deltas
    done = stream.finish()
    calls: dict[int, dict[str, Any]] = {}
    for delta in [*deltas, *done.deltas]:
        if delta.id is not None:
            assert delta.index not in calls
            calls[delta.index] = {"id": delta.id, "type": "function", "function": {"name": delta.name, "arguments": ""}}
        calls[delta.index]["function"]["arguments"] += delta.arguments
    first_unsent = len(done.calls) - len(done.unsent)
    assert sorted(calls) == list(range(first_unsent))
    accumulated = [calls[index] for index in sorted(calls)] + done.unsent
    assert accumulated == done.calls
    return pieces, done.content, done.calls


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_stream_sends_text_as_it_comes_then_the_call(step: int) -> None:
    text = f"Let me look up Paris.\n<tool_call>\n{CALL}\n</tool_call>"
    pieces, rest, calls = _streamed(text, _request(), step)
    assert "".join(pieces) + rest == "Let me look up Paris.\n"
    assert "<" not in "".join(pieces)
    assert [call["function"]["name"] for call in calls] == ["get_weather"]
    if step == 1:
        assert pieces[0] == "L"  # plain text is not held back


@pytest.mark.parametrize(
    "text",
    ["Plain words < and > [1] {x}", '{"answer": 42}', "[1, 2, 3]", "<b>bold</b>", "  <tool_c", "<tool_call>oops"],
)
def test_a_stream_of_an_answer_without_calls_sends_it_all(text: str) -> None:
    for step in (1, 4):
        pieces, rest, calls = _streamed(text, _request(), step)
        assert "".join(pieces) + rest == text
        assert calls == []


def test_a_stream_of_a_whole_json_call_sends_no_content() -> None:
    pieces, rest, calls = _streamed("  " + CALL, _request(), 2)
    assert "".join(pieces) + rest == ""
    assert len(calls) == 1


def test_the_prompt_of_a_template_without_tools_describes_them(tiny_llama: Path) -> None:
    tokenizer = Tokenizer.from_folder(tiny_llama)
    assert not tokenizer.reads_tools
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    messages, variables = prompt_messages(history, _request(), tokenizer.reads_tools)
    assert variables == {}
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert messages[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    prompt = tokenizer.render_chat(messages)
    assert "get_time" in prompt and "<tool_response>" in prompt
    none, _ = prompt_messages(history[1:2], _request("none"), False)
    assert none == history[1:2]  # tool_choice none: no tools in the prompt


def test_a_template_that_reads_tools_gets_them(tiny_llama: Path) -> None:
    base = Tokenizer.from_folder(tiny_llama)
    template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}\n"
        "{% endfor %}"
    )
    tokenizer = Tokenizer(base.backend, {**base.config, "chat_template": template})
    assert tokenizer.reads_tools
    history = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        }
    ]
    messages, variables = prompt_messages(history, _request(), tokenizer.reads_tools)
    assert [tool["function"]["name"] for tool in variables["tools"]] == ["get_weather", "get_time"]
    prompt = tokenizer.render_chat(messages, template_kwargs=variables)
    assert prompt.startswith("TOOLS:get_weather;get_time;")
    assert "CALL get_weather Oslo" in prompt  # arguments reach the template as an object


def _forced(tokenizer: Tokenizer, request: ToolRequest, seed: int) -> str:
    grammar = compiler_for(tokenizer).compile(calls_grammar(request))
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=seed, grammar=grammar)
    seq = Sequence(1, tokenizer.encode("hi"), params, tokenizer, lambda event: None)
    random = torch.Generator().manual_seed(seed)
    for _ in range(params.max_tokens):
        if seq.accept(
            seq.sampler.sample(torch.randn(tokenizer.vocab_size, generator=random) * 3, seq.all_ids)
        ).finished:
            return tokenizer.decode(seq.output_ids)
    raise AssertionError("the forced call never finished")


@pytest.mark.parametrize("seed", range(3))
def test_forced_tool_choices_always_give_valid_calls(tiny_llama: Path, seed: int) -> None:
    tokenizer = Tokenizer.from_folder(tiny_llama)
    for request, allowed in (
        (_request({"type": "function", "function": {"name": "get_weather"}}), {"get_weather"}),
        (_request("required", parallel=False), {"get_weather", "get_time"}),
        (_request("required"), {"get_weather", "get_time"}),
    ):
        answer = parse_answer(_forced(tokenizer, request, seed), request)
        assert answer.content is None and answer.tool_calls
        assert {call["function"]["name"] for call in answer.tool_calls} <= allowed
        if request.choice == "function" or not request.parallel:
            assert len(answer.tool_calls) == 1
        for call in answer.tool_calls:
            arguments = json.loads(call["function"]["arguments"])
            if call["function"]["name"] == "get_weather":
                assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f")
            else:
                assert arguments == {}


@pytest.mark.parametrize(
    "text",
    [
        '{"name": {"nested": 1}, "arguments": {}}',  # a name that is not a string
        '[{"name": ["get_weather"], "arguments": {}}]',
        "[" * 5000 + "]" * 5000,  # deeper than json.loads recurses
        "<tool_call>" + "[" * 5000 + "</tool_call>",
    ],
)
def test_answers_that_are_not_calls_stay_content(text: str) -> None:
    assert parse_answer(text, _request()) == parse_answer(text, _request()).__class__(text, [])
    pieces, rest, calls = _streamed(text, _request(), 7)
    assert "".join(pieces) + rest == text and calls == []


def test_a_stream_keeps_blocks_that_are_not_calls_as_the_whole_answer_does() -> None:
    text = f"Let me check.\n<tool_call>{CALL}</tool_call>\nAlso <tool_call>{{bad json}}</tool_call> end"
    whole = parse_answer(text, _request())
    assert whole.content == "Let me check.\n\nAlso <tool_call>{bad json}</tool_call> end"
    for step in (1, 5, 1000):
        pieces, rest, calls = _streamed(text, _request(), step)
        assert ("".join(pieces) + rest).strip() == whole.content
        assert len(calls) == 1


def test_a_last_call_without_its_closing_tag_counts_and_parallel_false_keeps_one() -> None:
    assert [c["function"]["name"] for c in parse_answer(f"<tool_call>\n{CALL}\n", _request()).tool_calls] == [
        "get_weather"
    ]
    two = f"<tool_call>{CALL}</tool_call><tool_call>{CALL}</tool_call>"
    assert len(parse_answer(two, _request()).tool_calls) == 2
    assert len(parse_answer(two, _request(parallel=False)).tool_calls) == 1


def test_forced_calls_follow_the_tools_own_definitions(tiny_llama: Path) -> None:
    tokenizer = Tokenizer.from_folder(tiny_llama)
    located = {
        "type": "function",
        "function": {
            "name": "locate",
            "parameters": {
                "$defs": {"Place": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}}},
                "type": "object",
                "properties": {"place": {"$ref": "#/$defs/Place"}, "next": {"$ref": "#"}},
                "required": ["place"],
            },
        },
    }
    choice = {"type": "function", "function": {"name": "locate"}}
    request = tool_request({"tools": [located, TIME], "tool_choice": choice})
    grammar = compiler_for(tokenizer).compile(calls_grammar(request))

    def accepted(arguments: str) -> bool:
        matcher = grammar.start()
        text = '{"name": "locate", "arguments": ' + arguments + "}"
        try:
            for token in tokenizer.encode(text, add_special_tokens=False):
                matcher.consume(token)
        except RequestError:
            return False
        return matcher.finished

    assert accepted('{"place": {"city": "Oslo"}}')
    assert accepted('{"place": {"city": "Oslo"}, "next": {"place": {"city": "Rome"}}}')  # "#": the tool's schema
    assert not accepted('{"place": {"city": "Paris"}}')  # the tool's own $defs apply
    assert not accepted('{"place": {}, "next": {"name": "locate", "arguments": {"place": {}}}}')  # not the wrapper
    for seed in range(2):
        text = _forced(tokenizer, request, seed)
        answer = parse_answer(text, request)
        assert answer.tool_calls or '"arguments"' not in text  # a call, partial when max_tokens cut it
        try:
            arguments = json.loads(answer.tool_calls[0]["function"]["arguments"])
        except (IndexError, ValueError):
            continue  # random logits may nest "next" past max_tokens
        assert arguments["place"].keys() <= {"city"}


def test_forced_calls_keep_the_tools_values_and_anchors(tiny_llama: Path) -> None:
    # Moving a tool's schema under the wrapper's $defs rebases its pointers, not data that looks like one (a const
    # or enum value with a "$ref" key, a property named "enum") nor anchors, which name their place wherever it is.
    tokenizer = Tokenizer.from_folder(tiny_llama)
    pointer = {"$ref": "#/a"}
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "$defs": {"Flag": {"$anchor": "flag", "type": "boolean"}},
                "type": "object",
                "properties": {
                    "ref": {"const": pointer},
                    "pick": {"enum": [pointer, 1]},
                    "enum": {"$ref": "#/$defs/Flag"},
                    "flag": {"$ref": "#flag"},
                },
                "required": ["ref", "pick", "enum", "flag"],
            },
        },
    }
    request = tool_request({"tools": [tool], "tool_choice": "required"})
    grammar = compiler_for(tokenizer).compile(calls_grammar(request))

    def accepted(arguments: str) -> bool:
        matcher = grammar.start()
        text = '[{"name": "f", "arguments": ' + arguments + "}]"
        try:
            for token in tokenizer.encode(text, add_special_tokens=False):
                matcher.consume(token)
        except RequestError:
            return False
        return matcher.finished

    assert accepted('{"ref": {"$ref": "#/a"}, "pick": {"$ref": "#/a"}, "enum": true, "flag": false}')
    assert not accepted('{"ref": {"$ref": "#/$defs/tool0/a"}, "pick": 1, "enum": true, "flag": false}')
    assert not accepted('{"ref": {"$ref": "#/a"}, "pick": 1, "enum": 3, "flag": false}')


def test_forced_calls_of_a_tool_schema_with_its_own_id(tiny_llama: Path) -> None:
    # A schema with an $id is a resource of its own: its "#/…" references resolve against it wherever it sits, so
    # they are not rebased (they were, to pointers inside it that do not exist: a 400 under any tool_choice).
    tokenizer = Tokenizer.from_folder(tiny_llama)
    parameters = {
        "$id": "https://example.com/schemas/locate.json",
        "type": "object",
        "properties": {"place": {"$ref": "#/definitions/Place"}, "near": {"$ref": "#"}},
        "required": ["place"],
        "definitions": {"Place": {"enum": ["Oslo", "Rome"]}},
    }
    tool = {"type": "function", "function": {"name": "locate", "parameters": parameters}}
    request = tool_request({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "locate"}}})
    grammar = compiler_for(tokenizer).compile(calls_grammar(request))

    def accepted(arguments: str) -> bool:
        matcher = grammar.start()
        text = '{"name": "locate", "arguments": ' + arguments + "}"
        try:
            for token in tokenizer.encode(text, add_special_tokens=False):
                matcher.consume(token)
        except RequestError:
            return False
        return matcher.finished

    assert accepted('{"place": "Oslo", "near": {"place": "Rome"}}')
    assert not accepted('{"place": "Paris"}')
    assert not accepted('{"place": "Oslo", "near": {"name": "locate", "arguments": {"place": "Rome"}}}')


def test_required_calls_of_tools_that_share_an_id(tiny_llama: Path) -> None:
    # Each tool's schema stands alone, so two may carry the same $id; in the one document of the calls' grammar they
    # were the one resource, whose references resolved into the last tool's: a call of the first had to write the
    # second's values (silently: the grammar compiled).
    tokenizer = Tokenizer.from_folder(tiny_llama)

    def tool(name: str, value: str) -> dict[str, Any]:
        parameters = {
            "$id": "https://example.com/schemas/pick.json",
            "type": "object",
            "properties": {"x": {"$ref": "#/$defs/Value"}},
            "required": ["x"],
            "$defs": {"Value": {"enum": [value]}},
        }
        return {"type": "function", "function": {"name": name, "parameters": parameters}}

    request = tool_request({"tools": [tool("first", "A"), tool("second", "B")], "tool_choice": "required"})
    grammar = compiler_for(tokenizer).compile(calls_grammar(request))

    def accepted(name: str, value: str) -> bool:
        matcher = grammar.start()
        text = '[{"name": "' + name + '", "arguments": {"x": "' + value + '"}}]'
        try:
            for token in tokenizer.encode(text, add_special_tokens=False):
                matcher.consume(token)
        except RequestError:
            return False
        return matcher.finished

    assert accepted("first", "A") and accepted("second", "B")
    assert not accepted("first", "B") and not accepted("second", "A")


@pytest.mark.parametrize(
    ("tool_choice", "tools", "needle"),
    [
        ({"type": "function", "function": "get_weather"}, [WEATHER], "tool_choice.function must be"),
        ("auto", [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "of an object"),
    ],
)
def test_more_bad_tool_requests(tool_choice: Any, tools: list[Any], needle: str) -> None:
    with pytest.raises(ApiError) as caught:
        tool_request({"tools": tools, "tool_choice": tool_choice})
    assert needle in caught.value.message


def test_only_a_template_that_reads_the_tools_variable_gets_them(tiny_llama: Path) -> None:
    base = Tokenizer.from_folder(tiny_llama)
    commented = "{# no tools support here #}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert not Tokenizer(base.backend, {**base.config, "chat_template": commented}).reads_tools
    reading = "{% for t in tools or [] %}{{ t }}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert Tokenizer(base.backend, {**base.config, "chat_template": reading}).reads_tools


def test_consecutive_tool_results_share_one_turn() -> None:
    history = [
        {"role": "user", "content": "Weather and time?"},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "noon"},
    ]
    messages, _ = prompt_messages(history, _request(), template_reads_tools=False)
    assert messages[-1] == {
        "role": "user",
        "content": "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response>",
    }


def test_many_tool_results_are_joined_in_linear_time_and_turns_around_them_kept() -> None:
    """100k results were added to the turn's text one by one (quadratic: a minute of a frozen event loop)."""
    import time

    result = {"role": "tool", "tool_call_id": "a", "content": "r"}
    history = [{"role": "user", "content": "go"}, *[result] * 100_000, {"role": "assistant", "content": "done"}]
    began = time.monotonic()
    messages, _ = prompt_messages([*history, result, result], _request(), template_reads_tools=False)
    assert time.monotonic() - began < 10
    turn = "<tool_response>\nr\n</tool_response>"
    assert [m["role"] for m in messages[-4:]] == ["user", "user", "assistant", "user"]
    assert messages[-3]["content"] == "\n".join([turn] * 100_000) and messages[-1]["content"] == f"{turn}\n{turn}"


MISTRAL_LIKE = (
    "{% for m in messages %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "{% if c.id|length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{% endif %}[CALL {{ c.id }}]{% endfor %}"
    "{% elif m.role == 'tool' %}{% if m.tool_call_id|length != 9 %}{{ raise_exception('bad id') }}{% endif %}"
    "[RESULT {{ m.tool_call_id }}: {{ m.content }}]"
    "{% else %}{{ m.role }}: {{ m.content }}{% endif %}{% endfor %}"
    "{% if tools %}{% endif %}"
)


def test_a_template_that_checks_call_ids_gets_ids_it_takes(tiny_llama: Path) -> None:
    """Mistral's templates raise unless a call id has 9 characters: OpenAI-style ids from the conversation are
    shortened (the same id in a call and its result), and calls this server makes get 9-character ids."""
    base = Tokenizer.from_folder(tiny_llama)
    tokenizer = Tokenizer(base.backend, {**base.config, "chat_template": MISTRAL_LIKE})
    assert tokenizer.tool_call_id_length == 9 and base.tool_call_id_length is None
    request = tool_request({"tools": [WEATHER], "tool_choice": "required"}, tokenizer.tool_call_id_length)
    history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_0123456789abcdef01234567",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                },
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    ]
    messages, variables = prompt_messages(history, request, tokenizer.reads_tools)
    prompt = tokenizer.render_chat(messages, template_kwargs=variables)  # no raise
    calls = re.findall(r"\[CALL (\w+)\]", prompt)
    results = re.findall(r"\[RESULT (\w+):", prompt)
    assert calls == results and len(set(calls)) == 2 and all(len(call) == 9 for call in calls)
    assert calls[0] == hashlib.sha256(b"call_0123456789abcdef01234567").hexdigest()[:9]  # ids differing anywhere differ
    answer = parse_answer('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]', request)
    assert [len(call["id"]) for call in answer.tool_calls] == [9] and answer.tool_calls[0]["id"].isalnum()
