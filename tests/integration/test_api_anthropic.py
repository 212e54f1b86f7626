"""Anthropic's Messages API through the official `anthropic` client against a real uvicorn server on the tiny
Llama: answers are the chat route's (same tokens), blocking and streamed, with stop sequences, forced tool use,
tool results, token counting, the API key as x-api-key, and Anthropic's error body."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from openai import OpenAI

from cake_py.api import keepalive
from cake_py.api.tool_stream import ToolStream
from tests.fixtures.server import ServerHandle, running_server, slow_steps, tiny_settings

SERVED_MODEL = "tiny_llama_long_context"  # the server and client fixtures: tests/integration/conftest.py
SERVED_OPTIONS = {"model_name": "tiny"}
QUESTION = "What is the capital of France?"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    # a bounded string: the random tiny model would otherwise write a city until max_tokens
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def claude(server: ServerHandle) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def ask(claude: anthropic.Anthropic, **extra: Any) -> Any:
    fields: dict[str, Any] = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8}
    # The current API has no temperature; older clients send one, and it is honoured (greedy here).
    return claude.messages.create(model="tiny", extra_body={"temperature": 0}, **{**fields, **extra})


def test_a_message_is_the_chat_routes_answer(claude: anthropic.Anthropic, client: OpenAI) -> None:
    message = ask(claude, system="Be brief.")
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        max_tokens=8,
        temperature=0,
    )
    assert (message.type, message.role, message.model) == ("message", "assistant", "tiny")
    assert message.id.startswith("msg_") and [block.type for block in message.content] == ["text"]
    assert message.content[0].text == chat.choices[0].message.content
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert chat.usage is not None and message.usage.output_tokens == 8
    cached = message.usage.cache_read_input_tokens or 0
    assert message.usage.input_tokens + cached == chat.usage.prompt_tokens
    blocks = ask(claude, system=[{"type": "text", "text": "Be brief."}])
    assert blocks.content[0].text == message.content[0].text


def test_a_streamed_message_is_the_blocking_one(claude: anthropic.Anthropic) -> None:
    blocking = ask(claude)
    with claude.messages.stream(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, extra_body={"temperature": 0}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == blocking.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    assert final.usage.input_tokens == blocking.usage.input_tokens + (blocking.usage.cache_read_input_tokens or 0) - (
        final.usage.cache_read_input_tokens or 0
    )


def test_a_silent_stream_pings_and_the_sdk_skips_it(
    claude: anthropic.Anthropic, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anthropic's `ping` event as the keep-alive, every millisecond here: the SDK reads the same message."""
    blocking = ask(claude)
    monkeypatch.setattr(keepalive, "KEEPALIVE_S", 0.001)
    slow_steps(monkeypatch, server, 0.02)  # a silence of 20 ms before each token, however fast the machine
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "stream": True}
    raw = httpx.post(f"{server.base_url}/v1/messages", json={**body, "temperature": 0}, timeout=60).text
    assert 'event: ping\ndata: {"type":"ping"}\n\n' in raw and raw.rstrip().endswith('{"type":"message_stop"}')
    with claude.messages.stream(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, extra_body={"temperature": 0}
    ) as stream:
        final = stream.get_final_message()
    assert [block.text for block in final.content] == [block.text for block in blocking.content]
    assert final.stop_reason == blocking.stop_reason == "max_tokens"


def test_message_start_counts_the_prompt(claude: anthropic.Anthropic) -> None:
    """As Anthropic's: the prompt's size comes first; how much the prefix cache gave, at the end."""
    turns: Any = [{"role": "user", "content": QUESTION}]
    counted = claude.messages.count_tokens(model="tiny", messages=turns)
    with claude.messages.stream(model="tiny", messages=turns, max_tokens=3) as stream:
        first = next(iter(stream))
        final = stream.get_final_message()
    assert first.type == "message_start" and first.message.usage.input_tokens == counted.input_tokens > 0
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) == counted.input_tokens


def test_a_stop_sequence_is_named(claude: anthropic.Anthropic) -> None:
    text = ask(claude, max_tokens=24).content[0].text
    match = re.search(r"[A-Za-z]{2,}", text[1:])
    assert match, f"the tiny model's greedy text {text!r} has no word to stop on"
    word = match.group(0)
    stopped = ask(claude, max_tokens=24, stop_sequences=["NEVER-THERE", word])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word)
    assert stopped.content[0].text == text[: text.find(word)]


def test_a_forced_tool_use_and_its_result(claude: anthropic.Anthropic) -> None:
    forced = {"type": "tool", "name": "get_weather"}
    message = ask(claude, tools=[WEATHER], tool_choice=forced, max_tokens=300)
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and isinstance(uses[0].input["city"], str)
    assert message.stop_reason == "tool_use" and uses[0].id.startswith("toolu_")  # Anthropic's prefix, not call_
    with claude.messages.stream(
        model="tiny",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=300,
        extra_body={"temperature": 0},
        tools=[WEATHER],
        tool_choice=forced,
    ) as stream:
        final = stream.get_final_message()
    streamed = [block for block in final.content if block.type == "tool_use"]
    assert [(b.name, b.input) for b in streamed] == [(uses[0].name, uses[0].input)]
    assert streamed[0].id.startswith("toolu_") and streamed[0].id != uses[0].id
    answer = claude.messages.create(
        model="tiny",
        max_tokens=8,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": QUESTION},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": uses[0].id, "name": "get_weather", "input": uses[0].input}],
            },  # noqa: E501
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny"}]},
        ],
    )
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_the_sdks_tool_runner_goes_on_without_threads(claude: anthropic.Anthropic, server: ServerHandle) -> None:
    """The SDK's tool runner sends the beta `thread` field: its later turns then carry only the new messages. The
    field was ignored, so the second turn had no tools ("tool_choice 'required' needs tools"). Refused as Anthropic
    refuses what it cannot thread, the SDK drops the field and sends the whole conversation."""
    from anthropic import beta_tool

    cities: list[str] = []

    @beta_tool(input_schema=WEATHER["input_schema"])  # type: ignore[arg-type]
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return "Sunny"

    runner = claude.beta.messages.tool_runner(
        model="tiny",
        max_tokens=300,
        tools=[get_weather],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        max_iterations=2,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    replies = list(runner)
    assert [reply.stop_reason for reply in replies] == ["tool_use", "tool_use"]
    assert len(cities) >= 1
    refused = httpx.post(
        f"{server.base_url}/v1/messages",
        json={
            "model": "tiny",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}],
            "thread": {"type": "create"},
        },
        timeout=60,
    )
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["type"] == "invalid_request_error" and "thread" in error["message"]
    assert error["details"] == {"error_code": "thread_unsupported_request", "unsupported": ["thread"]}


def test_an_empty_system_is_no_system(claude: anthropic.Anthropic) -> None:
    """`system: ""` rendered an empty system message, dropping the template's default system prompt."""
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    plain = claude.messages.count_tokens(model="tiny", messages=messages).input_tokens
    for empty in ("", []):
        assert claude.messages.count_tokens(model="tiny", messages=messages, system=empty).input_tokens == plain
    assert claude.messages.count_tokens(model="tiny", messages=messages, system="Be brief.").input_tokens != plain


def test_an_output_format_holds_the_answer_to_a_schema(claude: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    message = ask(claude, max_tokens=40, output_config={"format": {"type": "json_schema", "schema": schema}})
    assert isinstance(json.loads(message.content[0].text)["n"], int)


def test_count_tokens_is_what_a_message_reads(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": QUESTION}])
    message = ask(claude)
    assert counted.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    with_tools = claude.messages.count_tokens(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER]
    )
    assert with_tools.input_tokens >= counted.input_tokens


def _calling(tool_use: dict[str, Any], tool_use_id: Any = "t1") -> list[dict[str, Any]]:
    """A conversation whose assistant turn calls a tool (`tool_use`'s fields) and whose last turn answers it."""
    result = {"type": "tool_result", "tool_use_id": tool_use_id, "content": "Sunny"}
    return [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", **tool_use}]},
        {"role": "user", "content": [{"type": "text", "text": "Here:"}, result]},
    ]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"max_tokens": None}, "max_tokens (required)"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role: user or assistant"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "a 'image' block is not supported",
        ),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type must be"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "only custom tools"),
        ({"temperature": -1.0}, "temperature"),
        ({"output_config": {"format": {"type": "xml"}}}, "output_config.format must be"),
        (  # the chat route's compile error, named by the field this route was sent
            {"output_config": {"format": {"type": "json_schema", "schema": {"type": "bogus"}}}},
            "output_config.format: the structured output grammar is invalid",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "x"}]}]},
            "messages hold nothing to answer",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]}]},
            "messages hold nothing to answer",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "content[0].text must be"),
        # Named by Anthropic's paths: the chat route named its own (messages[5].tool_calls[0], shifted indices)
        ({"messages": _calling({"id": "t1", "input": {}})}, "messages[1].content[0].name must be a non-empty string"),
        ({"messages": _calling({"id": "t1", "name": "f", "input": "x"})}, "messages[1].content[0].input must be"),
        ({"messages": _calling({"name": "f", "input": {}})}, "messages[1].content[0].id must be a non-empty string"),
        ({"messages": _calling({"id": "t1", "name": "f"}, 5)}, "messages[2].content[1].tool_use_id must be"),
        ({"tools": [{"name": "", "input_schema": {}}]}, "tools[0].name must be a non-empty string"),
        ({"tools": [{"name": "f", "input_schema": "x"}]}, "tools[0].input_schema must be"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name must be a non-empty string"),
        ({"thinking": "yes"}, "thinking must be {type: enabled, adaptive or disabled}"),
        ({"temperature": 1.5}, "temperature must be from 0 to 1"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 12}]}]}, "content[0].text must be"),
        ({"system": [{"type": "text", "text": {"a": 1}}]}, "system[0].text must be a string"),
        ({"tool_choice": {"type": "auto", "disable_parallel_tool_use": "x"}}, "disable_parallel_tool_use must be"),
        # Named as sent: the chat route's errors named what they become (tool_choice 'required', function.parameters)
        ({"tool_choice": {"type": "any"}}, "tool_choice {type: any} needs tools"),
        ({"tool_choice": {"type": "tool", "name": "f"}, "tools": []}, "tool_choice {type: tool} needs tools"),
        (
            {"tools": [{"name": "a", "input_schema": {"type": "string"}}]},
            "tools[0].input_schema must be a JSON schema of an object",
        ),
        ({"tools": [{"name": "a b", "input_schema": {}}]}, "tools[0].name must be 1-64 letters"),
        ({"tools": [{"name": "a", "description": 5, "input_schema": {}}]}, "tools[0].description must be a string"),
    ],
    ids=str,
)
def test_bad_requests_get_anthropics_error_body(server: ServerHandle, extra: dict[str, Any], needle: str) -> None:
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **extra}
    body = {key: value for key, value in body.items() if value is not None}
    for route, stream in (("/v1/messages", False), ("/v1/messages", True), ("/v1/messages/count_tokens", False)):
        answer = httpx.post(f"{server.base_url}{route}", json={**body, "stream": stream}, timeout=60)
        if route.endswith("count_tokens") and not (
            "messages" in needle or "text must be" in needle or "tool" in needle
        ):
            continue  # count_tokens reads the messages, system and tools, not the sampling and output fields
        assert answer.status_code == 400, (route, answer.text)
        error = answer.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert needle in error["error"]["message"], error


def test_the_sdk_reads_the_error(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="a 'image' block is not supported"):
        claude.messages.create(
            model="tiny",
            max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}],
        )


def test_an_answer_cut_by_the_context_says_so_not_max_tokens(tiny_llama: Path) -> None:
    """A context that filled before max_tokens was `max_tokens`, which tells a client to ask for more tokens (and
    fail again); Anthropic's SDK has `model_context_window_exceeded` for it."""
    with running_server(tiny_settings(tiny_llama, max_model_len=80)) as server:
        with anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0) as client:
            fields: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}]}
            cut = client.messages.create(max_tokens=200, extra_body={"ignore_eos": True}, **fields)
            assert cut.stop_reason == "model_context_window_exceeded" and 0 < cut.usage.output_tokens < 200
            with client.messages.stream(max_tokens=200, extra_body={"ignore_eos": True}, **fields) as stream:
                assert stream.get_final_message().stop_reason == "model_context_window_exceeded"
            short = client.messages.create(max_tokens=3, extra_body={"ignore_eos": True}, **fields)
            assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_the_api_key_may_come_as_x_api_key(tiny_llama: Path) -> None:
    with running_server(tiny_settings(tiny_llama, api_keys=("sekrit",))) as server:
        with anthropic.Anthropic(base_url=server.base_url, api_key="sekrit", max_retries=0) as good:
            # (the answer itself may be empty: two sampled tokens of a random model can be an end of turn)
            assert good.messages.create(model="x", max_tokens=2, messages=[{"role": "user", "content": "hi"}]).id
        with (
            anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0) as bad,
            pytest.raises(anthropic.AuthenticationError) as refused,
        ):
            bad.messages.create(model="x", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_a_client_that_leaves_a_stream_stops_its_generation(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.state.engine
    assert engine is not None
    slow_steps(monkeypatch, server, 0.01)  # 1500 tokens take 15 s: a run the client's leaving did not stop still runs
    body = {"model": "tiny", "max_tokens": 1500, "stream": True, "messages": [{"role": "user", "content": "Talk"}]}
    before = engine.stats.tokens_generated
    with httpx.stream(
        "POST", f"{server.base_url}/v1/messages", json={**body, "ignore_eos": True}, timeout=60
    ) as answer:
        assert answer.status_code == 200
        lines = answer.iter_lines()
        assert next(lines).startswith("event: message_start")
    deadline = time.monotonic() + 10
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.in_flight == 0 and engine.stats.tokens_generated - before < 1500


def test_a_client_that_leaves_a_blocking_request_stops_its_generation(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.state.engine
    assert engine is not None
    slow_steps(monkeypatch, server, 0.01)  # 1500 tokens take 15 s: a fast machine answered them within the 0.3 s
    body = {"model": "tiny", "max_tokens": 1500, "messages": [{"role": "user", "content": "Talk"}], "ignore_eos": True}
    before = engine.stats.tokens_generated
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.base_url}/v1/messages", json=body, timeout=0.3)
    deadline = time.monotonic() + 10
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.in_flight == 0 and engine.stats.tokens_generated - before < 1500


def test_a_chat_route_failing_mid_stream_is_an_error_event(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = ToolStream.feed, []

    def failing(self: ToolStream, text: str) -> str:
        calls.append(text)
        if len(calls) == 5:
            raise RuntimeError("a bug in the middle of an answer")
        return real(self, text)

    monkeypatch.setattr(ToolStream, "feed", failing)
    body = {"model": "tiny", "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "Talk"}]}
    with httpx.stream("POST", f"{server.base_url}/v1/messages", json=body, timeout=60) as answer:
        kinds = [line[7:] for line in answer.iter_lines() if line.startswith("event: ")]
    assert kinds[0] == "message_start" and kinds[-1] == "error" and "message_stop" not in kinds, kinds


def test_an_assistant_prefill_is_continued(claude: anthropic.Anthropic, server: ServerHandle) -> None:
    turns: list[Any] = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The answer is ("}]
    counted = claude.messages.count_tokens(model="tiny", messages=turns)
    body = {"messages": turns, "add_generation_prompt": False, "continue_final_message": True}
    continued = httpx.post(f"{server.base_url}/tokenize", json=body, timeout=60).json()
    assert counted.input_tokens == continued["count"]
    message = ask(claude, messages=turns)
    cached = message.usage.cache_read_input_tokens or 0
    assert message.usage.input_tokens + cached == continued["count"]


def test_a_streamed_thinking_block_is_the_blocking_one(tiny_llama_reasoning: Path) -> None:
    with (
        running_server(tiny_settings(tiny_llama_reasoning)) as server,
        anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0) as client,
    ):
        fields: dict[str, Any] = {"model": "x", "max_tokens": 12, "messages": [{"role": "user", "content": "Hi"}]}
        blocking = client.messages.create(**fields, extra_body={"temperature": 0})
        with client.messages.stream(**fields, extra_body={"temperature": 0}) as stream:
            streamed = stream.get_final_message()
        assert [block.to_dict() for block in streamed.content] == [block.to_dict() for block in blocking.content]
        assert blocking.content[0].type == "thinking" and blocking.content[0].signature == ""
        plain = client.messages.create(**fields, thinking={"type": "disabled"}, extra_body={"temperature": 0})
        assert all(block.type != "thinking" for block in plain.content)  # the template's switch, honoured
        counted = client.messages.count_tokens(model="x", messages=fields["messages"], thinking={"type": "disabled"})
        assert counted.input_tokens == plain.usage.input_tokens + (plain.usage.cache_read_input_tokens or 0)
