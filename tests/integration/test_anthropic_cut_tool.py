"""A tool_use block that max_tokens cuts, through the official `anthropic` client against a real uvicorn server on
the tiny Llama: the blocking answer's `input` keeps the members written whole, as Anthropic's API does, and is what
the SDK reads from the same answer streamed (its `input_json_delta` pieces, parsed as far as they go). It was `{}`
on the blocking path while the stream gave the members."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from tests.fixtures.server import ServerHandle

SERVED_MODEL = (
    "tiny_llama_long_context"  # a tool prompt is over 512 tokens; the server fixture: tests/integration/conftest.py
)
SERVED_OPTIONS = {"model_name": "tiny"}
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {  # a short member, then a string the random tiny model writes until max_tokens cuts it
        "type": "object",
        "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}, "city": {"type": "string"}},
        "required": ["unit", "city"],
    },
}


@pytest.fixture(scope="module")
def claude(server: ServerHandle) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_a_cut_tool_use_keeps_its_whole_members_blocking_and_streamed(claude: anthropic.Anthropic) -> None:
    fields: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "max_tokens": 100,  # well inside the city (the unit is written by about 60)
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "extra_body": {"temperature": 0},
    }
    blocking = claude.messages.create(**fields)
    with claude.messages.stream(**fields) as stream:
        streamed = stream.get_final_message()
    assert blocking.stop_reason == streamed.stop_reason == "max_tokens"
    uses = [block for block in blocking.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].input
    assert uses[0].input == {"unit": uses[0].input["unit"]} and uses[0].input["unit"] in ("celsius", "fahrenheit")
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [(uses[0].name, uses[0].input)]
