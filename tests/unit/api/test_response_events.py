"""The Responses API's events for answers that mix text and streamed calls: each item is done before the next one
opens, text after a call is a message of its own, and the final `output` lists the items in their output_index
order, as OpenAI's streams do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from cake_py.api.response_events import response_events
from cake_py.api.response_objects import Draft
from cake_py.api.tools import tool_request
from cake_py.engine.sequence import GenerationEvent

TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}} for name in ("search",)]
CALL = ['<tool_call>{"name": "search", ', '"arguments": {"q": 1}}', "</tool_call>"]


async def _events(pieces: list[str]) -> AsyncIterator[GenerationEvent]:
    for number, piece in enumerate(pieces):
        last = number == len(pieces) - 1
        yield GenerationEvent(0, text=piece, finish_reason="stop" if last else None, completion_tokens=len(pieces))


def run(pieces: list[str]) -> list[dict[str, Any]]:
    draft = Draft("resp_1", 0, "m", {}, False, [], [], None, False)  # type: ignore[arg-type]

    async def collect() -> list[dict[str, Any]]:
        state: Any = SimpleNamespace()
        stream: Any = _events(pieces)
        return [e async for e in response_events("/v1/responses", state, stream, draft, tool_request({"tools": TOOLS}))]

    return asyncio.run(collect())


def items_in_order(events: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    """(added|done, output_index, item type) as the events open and close items."""
    return [
        (event["type"].rsplit(".", 1)[1], event["output_index"], event["item"]["type"])
        for event in events
        if event["type"] in ("response.output_item.added", "response.output_item.done")
    ]


@pytest.mark.parametrize(
    ("pieces", "expected", "texts"),
    [
        (
            [*CALL, "\nDone."],
            [
                ("added", 0, "function_call"),
                ("done", 0, "function_call"),
                ("added", 1, "message"),
                ("done", 1, "message"),
            ],
            ["Done."],
        ),
        (
            ["Let me look.", *CALL, "\nDone."],
            [
                ("added", 0, "message"),
                ("done", 0, "message"),
                ("added", 1, "function_call"),
                ("done", 1, "function_call"),
                ("added", 2, "message"),
                ("done", 2, "message"),
            ],
            ["Let me look.", "Done."],
        ),
    ],
)
def test_each_item_is_done_before_the_next_opens_and_the_output_keeps_their_order(
    pieces: list[str], expected: list[tuple[str, int, str]], texts: list[str]
) -> None:
    events = run(pieces)
    assert items_in_order(events) == expected
    final = events[-1]
    assert final["type"] == "response.completed"
    output = final["response"]["output"]
    assert [item["type"] for item in output] == [kind for step, _, kind in expected if step == "done"]
    assert [item["content"][0]["text"].strip() for item in output if item["type"] == "message"] == texts
    [call] = [item for item in output if item["type"] == "function_call"]
    assert (call["name"], call["arguments"]) == ("search", '{"q": 1}')


def test_an_answer_that_is_only_text_is_one_message() -> None:
    events = run(["Hello", " there."])
    assert items_in_order(events) == [("added", 0, "message"), ("done", 0, "message")]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello there."


def test_an_empty_answer_is_an_empty_message() -> None:
    events = run([""])
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["message"]


@pytest.mark.parametrize("background", [True, False])
def test_a_run_that_fails_before_its_first_token_goes_from_queued_to_failed(background: bool) -> None:
    """A background run never started (its generation failed first) is not said to be in progress on the way."""
    draft = Draft("resp_1", 0, "m", {}, False, [], [], None, False, background=background)  # type: ignore[arg-type]

    async def failing() -> AsyncIterator[GenerationEvent]:
        yield GenerationEvent(0, finish_reason="error", error="engine stopped")

    async def collect() -> list[str]:
        state: Any = SimpleNamespace()
        stream: Any = failing()
        events = response_events("/v1/responses", state, stream, draft, tool_request({}))
        return [event["type"] async for event in events]

    opening = ["response.queued"] if background else ["response.in_progress"]
    assert asyncio.run(collect()) == ["response.created", *opening, "response.failed"]
