"""OpenAI's Responses API through the official `openai` client against a real uvicorn server on the tiny Llama: the
same answers as the chat completion of the same conversation, its event stream as the client's own stream helper
accumulates it, stored conversations (`previous_response_id`), function tools and `text.format`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fixtures.server import ServerHandle, running_server, slow_steps, tiny_settings

QUESTION = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    # a bounded string: the random tiny model would otherwise write a city until max_output_tokens
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def server(tiny_llama_long_context: Path) -> Iterator[ServerHandle]:
    # 2048 tokens of context: room for the tool instructions' prompt and a call
    with running_server(tiny_settings(tiny_llama_long_context, model_name="tiny-llama")) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60) as openai_client:
        yield openai_client


def chat(client: OpenAI, messages: list[dict[str, Any]], max_tokens: int, **extra: Any) -> Any:
    return client.chat.completions.create(
        model="x",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,  # type: ignore[arg-type]
        **extra,
    )


def test_a_response_answers_as_the_chat_completion_of_its_conversation(client: OpenAI) -> None:
    response = client.responses.create(
        model="x", instructions="Be brief.", input=QUESTION, max_output_tokens=8, temperature=0
    )
    expected = chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}], 8)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == "tiny-llama"
    assert response.output_text == expected.choices[0].message.content
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (expected.usage.prompt_tokens, 8)
    assert response.usage.total_tokens == response.usage.input_tokens + 8
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert response.instructions == "Be brief." and response.max_output_tokens == 8


def test_the_stream_is_what_the_client_accumulates(client: OpenAI, server: ServerHandle) -> None:
    blocking = client.responses.create(model="x", input=QUESTION, max_output_tokens=10, temperature=0, store=False)
    with client.responses.stream(model="x", input=QUESTION, max_output_tokens=10, temperature=0) as stream:
        events = list(stream)
    final = events[-1].response  # type: ignore[union-attr]  # response.incomplete: get_final_response wants completed
    assert final.output_text == blocking.output_text
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == blocking.output_text
    body = {"input": QUESTION, "max_output_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=60) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert lines[0] == "event: response.created" and json.loads(lines[1][6:])["type"] == "response.created"
    assert "data: [DONE]" not in lines


def test_a_stored_conversation_goes_on_from_its_last_response(client: OpenAI, server: ServerHandle) -> None:
    first = client.responses.create(model="x", instructions="Be brief.", input=QUESTION, max_output_tokens=6)
    second = client.responses.create(
        model="x", previous_response_id=first.id, input="And of Spain?", max_output_tokens=4, temperature=0
    )
    history = [
        {"role": "user", "content": QUESTION},  # the first request's instructions are not carried over
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And of Spain?"},
    ]
    expected = chat(client, history, 4)
    assert second.output_text == expected.choices[0].message.content
    assert second.usage is not None and second.usage.input_tokens == expected.usage.prompt_tokens
    assert second.previous_response_id == first.id
    fetched = client.responses.retrieve(second.id)
    assert fetched.output_text == second.output_text and fetched.usage == second.usage
    items = client.responses.input_items.list(second.id, order="asc")
    assert [item.type for item in items.data] == ["message"]
    assert items.data[0].content[0].text == "And of Spain?"  # type: ignore[union-attr]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    assert client.responses.retrieve(second.id).id == second.id  # it keeps its whole conversation
    third = client.responses.create(model="x", previous_response_id=second.id, input="Thanks", max_output_tokens=2)
    assert third.usage is not None and third.usage.input_tokens > second.usage.input_tokens


def test_store_false_keeps_nothing(client: OpenAI, server: ServerHandle) -> None:
    response = client.responses.create(model="x", input=QUESTION, max_output_tokens=2, store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    reply = httpx.post(
        f"{server.base_url}/v1/responses", json={"input": "hi", "previous_response_id": response.id}, timeout=60
    )
    assert reply.status_code == 400 and response.id in reply.json()["error"]
    assert reply.json()["code"] == "previous_response_not_found"  # OpenAI's: what a client resends the chain on


def test_a_required_tool_is_called_and_its_output_answered(client: OpenAI) -> None:
    response = client.responses.create(
        model="x",
        input="Weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=300,
        temperature=0,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and response.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    assert call.call_id.startswith("call_") and call.id is not None and call.id.startswith("fc_")
    follow_up = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "22 C and sunny"},
    ]
    answer = client.responses.create(
        model="x",
        input=follow_up,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=5,
        temperature=0,
    )
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    expected = chat(
        client,
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "22 C and sunny"},
        ],
        5,
        tools=[chat_tool],
    )
    assert answer.usage is not None and answer.usage.input_tokens == expected.usage.prompt_tokens
    assert answer.output_text == (expected.choices[0].message.content or "")


def test_a_streamed_call_comes_as_its_argument_events(client: OpenAI) -> None:
    with client.responses.stream(
        model="x",
        input="Weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=300,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    [call] = [item for item in final.output if item.type == "function_call"]
    done = next(event for event in events if event.type == "response.function_call_arguments.done")
    assert done.arguments == call.arguments and "city" in json.loads(call.arguments)
    pieces = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and "".join(pieces) == call.arguments  # streamed as written, not whole at the end
    added = next(event for event in events if event.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.arguments == ""  # type: ignore[union-attr]


def test_text_format_json_schema_holds_the_output(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model="x",
        input="Weather?",
        text={"format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}},
        max_output_tokens=300,  # the random tiny model spends up to 16 whitespace tokens a gap
        temperature=0,
    )
    value = json.loads(response.output_text)
    assert set(value) == {"city", "sunny"} and isinstance(value["sunny"], bool)
    assert response.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_logprobs_come_with_the_output_text(client: OpenAI) -> None:
    response = client.responses.create(
        model="x",
        input=QUESTION,
        max_output_tokens=5,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        extra_body={"ignore_eos": True},  # sampled: the random model's end token came first in one run of ~100
    )
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs is not None and len(part.logprobs) == 5
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in part.logprobs)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "input must be"),
        ({"input": []}, "input must be"),
        ({"input": [{"type": "image_generation_call"}]}, "'image_generation_call'"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "'input_image'"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "'robot'"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "call_id"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "'web_search'"),
        ({"input": "hi", "include": "message.output_text.logprobs"}, "include"),
        (
            {"input": [{"role": "user", "content": "a", "id": "m1"}, {"role": "user", "content": "b", "id": "m1"}]},
            "'m1'",
        ),
        ({"input": [{"role": "user", "content": "a", "id": 5}]}, "input[0].id"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"input": "hi", "truncation": "auto"}, "truncation"),
        ({"input": "hi", "background": True, "store": False}, "store: true"),
        ({"input": "hi", "background": "yes"}, "background"),
        ({"input": "hi", "previous_response_id": "resp_nope"}, "resp_nope"),
        ({"input": "hi", "previous_response_id": 5}, "previous_response_id must be a string, got 5"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text must be"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 7}]}]}, "content[0].text must be"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "max_output_tokens": "8"}, "max_output_tokens"),
        ({"input": "hi", "text": {"format": {"type": "grammar"}}}, "text.format"),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "name": "o", "schema": {"type": "bogus"}}}},
            "text.format: the structured output grammar is invalid",
        ),
        ({"input": "hi", "tool_choice": "required"}, "needs tools"),
        ({"input": "hi", "metadata": {"a": 1}}, "metadata"),
        ({"input": "hi", "metadata": {"k" * 65: "v"}}, "at most 64"),  # OpenAI's limits, as chat and batches keep
        ({"input": "hi", "metadata": {"k": "v" * 513}}, "at most 512"),
    ],
)
def test_bad_requests_are_named(server: ServerHandle, body: dict[str, Any], needle: str) -> None:
    response = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]


def test_input_items_pages(client: OpenAI, server: ServerHandle) -> None:
    messages = [{"role": "user", "content": f"message {index}"} for index in range(5)]
    response = client.responses.create(model="x", input=messages, max_output_tokens=1)  # type: ignore[arg-type]
    url = f"{server.base_url}/v1/responses/{response.id}/input_items"
    newest = httpx.get(url, params={"limit": 2}).json()
    assert [item["content"][0]["text"] for item in newest["data"]] == ["message 4", "message 3"]
    assert newest["has_more"] is True
    rest = httpx.get(url, params={"limit": 10, "after": newest["last_id"]}).json()
    assert [item["content"][0]["text"] for item in rest["data"]] == ["message 2", "message 1", "message 0"]
    assert rest["has_more"] is False
    assert httpx.get(url, params={"limit": 0}).status_code == 400
    assert httpx.delete(f"{server.base_url}/v1/responses/resp_nope").status_code == 404


def test_defaults_and_includes_other_servers_send_are_accepted(client: OpenAI, server: ServerHandle) -> None:
    """tool_choice auto with no tools (OpenAI's default) and include values this server has nothing for (Codex sends
    reasoning.encrypted_content) are no reason to refuse."""
    body = {"input": "hi", "max_output_tokens": 2, "tool_choice": "auto", "include": ["reasoning.encrypted_content"]}
    answer = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["tool_choice"] == "auto"


def test_a_streamed_message_opens_empty_and_its_part_comes_once(server: ServerHandle) -> None:
    body = {"input": QUESTION, "max_output_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=60) as raw:
        events = [json.loads(line[6:]) for line in raw.iter_lines() if line.startswith("data: ")]
    added = next(event for event in events if event["type"] == "response.output_item.added")
    assert added["item"]["content"] == []  # the client appends content_part.added's part to it
    assert sum(event["type"] == "response.content_part.added" for event in events) == 1
    done = next(event for event in events if event["type"] == "response.output_item.done")
    assert len(done["item"]["content"]) == 1


def test_a_stored_stream_the_client_leaves_ends_cancelled_with_what_it_had(
    client: OpenAI, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It read in_progress while streaming, then not found once the client left: the id it was given led nowhere."""
    import time

    slow_steps(monkeypatch, server, 0.01)  # 400 tokens take 4 s: a fast machine wrote them all before the client left
    body = {"input": QUESTION, "max_output_tokens": 400, "stream": True, "ignore_eos": True}
    deltas = 0
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=60) as raw:
        for line in raw.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.created":
                response_id = event["response"]["id"]
            deltas += event["type"] == "response.output_text.delta"
            if deltas == 3:
                break
    deadline = time.monotonic() + 10
    while (left := client.responses.retrieve(response_id)).status == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left.status == "cancelled" and left.output_text and left.output[0].status == "incomplete"
    follow = client.responses.create(model="x", previous_response_id=response_id, input="Again?", max_output_tokens=2)
    assert follow.previous_response_id == response_id and follow.output_text  # it goes on from it


@pytest.mark.parametrize(
    "extra",
    [
        {"max_output_tokens": 4},
        {"tools": [WEATHER], "tool_choice": "required", "max_output_tokens": 300},
        {"include": ["message.output_text.logprobs"], "top_logprobs": 2, "max_output_tokens": 3},
    ],
)
def test_every_event_and_response_holds_to_the_sdks_types(server: ServerHandle, extra: dict[str, Any]) -> None:
    """Validated as the SDK's models (it only constructs them, so a missing field went unnoticed there): the usage
    lacked input_tokens_details.cache_write_tokens, which the schema requires."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    body = {"input": QUESTION, "temperature": 0, **extra}
    Response.model_validate(httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=60).json())
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json={**body, "stream": True}, timeout=60) as raw:
        events = [json.loads(line[6:]) for line in raw.iter_lines() if line.startswith("data: ")]
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)
    assert events[-1]["type"] in ("response.completed", "response.incomplete")


def test_ignore_eos_holds_on_a_response(client: OpenAI) -> None:
    """vLLM's ignore_eos, which /v1/chat/completions honours, was dropped here: a sampled answer of the random tiny
    model ended at its end token anyway (tests that stop a long answer midway relied on it)."""

    def answer(**extra: Any) -> Any:
        body = {"seed": 7, **extra}
        return client.responses.create(
            model="x", input=QUESTION, max_output_tokens=300, temperature=1.0, extra_body=body
        )

    free = answer()
    assert free.status == "completed" and free.usage is not None and free.usage.output_tokens < 300  # its end (124)
    held = answer(ignore_eos=True)
    assert held.status == "incomplete" and held.usage is not None and held.usage.output_tokens == 300


def test_a_stored_stream_that_fails_ends_failed_with_what_it_had(
    tiny_llama_long_context: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine stopping mid-answer (a model switch): response.failed came with no output (the text already sent
    was gone from it) and nothing was stored, so the id the stream gave was not found; a background run keeps both."""
    with running_server(tiny_settings(tiny_llama_long_context)) as handle:
        slow_steps(monkeypatch, handle, 0.01)  # 1500 tokens take 15 s: still under way when the engine stops
        body = {"input": QUESTION, "max_output_tokens": 1500, "stream": True, "ignore_eos": True}
        events: list[dict[str, Any]] = []
        with httpx.stream("POST", f"{handle.base_url}/v1/responses", json=body, timeout=60) as raw:
            for line in raw.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if sum(event["type"] == "response.output_text.delta" for event in events) == 3:
                        assert handle.state.engine is not None
                        handle.state.engine.request_stop()
        failed = events[-1]["response"]
        stored = httpx.get(f"{handle.base_url}/v1/responses/{failed['id']}")
    assert events[-1]["type"] == "response.failed" and failed["error"]["code"] == "server_error"
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    [item] = failed["output"]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == text != ""
    assert stored.status_code == 200 and stored.json()["status"] == "failed"
    assert stored.json()["output"] == failed["output"]


def test_the_stored_copy_leaves_logprobs_out(client: OpenAI) -> None:
    response = client.responses.create(  # greedy: a sampled token of the random model may end the answer early
        model="x",
        input=QUESTION,
        max_output_tokens=3,
        include=["message.output_text.logprobs"],
        top_logprobs=5,
        temperature=0,
    )
    assert len(response.output[0].content[0].logprobs or []) == 3  # type: ignore[union-attr]
    stored = client.responses.retrieve(response.id)
    assert stored.output_text == response.output_text
    assert stored.output[0].content[0].logprobs == []  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def reasoning_client(tiny_llama_reasoning: Path) -> Iterator[OpenAI]:
    with (
        running_server(tiny_settings(tiny_llama_reasoning)) as handle,
        OpenAI(base_url=handle.openai_url, api_key="unused", max_retries=0, timeout=60) as openai_client,
    ):
        yield openai_client


def test_a_reasoning_models_thinking_is_a_reasoning_item(reasoning_client: OpenAI) -> None:
    """The template opens a thinking block and the random model never closes it: all of its answer is a reasoning
    item, blocking and streamed alike; with enable_thinking off there is none."""
    response = reasoning_client.responses.create(model="x", input=QUESTION, max_output_tokens=8, temperature=0)
    [item] = response.output
    assert item.type == "reasoning" and item.content and item.content[0].text
    with reasoning_client.responses.stream(model="x", input=QUESTION, max_output_tokens=8, temperature=0) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[2] == "response.output_item.added" and "response.reasoning_text.delta" in kinds
    done = next(event for event in events if event.type == "response.reasoning_text.done")
    pieces = "".join(event.delta for event in events if event.type == "response.reasoning_text.delta")
    assert done.text == pieces == item.content[0].text  # the deltas are the text the blocking answer has
    final = events[-1].response  # type: ignore[union-attr]
    assert [output.type for output in final.output] == ["reasoning"]
    plain = reasoning_client.responses.create(
        model="x",
        input=QUESTION,
        max_output_tokens=8,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert [output.type for output in plain.output] == ["message"]
