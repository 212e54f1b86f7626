"""OpenAI's stored chat completions through the official client against a real uvicorn server on the tiny Llama:
`store: true` keeps a completion (streamed or not) with its messages and metadata; list, retrieve, update, delete."""

from __future__ import annotations

import re
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fixtures.server import ServerHandle

SERVED_MODEL = "tiny_llama"  # the server and client fixtures: tests/integration/conftest.py
SERVED_OPTIONS = {"model_name": "tiny"}


def ask(client: OpenAI, question: str, **extra: Any) -> Any:
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=6, temperature=0, **extra
    )


def test_a_stored_completion_is_retrieved_as_it_was_answered(client: OpenAI, server: ServerHandle) -> None:
    answer = ask(client, "What is the capital of France?", store=True, metadata={"team": "geo"})
    stored = client.chat.completions.retrieve(answer.id)
    assert stored.choices[0].message.content == answer.choices[0].message.content
    assert stored.usage == answer.usage and stored.model == "tiny"
    assert stored.model_dump()["metadata"] == {"team": "geo"}
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=60).text
    assert re.search(r"^cake_stored_chat_completions [1-9]", metrics, re.MULTILINE), metrics[-2000:]
    messages = client.chat.completions.messages.list(answer.id)
    assert [(m.role, m.content) for m in messages] == [("user", "What is the capital of France?")]
    assert messages.data[0].id == f"{answer.id}-0"


def test_a_completion_is_not_stored_unless_asked(client: OpenAI) -> None:
    answer = ask(client, "Not kept")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(answer.id)


def test_a_streamed_completion_is_stored_whole(client: OpenAI) -> None:
    pieces, completion_id = [], None
    for chunk in ask(client, "Tell me a story", store=True, stream=True, stream_options={"include_usage": True}):
        completion_id = chunk.id
        pieces += [choice.delta.content or "" for choice in chunk.choices]
    assert completion_id is not None
    stored = client.chat.completions.retrieve(completion_id)
    assert stored.choices[0].message.content == "".join(pieces)
    assert stored.choices[0].finish_reason == "length" and stored.usage is not None
    assert stored.usage.completion_tokens == 6
    blocking = ask(client, "Tell me a story")
    assert stored.choices[0].message.content == blocking.choices[0].message.content
    quiet = list(ask(client, "Tell me a story", store=True, stream=True, stream_options={"include_usage": False}))
    assert all(chunk.usage is None for chunk in quiet)
    kept = client.chat.completions.retrieve(quiet[0].id)
    assert kept.usage is not None and kept.usage.completion_tokens == 6  # stored as a blocking answer has it


def test_stored_completions_are_listed_filtered_updated_and_deleted(client: OpenAI) -> None:
    ids = [ask(client, f"Question {i}", store=True, metadata={"run": "list", "i": str(i)}).id for i in range(3)]
    listed = [c.id for c in client.chat.completions.list(metadata={"run": "list"})]
    assert listed == ids  # oldest first by default, as OpenAI lists them
    assert [c.id for c in client.chat.completions.list(metadata={"run": "list"}, order="desc")] == ids[::-1]
    page = client.chat.completions.list(metadata={"run": "list"}, limit=1, after=ids[0])
    assert [c.id for c in page.data] == [ids[1]] and page.has_more
    assert [c.id for c in client.chat.completions.list(metadata={"run": "list", "i": "2"})] == [ids[2]]
    assert not list(client.chat.completions.list(model="another-model", metadata={"run": "list"}))
    updated = client.chat.completions.update(ids[0], metadata={"run": "list", "checked": "yes"})
    assert updated.model_dump()["metadata"] == {"run": "list", "checked": "yes"}
    assert client.chat.completions.retrieve(ids[0]).model_dump()["metadata"]["checked"] == "yes"
    deleted = client.chat.completions.delete(ids[1])
    assert (deleted.id, deleted.deleted, deleted.object) == (ids[1], True, "chat.completion.deleted")
    assert [c.id for c in client.chat.completions.list(metadata={"run": "list"})] == [ids[0], ids[2]]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.delete(ids[1])


def test_bad_store_requests_are_named(client: OpenAI, server: ServerHandle) -> None:
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, needle in (
        ({"store": "yes"}, "store"),
        ({"store": True, "metadata": {"k": 3}}, "metadata"),
        ({"store": True, "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ):
        answer = httpx.post(f"{server.openai_url}/chat/completions", json={**base, **extra}, timeout=60)
        assert answer.status_code == 400 and needle in answer.json()["error"], answer.text
    stored = ask(client, "hi", store=True)
    answer = httpx.post(f"{server.openai_url}/chat/completions/{stored.id}", json={}, timeout=60)
    assert answer.status_code == 400 and "metadata" in answer.json()["error"]
    answer = httpx.get(f"{server.openai_url}/chat/completions?limit=500", timeout=60)
    assert answer.status_code == 400 and "limit" in answer.json()["error"]
