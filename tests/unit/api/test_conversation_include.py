"""`include` on a conversation's item routes (GET …/items and …/items/{item_id}), through the official `openai`
client (which sends it as `include[]`) and as a plain repeated `include`: OpenAI's values are accepted, logprobs
asked for come back empty on every output_text part (the store keeps none), and a value OpenAI does not define is
a 400 naming it. They were ignored, whatever they said."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from starlette.testclient import TestClient

from cake_py.api.app import create_app
from cake_py.api.include import INCLUDABLE, LOGPROBS_INCLUDE
from cake_py.api.state import ServerState
from cake_py.config import ServeSettings


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, OpenAI]]:
    state = ServerState(engine=None, source=None, settings=ServeSettings(rate_limit=0, files_dir=tmp_path))
    with (
        TestClient(create_app(state)) as http,
        OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http, max_retries=0) as client,
    ):
        yield http, client


def _conversation(client: OpenAI) -> tuple[str, str]:
    """A conversation holding a user message and an assistant's; its id and the assistant message's id."""
    assistant: Any = {"type": "message", "role": "assistant", "content": "Paris."}
    made = client.conversations.create(items=[{"role": "user", "content": "Capital of France?"}, assistant])
    items = client.conversations.items.list(made.id, order="asc").data
    return made.id, items[1].id


def test_included_logprobs_come_back_empty_on_output_text(served: tuple[TestClient, OpenAI]) -> None:
    _, client = served
    conversation, answer = _conversation(client)
    plain = client.conversations.items.retrieve(answer, conversation_id=conversation).model_dump()
    assert "logprobs" not in plain["content"][0] or plain["content"][0]["logprobs"] is None
    one = client.conversations.items.retrieve(answer, conversation_id=conversation, include=[LOGPROBS_INCLUDE])
    assert one.model_dump()["content"][0] == {
        "type": "output_text",
        "text": "Paris.",
        "annotations": [],
        "logprobs": [],
    }
    listed = client.conversations.items.list(conversation, order="asc", include=[LOGPROBS_INCLUDE]).data
    parts = [item.model_dump()["content"][0] for item in listed]
    assert parts[0]["type"] == "input_text" and parts[0].get("logprobs") is None  # an input part has none
    assert parts[1]["logprobs"] == []


def test_every_openai_value_is_accepted_in_either_query_form(served: tuple[TestClient, OpenAI]) -> None:
    http, client = served
    conversation, answer = _conversation(client)
    listed = client.conversations.items.list(conversation, include=list(INCLUDABLE))  # type: ignore[arg-type]
    assert len(listed.data) == 2
    repeated = [("include", value) for value in INCLUDABLE]
    assert http.get(f"/v1/conversations/{conversation}/items/{answer}", params=repeated).status_code == 200


@pytest.mark.parametrize("key", ["include", "include[]"])
def test_a_value_openai_does_not_define_is_a_400_naming_it(served: tuple[TestClient, OpenAI], key: str) -> None:
    http, client = served
    conversation, answer = _conversation(client)
    for path in (f"/v1/conversations/{conversation}/items", f"/v1/conversations/{conversation}/items/{answer}"):
        refused = http.get(path, params=[(key, LOGPROBS_INCLUDE), (key, "message.output_text.logprob")])
        assert refused.status_code == 400, refused.text
        assert "'message.output_text.logprob'" in str(refused.json())
    with pytest.raises(openai.BadRequestError) as caught:
        client.conversations.items.list(conversation, include=["reasoning.summary"])  # type: ignore[list-item]
    assert "'reasoning.summary'" in str(caught.value.body)
