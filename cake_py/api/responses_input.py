"""What a Responses API request asks, in the chat terms the rest of the server speaks.

- `input`: a string (one user message) or a list of items: messages (`role` user, system, developer or assistant;
  `content` a string or `input_text`/`output_text` parts), `function_call` (an earlier call of the model) and
  `function_call_output` (its result). `reasoning` items, which only reasoning models write, are skipped.
- `tools`: Responses' flat function tools `{"type": "function", "name", "parameters", …}`; `tool_choice` `auto`,
  `none`, `required` or `{"type": "function", "name"}`.
- `text.format`: `text`, `json_object` or `json_schema` (`name`, `schema`, `strict` beside the type).
Each is turned into the chat completion's own field, so both routes check and run them the same way.
"""

from __future__ import annotations

import uuid
from typing import Any

from cake_py.api.errors import ApiError

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(content: Any, where: str) -> str:
    """A message's content, a string or a list of text parts, as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts, got {content!r}"[:300])
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise ApiError(400, f"{where}.content[{index}] of type {kind!r}: this model only reads text parts"[:300])
        texts.append(_string(part, "text", f"{where}.content[{index}]"))
    return "\n".join(texts)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ApiError(400, f"{where}.{key} must be a string, got {value!r}"[:300])
    return value


def input_items(value: Any, field: str = "input") -> list[dict[str, Any]]:
    """`input`, checked, as items with ids (what GET /v1/responses/{id}/input_items lists); `field` names the request
    field they came in (a conversation's `items` are checked as `input` is)."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{field} must be a string or a non-empty list of items, got {value!r}"[:300])
    items = []
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object, got {item!r}"[:300])
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise ApiError(400, f"{where}.role {role!r} is not one of {', '.join(ROLES)}"[:300])
            text = _text(item.get("content"), where)
            part: dict[str, Any] = {"type": "input_text", "text": text}
            if role == "assistant":
                part = {"type": "output_text", "text": text, "annotations": []}
            items.append(
                {
                    "type": "message",
                    "id": _item_id(item, "msg", where),
                    "role": role,
                    "content": [part],
                    "status": "completed",
                }
            )
        elif kind == "function_call":
            items.append(
                {
                    "type": "function_call",
                    "id": _item_id(item, "fc", where),
                    "call_id": _string(item, "call_id", where),
                    "name": _string(item, "name", where),
                    "arguments": _string(item, "arguments", where),
                    "status": "completed",
                }
            )
        elif kind == "function_call_output":
            output = item.get("output")
            items.append(
                {
                    "type": "function_call_output",
                    "id": _item_id(item, "fco", where),
                    "call_id": _string(item, "call_id", where),
                    "output": output if isinstance(output, str) else _text(output, f"{where}.output"),
                    "status": "completed",
                }
            )
        elif kind != "reasoning":
            raise ApiError(
                400,
                f"{where} of type {kind!r} is not supported; send message, function_call or function_call_output items",
            )
    seen: set[str] = set()
    for item in items:  # one pass: a count per item froze the server for minutes on 100k items
        if item["id"] in seen:
            raise ApiError(400, f"{field} items share the id {item['id']!r}; each item's id must be unique"[:300])
        seen.add(item["id"])
    return items


def _item_id(item: dict[str, Any], prefix: str, where: str) -> str:
    value = item.get("id")
    if value is None:
        return new_id(prefix)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{where}.id must be a non-empty string, got {value!r}"[:300])
    return value


def chat_history(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items as chat messages: calls join the assistant turn before them, results are tool messages."""
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if item["type"] == "reasoning":  # a conversation's (`input` drops them): left out, as templates leave past
            # thinking out; but a turn that was only thinking stays an empty assistant turn, as a chain keeps it
            following = items[index + 1] if index + 1 < len(items) else None
            if following is None or not (following["type"] == "function_call" or following.get("role") == "assistant"):
                messages.append({"role": "assistant", "content": ""})
            continue
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": item["content"][0]["text"]})
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if messages and messages[-1]["role"] == "assistant":  # made here: appended to in place (copying it
                messages[-1].setdefault("tool_calls", []).append(call)  # for each call was quadratic)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def chat_tools(body: dict[str, Any]) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls` in the chat completion's form (for `tool_request`).
    `auto`, the Responses API's default, means nothing without tools."""
    tools = body.get("tools")
    converted: Any = tools
    if isinstance(tools, list):
        converted = []
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else tool
                raise ApiError(
                    400, f"tools[{index}] of type {kind!r} is not supported: this server runs function tools"
                )
            if isinstance(tool.get("function"), dict):  # already in the chat form
                converted.append(tool)
                continue
            function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
            converted.append({"type": "function", "function": function})
    choice = body.get("tool_choice")
    if choice == "auto" and not tools:
        choice = None
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return {"tools": converted, "tool_choice": choice, "parallel_tool_calls": body.get("parallel_tool_calls")}


def chat_format(body: dict[str, Any]) -> dict[str, Any]:
    """`text.format` as the chat completion's `response_format` ({} for plain text)."""
    text = body.get("text")
    if text is None:
        return {}
    if not isinstance(text, dict):
        raise ApiError(400, f"text must be an object, got {text!r}"[:300])
    form = text.get("format")
    if form is None:
        return {}
    kind = form.get("type") if isinstance(form, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        assert isinstance(form, dict)
        for key, expected in (("name", str), ("schema", dict)):
            if not isinstance(form.get(key), expected):
                raise ApiError(400, f"text.format.{key} is required for json_schema, got {form.get(key)!r}"[:300])
        schema = {key: form[key] for key in ("name", "schema", "strict", "description") if key in form}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise ApiError(400, f"text.format must be of type text, json_object or json_schema, got {form!r}"[:300])
