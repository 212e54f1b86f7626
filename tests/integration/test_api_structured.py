"""Structured output through the official `openai` client against a real server on the tiny Llama: its random
weights want arbitrary text, so every valid answer here is the grammar's doing."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.fixtures.server import ServerHandle, running_server, tiny_settings

MESSAGES = [{"role": "user", "content": "Give me a color as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_llama_long_context: Path) -> Iterator[ServerHandle]:
    # A longer context: the tools' descriptions in the prompt pass the fixture's 512 tokens.
    with running_server(tiny_settings(tiny_llama_long_context, model_name="tiny-llama")) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120) as openai_client:
        yield openai_client


def _check(value: Any) -> None:
    assert set(value) == {"ok", "color"}
    assert isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue")


def test_chat_json_schema_answers_match_the_schema(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="x",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=300,
        seed=4,
        n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}},
    )
    assert len(completion.choices) == 3
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        _check(json.loads(choice.message.content or ""))


def test_streamed_json_schema_answer_is_the_same_as_blocking(client: OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
    blocking = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=300,
        temperature=0,
        response_format=fmt,  # type: ignore[arg-type]
    )
    stream = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=300,
        temperature=0,
        response_format=fmt,
        stream=True,  # type: ignore[arg-type]
    )
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == blocking.choices[0].message.content
    assert finish == "stop"
    _check(json.loads("".join(pieces)))


def test_json_object_mode_and_vllm_fields(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="x",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=40,
        seed=1,
        response_format={"type": "json_object"},
    )
    content = completion.choices[0].message.content or ""
    assert content.startswith("{")
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    chosen = client.chat.completions.create(
        model="x",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=20,
        seed=2,
        extra_body={"structured_outputs": {"choice": ["cat", "dog", "bird"]}},
    )
    assert chosen.choices[0].message.content in ("cat", "dog", "bird")
    guided = client.completions.create(
        model="x", prompt="Number: ", max_tokens=20, seed=3, extra_body={"guided_regex": r"[0-9]{2,4}"}
    )
    assert re.fullmatch(r"[0-9]{2,4}", guided.choices[0].text)
    assert guided.choices[0].finish_reason == "stop"
    schema_text = client.completions.create(
        model="x",
        prompt="JSON: ",
        max_tokens=300,
        seed=5,
        extra_body={"structured_outputs": {"json": json.dumps(SCHEMA)}},
    )
    _check(json.loads(schema_text.choices[0].text))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "nope",
        ),
        ({"structured_outputs": {"json": "null"}}, "must be a JSON schema object"),
        ({"response_format": {"type": "yaml"}}, "yaml"),
        ({"response_format": "json"}, "response_format"),
        ({"structured_outputs": {"regex": "(oops"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": "cat"}}, "choices must be a non-empty list"),
        ({"structured_outputs": {"json": "{not json"}}, "not valid JSON"),
        ({"structured_outputs": {"structural_tag": {}}}, "structural_tag"),
        ({"structured_outputs": {"json_object": "yes"}}, "must be true"),
        ({"structured_outputs": ["json"]}, "must be an object"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "one kind of structured output"),
        ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "one kind of structured output"),
        ({"guided_grammar": "start: nothing_here"}, "nothing_here"),
        ({"guided_json": {}, "guided_whitespace_pattern": 5}, "guided_whitespace_pattern must be a regex string"),
    ],
)
def test_bad_structured_output_requests_are_400s_naming_the_problem(
    server: ServerHandle, extra: dict[str, Any], needle: str
) -> None:
    for route, body in (
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, **extra}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5, **extra}),
    ):
        response = httpx.post(f"{server.base_url}{route}", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert needle in response.json()["error"]
    health = httpx.get(f"{server.base_url}/health", timeout=10)
    assert health.status_code == 200


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _arguments(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    return arguments


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_blocking_and_streamed(client: OpenAI, tool_choice: Any) -> None:
    kwargs: Any = {"model": "x", "messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": tool_choice}
    completion = client.chat.completions.create(**kwargs, max_tokens=300, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls
    expected = [_arguments(call) for call in choice.message.tool_calls]
    chunks = list(client.chat.completions.create(**kwargs, max_tokens=300, temperature=0, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert all(delta.content is None for delta in deltas)  # the first too (it was ""): the answer is calls
    with client.chat.completions.stream(**kwargs, max_tokens=300, temperature=0) as helper:
        final = helper.get_final_completion()  # the SDK's accumulator: content null, as the blocking answer's
    assert final.choices[0].message.content is None and final.choices[0].message.tool_calls
    pieces = [call for delta in deltas for call in delta.tool_calls or []]
    assert len(pieces) > len(expected)  # arguments streamed as they were written, not whole at the end
    streamed: dict[int, dict[str, str]] = {}  # accumulated by index, as OpenAI's clients do
    for piece in pieces:
        assert piece.function is not None
        if piece.id is not None:
            assert piece.index not in streamed and piece.type == "function" and piece.function.name == "get_weather"
            streamed[piece.index] = {"id": piece.id, "arguments": ""}
        streamed[piece.index]["arguments"] += piece.function.arguments or ""
    assert sorted(streamed) == list(range(len(expected)))
    assert [json.loads(streamed[index]["arguments"]) for index in sorted(streamed)] == expected
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_tool_choice_reads_a_hermes_call_from_the_answer(client: OpenAI) -> None:
    # The random model would never call a tool by itself: a regex makes it write what a Hermes-style model writes.
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    written = f"Checking.\n<tool_call>\n{call}\n</tool_call>"
    regex = written.replace(".", r"\.").replace("{", r"\{").replace("}", r"\}")
    kwargs: Any = {"model": "x", "messages": ASK, "tools": [WEATHER_TOOL], "max_tokens": 200, "seed": 1}
    extra = {"structured_outputs": {"regex": regex}}
    completion = client.chat.completions.create(**kwargs, extra_body=extra)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    assert choice.message.tool_calls and _arguments(choice.message.tool_calls[0]) == {
        "city": "Paris",
        "unit": "celsius",
    }
    chunks = list(client.chat.completions.create(**kwargs, extra_body=extra, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(delta.content or "" for delta in deltas).strip() == "Checking."
    # The call streams as it is written: its id and name first, then its arguments in pieces, as vLLM's Hermes parser.
    pieces = [piece for delta in deltas for piece in delta.tool_calls or []]
    assert len(pieces) > 3 and {piece.index for piece in pieces} == {0}
    assert pieces[0].id and pieces[0].function and pieces[0].function.name == "get_weather"
    assert all(piece.id is None for piece in pieces[1:])
    streamed = "".join(piece.function.arguments or "" for piece in pieces if piece.function)
    assert json.loads(streamed) == {"city": "Paris", "unit": "celsius"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = client.chat.completions.create(**{**kwargs, "tool_choice": "none"}, extra_body=extra)
    assert plain.choices[0].message.content == written and not plain.choices[0].message.tool_calls


def test_tool_history_is_accepted(client: OpenAI) -> None:
    messages: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ]
    completion = client.chat.completions.create(  # greedy: sampled, the random model may end before 3 tokens
        model="x", messages=messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=3, temperature=0
    )
    assert completion.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "'x'"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "format"),
        (
            {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": 3}}]}]},
            "tool_calls[0]",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
                "tool_choice": "required",
            },
            "bogus",
        ),
        (  # under auto (the default) too: the tools' schemas are compiled whatever the model does
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"properties": {"a": {"type": "nope"}}}},
                    }
                ]
            },
            "nope",
        ),
    ],
)
def test_bad_tool_requests_are_400s(server: ServerHandle, extra: dict[str, Any], needle: str) -> None:
    body = {"messages": ASK, "max_tokens": 5, **extra}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]


@pytest.mark.parametrize("field", ["tools", "tool_choice", "functions"])
def test_tool_fields_on_plain_completions_are_400s(server: ServerHandle, field: str) -> None:
    value = {"tools": [WEATHER_TOOL], "tool_choice": "required", "functions": [{"name": "f"}]}[field]
    body = {"prompt": "hi", "max_tokens": 3, field: value}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert f"{field} is a chat field" in response.json()["error"]


def test_llama_cpp_forms_gbnf_and_vllm_spacing(client: OpenAI) -> None:
    def chat(extra: dict[str, Any]) -> str:
        completion = client.chat.completions.create(
            model="x",
            messages=MESSAGES,
            max_tokens=300,
            seed=7,
            extra_body=extra,  # type: ignore[arg-type]
        )
        assert completion.choices[0].finish_reason == "stop"
        return completion.choices[0].message.content or ""

    _check(json.loads(chat({"response_format": {"type": "json_object", "schema": SCHEMA}})))
    _check(json.loads(chat({"json_schema": SCHEMA})))
    # llama.cpp reads an empty grammar as none, as clients that always send one expect
    _check(json.loads(chat({"grammar": "", "json_schema": SCHEMA})))
    _check(json.loads(chat({"grammar": "", "response_format": {"type": "json_object", "schema": SCHEMA}})))
    assert chat({"grammar": 'root ::= "yes" | "no"'}) in ("yes", "no")  # GBNF, as llama.cpp takes it
    assert chat({"structured_outputs": {"grammar": "root ::= [0-9] [0-9]"}}).isdigit()
    compact = chat({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True, "disable_fallback": False}})
    _check(json.loads(compact))
    assert not any(character.isspace() for character in compact)
    compact = chat({"guided_json": SCHEMA, "guided_whitespace_pattern": ""})  # vLLM's older name, beside guided_json
    _check(json.loads(compact))
    assert not any(character.isspace() for character in compact)


def test_a_forced_call_cut_by_max_tokens_is_the_same_partial_call_streamed_or_not(client: OpenAI) -> None:
    kwargs: Any = {"model": "x", "messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": "required"}
    completion = client.chat.completions.create(**kwargs, max_tokens=42, temperature=0)  # cut inside the arguments
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    chunks = list(client.chat.completions.create(**kwargs, max_tokens=42, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed: dict[int, str] = {}
    for chunk in chunks:
        for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            streamed[piece.index] = streamed.get(piece.index, "") + (
                (piece.function and piece.function.arguments) or ""
            )
    blocking = {index: call.function.arguments for index, call in enumerate(choice.message.tool_calls or [])}
    assert streamed == blocking and blocking  # the call as far as it was written, either way


def test_a_forced_call_cut_by_a_stop_string_is_no_finished_call(client: OpenAI) -> None:
    # The stop string goes from the text, and with it the rest of the call: finish_reason "tool_calls" would have the
    # client run a call whose arguments are not JSON.
    kwargs: Any = {"model": "x", "messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": "required"}
    completion = client.chat.completions.create(**kwargs, max_tokens=300, temperature=0, stop=['"unit"'])
    choice: Any = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == '"unit"'
    assert choice.message.tool_calls and choice.message.tool_calls[0].function.arguments.endswith(", ")
    chunks = list(client.chat.completions.create(**kwargs, max_tokens=300, temperature=0, stop=['"unit"'], stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    named = {"type": "function", "function": {"name": "get_weather"}}
    cut = client.chat.completions.create(**{**kwargs, "tool_choice": named}, max_tokens=300, stop=["city"])
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_forced_calls_with_logprobs_keep_content_null(client: OpenAI) -> None:
    # The steps' logprobs ride on chunks of their own (a call's text is not content): a "" content there made the
    # SDK's accumulated message read "" where the blocking answer is null.
    kwargs: Any = {"model": "x", "messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": "required"}
    kwargs.update(max_tokens=300, temperature=0, logprobs=True, top_logprobs=2)
    blocking = client.chat.completions.create(**kwargs).choices[0]
    with client.chat.completions.stream(**kwargs) as helper:
        streamed = helper.get_final_completion().choices[0]
    assert blocking.message.content is None and streamed.message.content is None
    assert blocking.logprobs and streamed.logprobs and blocking.logprobs.content and streamed.logprobs.content
    assert [item.token for item in streamed.logprobs.content] == [item.token for item in blocking.logprobs.content]
    assert streamed.message.tool_calls and blocking.message.tool_calls
    assert streamed.message.tool_calls[0].function.arguments == blocking.message.tool_calls[0].function.arguments
