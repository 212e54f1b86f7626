"""The OpenAPI document's part for the Conversations API (conversations.py) and the Responses API's input token
count (POST /v1/responses/input_tokens): their paths and schemas, merged into `openapi.PATHS` and
`openapi_schemas.SCHEMAS`."""

from __future__ import annotations

from typing import Any

from cake_py.api.include import INCLUDABLE
from cake_py.api.openapi_schemas import INT, STR, obj, ref

METADATA = {"type": "object", "additionalProperties": STR, "maxProperties": 16}
ITEMS = {"type": "array", "items": {"type": "object"}, "maxItems": 20}
CONVERSATION_ID = {"name": "conversation_id", "in": "path", "required": True, "schema": STR}
ITEM_ID = {"name": "item_id", "in": "path", "required": True, "schema": STR}
INCLUDE = {
    "name": "include",
    "in": "query",
    "schema": {"type": "array", "items": {"enum": list(INCLUDABLE)}},
    "description": "logprobs come back empty (none are stored); the other values change nothing",
}
ERRORS = (400, 401, 404)

SCHEMAS: dict[str, Any] = {
    "Conversation": obj(
        {"id": STR, "object": {"const": "conversation"}, "created_at": INT, "metadata": METADATA},
        ("id", "object", "created_at", "metadata"),
    ),
    "ConversationCreate": obj(
        {
            "items": {**ITEMS, "description": "initial items, checked as a response's input items"},
            "metadata": METADATA,
        }
    ),
    "ConversationUpdate": obj({"metadata": {**METADATA, "type": ["object", "null"]}}, ("metadata",)),
    "ConversationDeleted": obj(
        {"id": STR, "object": {"const": "conversation.deleted"}, "deleted": {"type": "boolean"}}
    ),
    "ConversationItems": obj({"items": ITEMS}, ("items",)),
    "ConversationItemList": obj(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object"}},
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        }
    ),
    "ResponseInputTokens": obj(
        {"object": {"const": "response.input_tokens"}, "input_tokens": INT}, ("object", "input_tokens")
    ),
}


def paths(op: Any, json: Any) -> dict[str, dict[str, Any]]:
    """The routes, described with `openapi._op` and `openapi._json` (passed in: that module imports this one)."""
    conversation = json(ref("Conversation"))
    return {
        "/v1/responses/input_tokens": {
            "post": op(
                "The input tokens a Responses request would be answered from (its usage.input_tokens)",
                json(ref("ResponseInputTokens")),
                body=json(ref("ResponseRequest")),
                errors=(400, 401, 404, 503),
            )
        },
        "/v1/conversations": {
            "post": op(
                "Create a conversation (optional initial items, at most 20, and metadata)",
                conversation,
                body=json(ref("ConversationCreate")),
                errors=(400, 401),
            )
        },
        "/v1/conversations/{conversation_id}": {
            "get": {**op("A conversation", conversation, errors=(401, 404)), "parameters": [CONVERSATION_ID]},
            "post": {
                **op(
                    "Replace a conversation's metadata",
                    conversation,
                    body=json(ref("ConversationUpdate")),
                    errors=ERRORS,
                ),
                "parameters": [CONVERSATION_ID],
            },
            "delete": {
                **op("Delete a conversation and its items", json(ref("ConversationDeleted")), errors=(401, 404)),
                "parameters": [CONVERSATION_ID],
            },
        },
        "/v1/conversations/{conversation_id}/items": {
            "post": {
                **op(
                    "Append items (at most 20) to a conversation",
                    json(ref("ConversationItemList")),
                    body=json(ref("ConversationItems")),
                    errors=ERRORS,
                ),
                "parameters": [CONVERSATION_ID, INCLUDE],
            },
            "get": {
                **op("A conversation's items (order, limit, after)", json(ref("ConversationItemList")), errors=ERRORS),
                "parameters": [
                    CONVERSATION_ID,
                    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"], "default": "desc"}},
                    {"name": "limit", "in": "query", "schema": {**INT, "minimum": 1, "maximum": 100, "default": 20}},
                    {"name": "after", "in": "query", "schema": STR},
                    INCLUDE,
                ],
            },
        },
        "/v1/conversations/{conversation_id}/items/{item_id}": {
            "get": {
                **op("One item of a conversation", json({"type": "object"}), errors=(401, 404)),
                "parameters": [CONVERSATION_ID, ITEM_ID, INCLUDE],
            },
            "delete": {
                **op("Delete one item; answers the conversation", conversation, errors=(401, 404)),
                "parameters": [CONVERSATION_ID, ITEM_ID],
            },
        },
    }
