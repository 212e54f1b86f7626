"""OpenAI's Conversations API: POST /v1/conversations (optional initial `items`, at most 20, and `metadata`), GET,
POST (new `metadata`) and DELETE /v1/conversations/{id}, and its items: POST /v1/conversations/{id}/items (at most
20 at a time), GET …/items (`after`, `limit` 1–100 (20), `order` (`desc`), `include`), GET (`include`) and DELETE
…/items/{item_id}.

Items are checked as a response's `input` is (responses_input.py): messages, `function_call` and
`function_call_output` items, each given an id (`msg_…`, `fc_…`, `fco_…`) unless it came with one. A response
created with `conversation` reads them as its earlier turns and adds its own (responses.py), one response at a
time (ConversationHold); the store is conversation_store.py. Another API key's conversation is not found, as
another key's stored response is not."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.conversation_store import StoredConversation
from cake_py.api.errors import ApiError
from cake_py.api.include import LOGPROBS_INCLUDE, query_include
from cake_py.api.json_body import json_body
from cake_py.api.listing import list_page
from cake_py.api.middleware import request_owner
from cake_py.api.responses_input import input_items, new_id
from cake_py.api.schemas import metadata_field

if TYPE_CHECKING:
    from cake_py.api.state import ServerState

MAX_ADDED_ITEMS = 20  # OpenAI's: items added by one request


def conversation_id(value: Any) -> str:
    """A request's `conversation`: its id, or `{"id": …}`."""
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        raise ApiError(400, f'conversation must be a conversation id or {{"id": "conv_…"}}, got {value!r}'[:300])
    return value


def stored_conversation(state: ServerState, conversation: str, owner: str) -> StoredConversation:
    """The conversation `owner` made under that id; else a 404 naming it (OpenAI's status)."""
    found = state.conversations.get(conversation, owner)
    if found is None:
        raise _no_conversation(conversation)
    return found


class ConversationHold:
    """A response's hold on its conversation, from reading its items until its own are added (or it ends without
    an answer): a second response in that conversation meanwhile is OpenAI's 400 `conversation_locked`, which its
    clients retry. `release` is safe to call more than once; a hold on no conversation does nothing."""

    def __init__(self, state: ServerState, conversation: StoredConversation | None) -> None:
        self._store = state.conversations
        self._id = conversation.id if conversation is not None else None
        if self._id is not None and not self._store.hold(self._id):
            raise ApiError(
                400,
                f"another response is being answered in conversation {self._id!r}: retry once it has ended"[:300],
                code="conversation_locked",
            )

    def release(self) -> None:
        if self._id is not None:
            self._store.let_go(self._id)
            self._id = None


def refuse_held_ids(conversation: StoredConversation, items: list[dict[str, Any]]) -> None:
    """A 400 naming an item id the conversation already holds (its items are read back by id)."""
    held = {item["id"] for item in conversation.items}
    for item in items:
        if item["id"] in held:
            raise ApiError(400, f"conversation {conversation.id!r} already holds an item with the id {item['id']!r}")


def _new_items(value: Any, *, required: bool) -> list[dict[str, Any]]:
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise ApiError(400, f"items must be a {'non-empty ' if required else ''}list of items, got {value!r}"[:300])
    if len(value) > MAX_ADDED_ITEMS:
        raise ApiError(400, f"items holds {len(value)} items; at most {MAX_ADDED_ITEMS} can be added at a time")
    return input_items(value, "items") if value else []


def _items_page(added: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": added,
        "first_id": added[0]["id"] if added else None,
        "last_id": added[-1]["id"] if added else None,
        "has_more": False,
    }


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.cake
    return state


def _found(request: Request) -> StoredConversation:
    return stored_conversation(_state(request), request.path_params["conversation_id"], request_owner(request))


def _no_conversation(conversation: str) -> ApiError:
    return ApiError(404, f"no conversation has the id {conversation!r}"[:300])


def _no_item(conversation: str, item_id: str) -> ApiError:
    return ApiError(404, f"conversation {conversation!r} has no item with the id {item_id!r}"[:300])


async def create_conversation(request: Request) -> Response:
    body = await json_body(request) if await request.body() else {}  # no body: an empty conversation
    metadata = metadata_field(body.get("metadata")) or {}
    items = _new_items(body.get("items"), required=False)
    conversation = StoredConversation(
        id=new_id("conv"),
        created_at=int(time.time()),
        metadata=metadata,
        items=tuple(items),
        owner=request_owner(request),
    )
    _state(request).conversations.put(conversation)
    return JSONResponse(conversation.body)


async def retrieve_conversation(request: Request) -> Response:
    return JSONResponse(_found(request).body)


async def update_conversation(request: Request) -> Response:
    """OpenAI's update: `metadata` (required; null clears it) replaces the conversation's."""
    body = await json_body(request)
    if "metadata" not in body:
        raise ApiError(400, "metadata is required: the conversation's new metadata (null clears it)")
    metadata = metadata_field(body["metadata"]) or {}
    found = _found(request)
    updated = _state(request).conversations.update(found.id, found.owner, metadata)
    if updated is None:  # gone since it was found (evicted)
        raise _no_conversation(found.id)
    return JSONResponse(updated.body)


async def delete_conversation(request: Request) -> Response:
    found = _found(request)
    _state(request).conversations.delete(found.id, found.owner)
    return JSONResponse({"id": found.id, "object": "conversation.deleted", "deleted": True})


async def add_items(request: Request) -> Response:
    """Append the body's `items` in order; the answer lists them as stored (their ids included)."""
    body = await json_body(request)
    found = _found(request)
    items = _new_items(body.get("items"), required=True)
    refuse_held_ids(found, items)
    added = _state(request).conversations.add_items(found.id, found.owner, items)
    if added is None:
        raise _no_conversation(found.id)
    return JSONResponse(_items_page(added))


def _included(item: dict[str, Any], include: list[str]) -> dict[str, Any]:
    """An item as `include` asks for it. Logprobs: every output_text part has its `logprobs`, empty (the store keeps
    none, as the response store does: 20 alternatives a token would take most of its room). The other values name
    outputs this server never makes and change nothing."""
    content = item.get("content")
    if LOGPROBS_INCLUDE not in include or not isinstance(content, list):
        return item
    parts = [
        {**part, "logprobs": part.get("logprobs") or []}
        if isinstance(part, dict) and part.get("type") == "output_text"
        else part
        for part in content
    ]
    return {**item, "content": parts}


async def list_items(request: Request) -> Response:
    """OpenAI's listing: `order` (desc by default), `limit` (20, at most 100), `after` (an item id), `include`."""
    include = query_include(request.query_params)
    found = _found(request)
    page = list_page(request.query_params, found.items, what="item of this conversation")
    return JSONResponse({**page, "data": [_included(item, include) for item in page["data"]]})


async def retrieve_item(request: Request) -> Response:
    include = query_include(request.query_params)
    found, item_id = _found(request), request.path_params["item_id"]
    item = found.item(item_id)
    if item is None:
        raise _no_item(found.id, item_id)
    return JSONResponse(_included(item, include))


async def delete_item(request: Request) -> Response:
    """Remove one item; the answer is the conversation (OpenAI's)."""
    found, item_id = _found(request), request.path_params["item_id"]
    updated = _state(request).conversations.delete_item(found.id, found.owner, item_id)
    if updated is None:
        raise _no_item(found.id, item_id)
    return JSONResponse(updated.body)


ROUTES = [
    Route("/v1/conversations", create_conversation, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}", retrieve_conversation, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}", update_conversation, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}", delete_conversation, methods=["DELETE"]),
    Route("/v1/conversations/{conversation_id}/items", add_items, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}/items", list_items, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}/items/{item_id}", retrieve_item, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}/items/{item_id}", delete_item, methods=["DELETE"]),
]
