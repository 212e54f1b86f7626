"""The Responses API's objects: the response being answered (`Draft`), its output items (message, reasoning,
function call), its status and usage, and the finished response as it is stored (responses.py answers with them,
response_events.py streams them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cake_py.api.include import without_logprobs
from cake_py.api.response_store import StoredResponse
from cake_py.api.responses_input import new_id
from cake_py.api.state import ServerState
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.tokenizer import Tokenizer


@dataclass
class Draft:
    """The response being answered: its id and the request fields the response object repeats."""

    id: str
    created_at: int
    model: str
    echo: dict[str, Any]
    store: bool
    history: list[dict[str, Any]]  # the conversation before the answer (for the store)
    items: list[dict[str, Any]]  # this request's input items (for the store)
    tokenizer: Tokenizer
    logprobs: bool
    thinking: bool | None = None  # a reasoning model's answer: whether it starts inside <think> (None: not one)
    background: bool = False  # answered by a task of the server's own (background.py)
    owner: str = ""  # the API key's owner that asked (middleware.request_owner): the stored response is its own
    conversation: str | None = None  # the stored conversation (`conversation`) its items are added to when it ends
    # Lets the conversation go (conversations.ConversationHold): once its items are added, or it failed; before
    # the last event, so a client that sends the next turn when it reads it never finds the conversation held.
    let_go: Callable[[], None] | None = None

    def body(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        *,
        error: dict[str, Any] | None = None,
        incomplete: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            "usage": usage,
            **self.echo,
        }


def usage_of(event: GenerationEvent) -> dict[str, Any]:
    """OpenAI's usage: `cache_write_tokens` (tokens written to a prompt cache kept on purpose, a field its schema
    requires) is none here, as Anthropic's `cache_creation_input_tokens` is."""
    return {
        "input_tokens": event.prompt_tokens,
        "input_tokens_details": {"cached_tokens": event.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": event.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def message_item(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A reasoning model's thinking as a reasoning output item (its text as reasoning_text content)."""
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def call_item(call: dict[str, Any], status: str | None = None, arguments: str | None = None) -> dict[str, Any]:
    """A call as a function_call output item (`status`: the call's own, else completed)."""
    function = call["function"]
    return {
        "type": "function_call",
        "id": call["item_id"],
        "call_id": call["id"],
        "name": function["name"],
        "arguments": function["arguments"] if arguments is None else arguments,
        "status": status or call.get("status", "completed"),
    }


def status_of(event: GenerationEvent) -> tuple[str, dict[str, Any] | None]:
    if event.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def finish_response(
    state: ServerState,
    draft: Draft,
    message: dict[str, Any] | None,
    calls: list[dict[str, Any]],
    last: GenerationEvent,
    reasoning: dict[str, Any] | None = None,
    *,
    output: list[dict[str, Any]] | None = None,
    text: str | None = None,
) -> dict[str, Any]:
    """The finished response object; stored (with its conversation) unless the request said `store: false`, and its
    input and output items added to the request's `conversation`, if it named one (a response that failed or was
    cancelled never comes here, so it adds nothing, as in OpenAI's API). The
    stored conversation leaves the thinking out, as reasoning models' templates leave it out of past turns. A stream
    gives its items in the order they came (`output`) and its messages' `text`; else it is the reasoning, the
    message, then the calls."""
    status, incomplete = status_of(last)
    if output is None:
        output = [item for item in (reasoning, message) if item is not None] + [call_item(call) for call in calls]
    if text is None:
        text = message["content"][0]["text"] if message else ""
    response = draft.body(status, output, usage_of(last), incomplete=incomplete)
    if draft.store:
        answer: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            answer["tool_calls"] = [
                {"id": call["id"], "type": "function", "function": call["function"]} for call in calls
            ]
        stored = StoredResponse(without_logprobs(response), draft.items, [*draft.history, answer], owner=draft.owner)
        state.responses.put(stored)
    if draft.conversation is not None:  # the stored copy's items: without logprobs, as the store keeps them
        state.conversations.add_items(draft.conversation, draft.owner, [*draft.items, *without_logprobs(output)])
    if draft.let_go is not None:
        draft.let_go()
    return response


def with_item_ids(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**call, "item_id": new_id("fc")} for call in calls]
