"""The prompt a Responses API request is answered from, and POST /v1/responses/input_tokens, which counts it.

Create (responses.py) and the count both build it here, so the count is the `usage.input_tokens` the same request
is answered with: `instructions` as the system message, then the turns before the input (the chat a stored response
ended, `previous_response_id`, or a stored conversation's items, `conversation`: one or the other, as in OpenAI's
API), the input's items, and the function tools as the model's template or the tool prompt reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.conversation_store import StoredConversation
from cake_py.api.conversations import conversation_id, refuse_held_ids, stored_conversation
from cake_py.api.errors import ApiError
from cake_py.api.json_body import json_body
from cake_py.api.middleware import request_owner
from cake_py.api.responses_input import chat_format, chat_history, chat_tools, input_items
from cake_py.api.schemas import chat_template_options
from cake_py.api.state import ServerState
from cake_py.api.tools import ToolRequest, prompt_messages, tool_request
from cake_py.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class ResponseInput:
    """What a request asks the model, checked, before its prompt is rendered."""

    instructions: str | None
    items: list[dict[str, Any]]  # this request's own input items, ids included
    history: list[dict[str, Any]]  # the chat before the answer: the earlier turns, then `items`
    previous_id: str | None
    conversation: StoredConversation | None
    tools: ToolRequest


CheckedItems = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # input items, and the same as chat messages


async def checked_items(body: dict[str, Any]) -> CheckedItems | None:
    """The request's `input` items and their chat messages, made in a thread (None: no input): a list of a hundred
    thousand items fits in a body, and checking it (an id drawn for each) on the event loop stalled every other
    client for a second."""
    value = body.get("input")
    if value is None:
        return None

    def check() -> CheckedItems:
        items = input_items(value)
        return items, chat_history(items)

    return await run_in_threadpool(check)


def response_input(
    state: ServerState,
    request: Request,
    body: dict[str, Any],
    tokenizer: Tokenizer,
    checked: CheckedItems | None,
) -> ResponseInput:
    """What the request asks; `checked`: its input items as `checked_items` gives them."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, f"instructions must be a string, got {instructions!r}"[:300])
    owner = request_owner(request)
    previous_id = body.get("previous_response_id")
    if previous_id is not None and not isinstance(previous_id, str):  # not an id no response has (not_found)
        raise ApiError(400, f"previous_response_id must be a string, got {previous_id!r}"[:300])
    conversation = None
    if body.get("conversation") is not None:
        if previous_id is not None:  # OpenAI's rule: each names the turns before the input
            raise ApiError(400, "conversation and previous_response_id cannot be used together; send one of them")
        conversation = stored_conversation(state, conversation_id(body["conversation"]), owner)
    # A conversation may hold the whole question already (items added through its own routes).
    if checked is not None:
        items, items_history = checked
    elif conversation is not None:
        items, items_history = [], []
    else:
        raise ApiError(400, "input must be a string or a non-empty list of items, got None")
    history: list[dict[str, Any]] = []
    if conversation is not None:
        refuse_held_ids(conversation, items)  # this request's items are added to it
        history = chat_history(list(conversation.items))
    elif previous_id is not None:
        previous = state.responses.get(previous_id, owner)
        if previous is None and state.responses.live(previous_id, owner) is not None:
            raise ApiError(400, f"previous_response_id: response {previous_id!r} is still being answered"[:300])
        if previous is None:
            raise ApiError(  # OpenAI's code: clients that lost a chain (a restart forgets it) resend it whole
                400,
                f"previous_response_id: no stored response has the id {previous_id!r}"[:300],
                code="previous_response_not_found",
            )
        history = list(previous.conversation)
    history += items_history
    tools = tool_request(chat_tools(body), tokenizer.tool_call_id_length)
    return ResponseInput(instructions, items, history, previous_id, conversation, tools)


async def response_prompt(found: ResponseInput, body: dict[str, Any], tokenizer: Tokenizer) -> tuple[str, list[int]]:
    """The prompt's text and token ids: rendered by the model's chat template (in a thread: it tokenizes)."""
    system = [{"role": "system", "content": found.instructions}] if found.instructions else []
    messages, tool_variables = await run_in_threadpool(
        prompt_messages, system + found.history, found.tools, tokenizer.reads_tools
    )
    if not messages:
        raise ApiError(400, "input holds no message to answer")
    kwargs = chat_template_options(body, messages).kwargs  # vLLM's chat_template_kwargs (e.g. enable_thinking)
    text, ids = await run_in_threadpool(tokenizer.chat_prompt, messages, template_kwargs={**kwargs, **tool_variables})
    return text, list(ids)


async def count_input_tokens(request: Request) -> Response:
    """OpenAI's input token count: the request's prompt, as create would render it, counted. Nothing runs, so it is
    not rate limited (as /tokenize and /v1/messages/count_tokens are not)."""
    state: ServerState = request.app.state.cake
    _, source = state.ready()
    body = await json_body(request)
    chat_format(body)  # checked as create checks it (the format constrains the answer, not the prompt)
    found = response_input(state, request, body, source.tokenizer, await checked_items(body))
    _, ids = await response_prompt(found, body, source.tokenizer)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": len(ids)})


ROUTES = [Route("/v1/responses/input_tokens", count_input_tokens, methods=["POST"])]
