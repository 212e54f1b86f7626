"""OpenAI's Conversations API and `conversation` on the Responses API, through the official `openai` client against a
real uvicorn server on the tiny Llama: conversations and their items made, read, paged, updated and deleted; a
response in a conversation answering as the chat of its items and its input, then adding both to it (blocking,
streamed and in the background; a cancelled one adds nothing); and POST /v1/responses/input_tokens counting what a
created response reports as its input tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fixtures.server import ServerHandle, running_server, slow_steps, steps_held, tiny_settings

SERVED_MODEL = "tiny_llama_long_context"  # the server and client fixtures: tests/integration/conftest.py
SERVED_OPTIONS = {"model_name": "tiny-llama"}
QUESTION = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]},
}


def user(text: str, **extra: Any) -> Any:
    """A user message item (Any: the client's item parameter is a union of thirty types)."""
    return {"type": "message", "role": "user", "content": text, **extra}


def text_of(item: Any) -> str:
    """A message item's text (Any: the client's item is a union of every item type)."""
    return str(item.content[0].text)


def texts(client: OpenAI, conversation_id: str) -> list[tuple[str, str]]:
    """The conversation's items, oldest first, as (role, text)."""
    items: list[Any] = client.conversations.items.list(conversation_id, order="asc", limit=100).data
    return [(item.role, text_of(item)) for item in items]


def chat_answer(client: OpenAI, messages: list[dict[str, Any]], max_tokens: int) -> Any:
    return client.chat.completions.create(
        model="x",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
    )


def test_a_conversation_is_made_read_updated_and_deleted(client: OpenAI) -> None:
    made = client.conversations.create(items=[user("hello")], metadata={"topic": "cake"})
    assert made.id.startswith("conv_") and made.object == "conversation" and made.metadata == {"topic": "cake"}
    assert abs(made.created_at - time.time()) < 60
    assert client.conversations.retrieve(made.id) == made
    updated = client.conversations.update(made.id, metadata={"topic": "pie"})
    assert updated.metadata == {"topic": "pie"} and client.conversations.retrieve(made.id).metadata == {"topic": "pie"}
    deleted = client.conversations.delete(made.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (made.id, "conversation.deleted", True)
    with pytest.raises(openai.NotFoundError) as missing:
        client.conversations.retrieve(made.id)
    assert made.id in str(missing.value.body)
    assert client.conversations.create().metadata == {}  # no items, no metadata


def test_items_are_added_paged_read_and_deleted(client: OpenAI) -> None:
    made = client.conversations.create(items=[user(f"message {index}") for index in range(3)])
    assistant: Any = {"type": "message", "role": "assistant", "content": "message 4"}
    added = client.conversations.items.create(made.id, items=[user("message 3"), assistant])
    data: list[Any] = added.data
    assert added.object == "list" and [item.type for item in data] == ["message", "message"]
    assert all(item.id.startswith("msg_") for item in data)
    assert (added.first_id, added.last_id) == (data[0].id, data[1].id)
    assert data[1].content[0].type == "output_text"  # the assistant's

    newest: list[Any] = (page := client.conversations.items.list(made.id, limit=2)).data  # desc by default
    assert [text_of(item) for item in newest] == ["message 4", "message 3"] and page.has_more is True
    rest = client.conversations.items.list(made.id, limit=10, after=newest[-1].id)
    assert [text_of(item) for item in rest.data] == ["message 2", "message 1", "message 0"]
    assert rest.has_more is False
    everything = list(client.conversations.items.list(made.id, limit=1))
    assert len(everything) == 5  # the client's auto-paging follows `after` across pages of one

    second: str = data[0].id
    one = client.conversations.items.retrieve(second, conversation_id=made.id)
    assert one.type == "message" and text_of(one) == "message 3"
    after_delete = client.conversations.items.delete(second, conversation_id=made.id)
    assert after_delete.id == made.id and after_delete.object == "conversation"
    assert [text for _, text in texts(client, made.id)] == ["message 0", "message 1", "message 2", "message 4"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.conversations.items.retrieve(second, conversation_id=made.id)
    assert second in str(missing.value.body)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("POST", "", {"items": [user("x")] * 21}, 400, "at most 20"),
        ("POST", "", {"items": [{"role": "robot", "content": "hi"}]}, 400, "items[0].role"),
        ("POST", "", {"items": "hi"}, 400, "items must be a list"),
        ("POST", "", {"metadata": {"k": 1}}, 400, "metadata"),
        ("POST", "/{id}", {}, 400, "metadata is required"),
        ("POST", "/{id}/items", {"items": []}, 400, "items must be a non-empty list"),
        ("POST", "/{id}/items", {"items": [user("x", id="msg_held")]}, 400, "'msg_held'"),
        ("GET", "/{id}/items?limit=101", None, 400, "limit"),
        ("GET", "/{id}/items?order=up", None, 400, "'up'"),
        ("GET", "/{id}/items?after=msg_nope", None, 400, "'msg_nope'"),
        ("GET", "/conv_nope", None, 404, "'conv_nope'"),
        ("POST", "/conv_nope/items", {"items": [user("x")]}, 404, "'conv_nope'"),
        ("DELETE", "/conv_nope", None, 404, "'conv_nope'"),
        ("GET", "/{id}/items/msg_nope", None, 404, "'msg_nope'"),
        ("DELETE", "/{id}/items/msg_nope", None, 404, "'msg_nope'"),
    ],
)
def test_bad_requests_are_named(
    client: OpenAI, server: ServerHandle, method: str, path: str, body: Any, status: int, needle: str
) -> None:
    made = client.conversations.create(items=[user("held", id="msg_held")])
    url = f"{server.base_url}/v1/conversations{path.format(id=made.id)}"
    answer = httpx.request(method, url, json=body, timeout=60)
    assert answer.status_code == status, answer.text
    assert needle in answer.json()["error"]


def test_a_response_reads_its_conversation_and_adds_its_turn(client: OpenAI) -> None:
    made = client.conversations.create(items=[user(QUESTION)])
    first = client.responses.create(
        model="x", conversation=made.id, input="And then?", max_output_tokens=6, temperature=0
    )
    expected = chat_answer(client, [{"role": "user", "content": QUESTION}, {"role": "user", "content": "And then?"}], 6)
    assert first.output_text == expected.choices[0].message.content
    assert first.usage is not None and first.usage.input_tokens == expected.usage.prompt_tokens
    assert first.conversation is not None and first.conversation.id == made.id
    assert texts(client, made.id) == [("user", QUESTION), ("user", "And then?"), ("assistant", first.output_text)]
    listed = client.conversations.items.list(made.id, order="asc").data
    assert listed[-1].id == first.output[0].id  # the output item itself, as the response answered it

    second = client.responses.create(
        model="x", conversation={"id": made.id}, input="Why?", max_output_tokens=6, temperature=0
    )
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Why?"},
    ]
    assert second.output_text == chat_answer(client, history, 6).choices[0].message.content
    assert len(texts(client, made.id)) == 5


def test_a_conversation_may_hold_the_whole_question(client: OpenAI) -> None:
    """No `input`: the items added through the conversation's own routes are the question."""
    made = client.conversations.create(items=[user(QUESTION)])
    answer = client.responses.create(model="x", conversation=made.id, max_output_tokens=4, temperature=0)
    assert (
        answer.output_text == chat_answer(client, [{"role": "user", "content": QUESTION}], 4).choices[0].message.content
    )
    assert texts(client, made.id) == [("user", QUESTION), ("assistant", answer.output_text)]


def test_a_call_and_its_output_are_turns_of_the_conversation(client: OpenAI) -> None:
    """The model's call is added as a function_call item; the next turn sends its result, which reads it back."""
    made = client.conversations.create()
    tools: Any = [WEATHER]
    asked = client.responses.create(
        model="x",
        conversation=made.id,
        input=QUESTION,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=300,
        temperature=0,
    )
    calls = [item for item in asked.output if item.type == "function_call"]
    assert calls and asked.status == "completed"
    call = calls[0]
    items: list[Any] = client.conversations.items.list(made.id, order="asc").data
    assert [item.type for item in items] == ["message"] + ["function_call"] * len(calls)
    assert (items[1].id, items[1].call_id, items[1].name) == (call.id, call.call_id, "get_weather")
    result: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    counted = client.responses.input_tokens.count(model="x", conversation=made.id, input=result, tools=tools)
    chained = client.responses.input_tokens.count(model="x", previous_response_id=asked.id, input=result, tools=tools)
    assert counted.input_tokens == chained.input_tokens  # the same turns as the stored response's chain holds
    answered = client.responses.create(
        model="x", conversation=made.id, input=result, tools=tools, max_output_tokens=2, temperature=0
    )
    assert answered.usage is not None and counted.input_tokens == answered.usage.input_tokens
    items = client.conversations.items.list(made.id, order="asc").data
    added = items[1 + len(calls)]
    assert (added.type, added.call_id, added.output) == ("function_call_output", call.call_id, "sunny")


def test_a_streamed_response_adds_its_turn_once_it_has_ended(client: OpenAI) -> None:
    made = client.conversations.create()
    with client.responses.stream(
        model="x", conversation=made.id, input=QUESTION, max_output_tokens=5, temperature=0
    ) as stream:
        events = list(stream)
    final = events[-1].response  # type: ignore[union-attr]
    assert final.conversation is not None and final.conversation.id == made.id
    assert texts(client, made.id) == [("user", QUESTION), ("assistant", final.output_text)]


def test_a_background_response_adds_its_turn_and_a_cancelled_one_nothing(
    client: OpenAI, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = client.conversations.create()
    job = client.responses.create(
        model="x", conversation=made.id, input=QUESTION, max_output_tokens=5, temperature=0, background=True
    )
    deadline = time.monotonic() + 60
    while (job := client.responses.retrieve(job.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert texts(client, made.id) == [("user", QUESTION), ("assistant", job.output_text)]

    slow_steps(monkeypatch, server, 0.01)  # 1500 tokens take 15 s: still running when the cancel comes
    long = client.responses.create(  # no end sampled early either: it must still run when the cancel comes
        model="x",
        conversation=made.id,
        input="Go on.",
        max_output_tokens=1500,
        background=True,
        extra_body={"ignore_eos": True},
    )
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert len(texts(client, made.id)) == 2  # neither its input nor its partial output


def refused_as_locked(client: OpenAI, conversation_id: str) -> dict[str, Any]:
    """The error body of a response asked for in a conversation that one is being answered in."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="x", conversation=conversation_id, input="And?", max_output_tokens=1)
    body: dict[str, Any] = refused.value.response.json()
    assert body["code"] == "conversation_locked" and conversation_id in body["error"]
    return body


def answered_once_free(client: OpenAI, conversation_id: str, text: str) -> Any:
    """A response in the conversation, once the server has seen the one holding it end (a client that left is
    noticed when the server next writes to it)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.responses.create(model="x", conversation=conversation_id, input=text, max_output_tokens=2)
        except openai.BadRequestError as refused:
            assert refused.response.json()["code"] == "conversation_locked" and time.monotonic() < deadline
            time.sleep(0.05)


def test_a_conversation_answers_one_response_at_a_time(
    client: OpenAI, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second response in a conversation while one is answered there is OpenAI's 400 `conversation_locked`: each
    would read the items without the other's turn. Whatever way a response ends, it lets the conversation go."""
    made = client.conversations.create()
    body = {"model": "x", "conversation": made.id, "input": QUESTION, "max_output_tokens": 1500, "stream": True}
    with (
        steps_held(monkeypatch, server),
        httpx.stream("POST", f"{server.openai_url}/responses", json=body, timeout=60) as running,
    ):
        lines = running.iter_lines()  # kept: a dropped iterator closes the response, and the server sees it go
        assert "response.created" in next(lines)  # it is being answered
        refused_as_locked(client, made.id)
    # The client left mid-answer: its turn is not added, and the conversation is free again.
    first = answered_once_free(client, made.id, "Hi")
    assert texts(client, made.id) == [("user", "Hi"), ("assistant", first.output_text)]

    # A request refused after its conversation was read (max_output_tokens is checked later) holds nothing.
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="x", conversation=made.id, input="x", max_output_tokens=0)
    assert "max_output_tokens" in refused.value.response.json()["error"]
    # A streamed answer lets it go before its last event: the next turn, sent on reading it, is answered.
    events = list(
        client.responses.create(model="x", conversation=made.id, input="More", max_output_tokens=2, stream=True)
    )
    streamed = events[-1].response  # type: ignore[union-attr]
    after = client.responses.create(model="x", conversation=made.id, input="Bye", max_output_tokens=2)
    assert [text for role, text in texts(client, made.id) if role == "user"] == ["Hi", "More", "Bye"]
    assert texts(client, made.id)[-3:] == [
        ("assistant", streamed.output_text),
        ("user", "Bye"),
        ("assistant", after.output_text),
    ]

    # A background run holds it until it ends; cancelled, it adds nothing and lets it go.
    with steps_held(monkeypatch, server):
        long = client.responses.create(
            model="x", conversation=made.id, input="Go on.", max_output_tokens=1500, background=True
        )
        refused_as_locked(client, made.id)
        assert client.responses.cancel(long.id).status == "cancelled"
    client.responses.create(model="x", conversation=made.id, input="Again", max_output_tokens=1)
    assert [text for role, text in texts(client, made.id) if role == "user"] == ["Hi", "More", "Bye", "Again"]
    # Another conversation was never held.
    other = client.conversations.create()
    client.responses.create(model="x", conversation=other.id, input="Hi", max_output_tokens=1)


def test_conversation_refusals_are_named(client: OpenAI, server: ServerHandle) -> None:
    made = client.conversations.create(items=[user("held", id="msg_held")])
    earlier = client.responses.create(model="x", input="hi", max_output_tokens=1)
    with pytest.raises(openai.BadRequestError) as both:
        client.responses.create(model="x", conversation=made.id, previous_response_id=earlier.id, input="hi")
    assert "previous_response_id" in str(both.value.body)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="x", conversation="conv_nope", input="hi")
    assert "'conv_nope'" in str(unknown.value.body)
    for bad, needle in ((5, "conversation must be"), ({"id": ""}, "conversation must be")):
        answer = httpx.post(f"{server.base_url}/v1/responses", json={"input": "hi", "conversation": bad}, timeout=60)
        assert answer.status_code == 400 and needle in answer.json()["error"], answer.text
    with pytest.raises(openai.BadRequestError) as held:  # its items would be added under an id the conversation holds
        client.responses.create(model="x", conversation=made.id, input=[user("again", id="msg_held")])
    assert "'msg_held'" in str(held.value.body)
    assert len(texts(client, made.id)) == 1  # no refused request added anything


@pytest.mark.parametrize(
    "request_fields",
    [
        {"input": QUESTION},
        {"input": QUESTION, "instructions": "Be brief."},
        {"input": [user("a"), {"type": "message", "role": "assistant", "content": "b"}, user("c")]},
        {"input": QUESTION, "tools": [WEATHER]},
        {"input": QUESTION, "tools": [WEATHER], "tool_choice": "none"},
    ],
)
def test_the_input_token_count_is_the_created_responses(client: OpenAI, request_fields: dict[str, Any]) -> None:
    counted = client.responses.input_tokens.count(model="x", **request_fields)
    assert counted.object == "response.input_tokens"
    created = client.responses.create(model="x", max_output_tokens=1, store=False, **request_fields)
    assert created.usage is not None and counted.input_tokens == created.usage.input_tokens > 0


def test_the_count_reads_the_earlier_turns_as_create_does(client: OpenAI, server: ServerHandle) -> None:
    made = client.conversations.create(items=[user(QUESTION)])
    alone = client.responses.input_tokens.count(model="x", input="And then?").input_tokens
    counted = client.responses.input_tokens.count(model="x", conversation=made.id, input="And then?").input_tokens
    created = client.responses.create(model="x", conversation=made.id, input="And then?", max_output_tokens=3)
    assert created.usage is not None and counted == created.usage.input_tokens > alone
    chained = client.responses.input_tokens.count(model="x", previous_response_id=created.id, input="Why?")
    follow = client.responses.create(model="x", previous_response_id=created.id, input="Why?", max_output_tokens=1)
    assert follow.usage is not None and chained.input_tokens == follow.usage.input_tokens
    assert len(texts(client, made.id)) == 3  # counting added nothing
    for body, status, needle in (
        ({"conversation": "conv_nope", "input": "hi"}, 404, "'conv_nope'"),
        ({"previous_response_id": "resp_nope", "input": "hi"}, 400, "'resp_nope'"),
        ({"input": [{"role": "robot", "content": "hi"}]}, 400, "'robot'"),
        ({"input": "hi", "text": {"format": {"type": "grammar"}}}, 400, "text.format"),
        ({}, 400, "input must be"),
    ):
        answer = httpx.post(f"{server.base_url}/v1/responses/input_tokens", json=body, timeout=60)
        assert answer.status_code == status and needle in answer.json()["error"], answer.text


@pytest.fixture(scope="module")
def reasoning_client(tiny_llama_reasoning: Path) -> Iterator[OpenAI]:
    with (
        running_server(tiny_settings(tiny_llama_reasoning)) as handle,
        OpenAI(base_url=handle.openai_url, api_key="unused", max_retries=0, timeout=60) as openai_client,
    ):
        yield openai_client


def test_a_turn_that_was_only_thinking_is_still_a_turn(reasoning_client: OpenAI) -> None:
    """The random reasoning model never closes its thinking: its answer is one reasoning item, which the next turn
    leaves out of the prompt, keeping an empty assistant turn in its place, as a stored response's chain does."""
    made = reasoning_client.conversations.create()
    thought = reasoning_client.responses.create(
        model="x", conversation=made.id, input=QUESTION, max_output_tokens=8, temperature=0
    )
    items: list[Any] = reasoning_client.conversations.items.list(made.id, order="asc").data
    assert [item.type for item in items] == ["message", "reasoning"] and items[1].id == thought.output[0].id
    counted = reasoning_client.responses.input_tokens.count(model="x", conversation=made.id, input="And then?")
    chained = reasoning_client.responses.input_tokens.count(
        model="x", previous_response_id=thought.id, input="And then?"
    )
    assert counted.input_tokens == chained.input_tokens
