"""Anthropic's Messages API, for the tools written against it (the `anthropic` SDK, agents): POST /v1/messages
(blocking, or Anthropic's SSE events with `stream`) and POST /v1/messages/count_tokens.

As vLLM serves it, a request is translated to a chat completion request and answered by the chat route, in process
(inprocess.py): the same template, sampling, tool calling and reasoning; its answer (or its chunks) is translated
back. `system` is the first message, content blocks `text`, `tool_use` and `tool_result` become chat messages and
tool calls, `tools` (`input_schema`) and `tool_choice` (`auto`, `any`, `tool`, `none`) become OpenAI's,
`output_config.format` (a JSON schema) becomes `response_format`, a reasoning model's thinking is a `thinking`
block; other fields (`metadata`, `thinking`, `service_tier`, `cache_control`, …) change nothing here. Images,
documents and server tools are a 400 naming the block. Errors use Anthropic's body, `{"type": "error", "error":
{"type", "message"}}` (errors.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator
from functools import partial
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cake_py.api.anthropic_stream import PING, message_events, stop_of, tool_use_id, usage_of
from cake_py.api.errors import ApiError, retry_headers
from cake_py.api.inprocess import Routes
from cake_py.api.json_body import json_body, strict_loads
from cake_py.api.keepalive import KeepAliveResponse
from cake_py.api.llama_sampler_fields import PENALTY_FIELDS, SAMPLER_FIELDS
from cake_py.api.middleware import request_caller
from cake_py.api.partial_json import loads_partial
from cake_py.api.schemas import flag
from cake_py.api.streaming import SSE_HEADERS
from cake_py.api.tools import TOOL_NAME

CHAT_FORMAT = "response_format"  # what output_config.format becomes in the chat request

if TYPE_CHECKING:
    from cake_py.api.state import ServerState

# Older clients' sampling fields, and vLLM's extensions, passed to the chat route as they are.
# Passed on to the chat completion as it reads them (vLLM's extras and llama.cpp's samplers included).
SAMPLING = (
    *("temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos", "min_tokens", "repetition_penalty", "priority"),
    *SAMPLER_FIELDS,
    *PENALTY_FIELDS,
)


# The fields of a chat request that shape its prompt.
PROMPT_FIELDS = (
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
)


def _text_blocks(value: Any, where: str) -> str:
    """A string, or text blocks joined by line breaks, as the chat route joins text parts (a tool result)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in value):
        return "\n".join(_block_text(block, f"{where}[{index}]") for index, block in enumerate(value))
    raise ApiError(400, f"{where} must be a string or a list of text blocks, got {value!r}"[:300])


def _block_text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise ApiError(400, f"{where}.text must be a string, got {text!r}"[:300])
    return text


def _name(block: dict[str, Any], field: str, where: str) -> str:
    """A required non-empty string field, checked here so that the error names Anthropic's path (the chat route
    would name its own, in messages shifted by the translation)."""
    value = block.get(field)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{where}.{field} must be a non-empty string, got {value!r}"[:300])
    return value


def _parts(blocks: list[Any]) -> list[dict[str, str]]:
    """Text (strings, or checked text blocks) as chat text parts: the chat route joins them as it joins any."""
    return [{"type": "text", "text": str(b.get("text", "")) if isinstance(b, dict) else b} for b in blocks]


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Anthropic's `system` and `messages` as chat messages."""
    chat: list[dict[str, Any]] = []
    if body.get("system") not in (None, "", []):  # an empty one is none: the template's default system prompt stays
        system = body["system"]
        _text_blocks(system, "system")  # checked: a string or text blocks
        chat.append({"role": "system", "content": system if isinstance(system, str) else _parts(system)})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"{where} must be {{role: user or assistant, content}}, got {message!r}"[:300])
        content = message.get("content")
        if isinstance(content, str):
            chat.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise ApiError(400, f"{where}.content must be a string or a non-empty list of content blocks")
        text: list[str] = []
        calls = []
        for number, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                text.append(_block_text(block, f"{where}.content[{number}]"))
            elif kind == "tool_use" and message["role"] == "assistant":
                spot = f"{where}.content[{number}]"
                tool_input = block.get("input", {})
                if not isinstance(tool_input, dict):
                    raise ApiError(400, f"{spot}.input must be an object, got {tool_input!r}"[:300])
                calls.append(
                    {
                        "id": _name(block, "id", spot),
                        "type": "function",
                        "function": {"name": _name(block, "name", spot), "arguments": json.dumps(tool_input)},
                    }
                )
            elif kind == "tool_result" and message["role"] == "user":
                if text:  # text before a tool result stays before it
                    chat.append({"role": "user", "content": _parts(text)})
                    text = []
                result = _text_blocks(block.get("content", ""), f"{where}.content[{number}].content")
                if block.get("is_error"):
                    result = f"Error: {result}"
                tool_use_id = _name(block, "tool_use_id", f"{where}.content[{number}]")
                chat.append({"role": "tool", "tool_call_id": tool_use_id, "content": result})
            elif kind in ("thinking", "redacted_thinking") and message["role"] == "assistant":
                continue  # the model's earlier thinking: not part of the conversation it reads
            else:
                raise ApiError(400, f"{where}.content[{number}]: a {kind!r} block is not supported here"[:300])
        if text or calls:
            entry: dict[str, Any] = {"role": message["role"], "content": _parts(text) if text else None}
            if calls:
                entry["tool_calls"] = calls
            chat.append(entry)
    if all(message["role"] == "system" for message in chat):
        raise ApiError(400, "messages hold nothing to answer: no text, tool use or tool result (only thinking blocks)")
    return chat


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's `tools` and `tool_choice` as the chat route's fields, checked here: the chat route's errors would
    name the fields they become (`function.parameters`, tool_choice 'required')."""
    fields: dict[str, Any] = {}
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise ApiError(400, "tools must be a list of {name, description, input_schema}")
        fields["tools"] = [_tool(index, tool) for index, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise ApiError(400, f"tool_choice.type must be auto, any, tool or none, got {kind!r}")
        if kind == "tool":
            fields["tool_choice"] = {"type": "function", "function": {"name": _name(choice, "name", "tool_choice")}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        if kind in ("any", "tool") and not tools:
            raise ApiError(400, f"tool_choice {{type: {kind}}} needs tools")
        if flag(choice, "disable_parallel_tool_use", False):
            fields["parallel_tool_calls"] = False
    return fields


def _tool(index: int, tool: Any) -> dict[str, Any]:
    """A custom tool as a chat function tool."""
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or "input_schema" not in tool:
        kind = tool.get("type") if isinstance(tool, dict) else tool
        raise ApiError(400, f"{where}: only custom tools (name, input_schema) are supported, got {kind!r}"[:300])
    schema = tool["input_schema"]
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise ApiError(400, f"{where}.input_schema must be a JSON schema of an object, got {schema!r}"[:300])
    name = _name(tool, "name", where)
    if not TOOL_NAME.fullmatch(name):
        raise ApiError(400, f"{where}.name must be 1-64 letters, digits, _ or -, got {name!r}"[:300])
    description = tool.get("description")
    if description is not None and not isinstance(description, str):
        raise ApiError(400, f"{where}.description must be a string, got {description!r}"[:300])
    function = {"name": name, "parameters": schema}
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


def _continuation(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Messages that end with the assistant's (text) turn: the answer continues it (a prefill), as Anthropic's does."""
    last = messages[-1]
    if last["role"] == "assistant" and not last.get("tool_calls"):
        return {"add_generation_prompt": False, "continue_final_message": True}
    return {}


def chat_request(body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """The chat completion request an Anthropic Messages request is answered as."""
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"max_tokens (required) must be a positive integer, got {max_tokens!r}")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise ApiError(400, f"stop_sequences must be a list of strings, got {stops!r}"[:300])
    chat: dict[str, Any] = {"messages": _messages(body), "max_tokens": max_tokens, **_tools(body)}
    # Older clients send temperature, top_p and top_k (the current API has none: the server's defaults apply).
    chat.update({key: body[key] for key in SAMPLING if body.get(key) is not None})
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) and not 0 <= temperature <= 1:
        raise ApiError(400, f"temperature must be from 0 to 1 (Anthropic's range), got {temperature!r}")
    output = body.get("output_config") or {}
    if not isinstance(output, dict):
        raise ApiError(400, f"output_config must be an object, got {output!r}"[:300])
    if output.get("format") is not None:
        form = output["format"]
        if not isinstance(form, dict) or form.get("type") != "json_schema" or not isinstance(form.get("schema"), dict):
            raise ApiError(400, f"output_config.format must be {{type: json_schema, schema}}, got {form!r}"[:300])
        chat[CHAT_FORMAT] = {"type": "json_schema", "json_schema": {"name": "output", "schema": form["schema"]}}
    if stops:
        chat["stop"] = stops
    chat.update(_continuation(chat["messages"]))
    chat.update(_thinking(body))
    if stream:
        chat.update(stream=True, stream_options={"include_usage": True})
    return chat


def _thinking(body: dict[str, Any]) -> dict[str, Any]:
    """A reasoning model's template switch (Qwen3's and others'), honoured where the template reads it."""
    thinking = body.get("thinking")
    if thinking is None:
        return {}
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "adaptive", "disabled"):
        raise ApiError(400, f"thinking must be {{type: enabled, adaptive or disabled}}, got {thinking!r}"[:300])
    return {"chat_template_kwargs": {"enable_thinking": kind != "disabled"}}


def _prompt(chat: dict[str, Any]) -> dict[str, Any]:
    """The /tokenize request that counts the prompt a chat request renders."""
    return {key: chat[key] for key in PROMPT_FIELDS if key in chat}


def _input(function: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments as a tool_use block's `input`. Arguments max_tokens cut short keep what was written whole
    (partial_json): Anthropic's API closes a cut tool_use block with the members it completed, and a client reading
    the stream (its `input_json_delta` pieces, the SDK's partial parser) gets the same. `{}` lost them all."""
    arguments_text = function.get("arguments") or "{}"
    try:
        arguments = strict_loads(arguments_text)
    except (ValueError, RecursionError):  # cut short, or nested past what Python's reader takes
        try:
            arguments = loads_partial(arguments_text)
        except ValueError:  # not JSON cut short but wrong JSON (the SDK's stream parser raises on it)
            return {}
    return arguments if isinstance(arguments, dict) else {}


def message_of(completion: dict[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
    """A chat completion as Anthropic's Message."""
    choice = completion["choices"][0]
    message = choice["message"]
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call["function"]
        tool_use = {"type": "tool_use", "id": tool_use_id(call["id"]), "name": function["name"]}
        content.append({**tool_use, "input": _input(function)})
    usage = usage_of(completion.get("usage"))
    stop_reason, stop_sequence = stop_of(
        choice.get("finish_reason"), choice.get("stop_reason"), usage["output_tokens"], max_tokens
    )
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def _no_thread(body: dict[str, Any]) -> None:
    """The beta `thread` field (the server keeps the conversation; later turns send only what is new) is refused
    the way the SDK recovers from: it then drops the field and sends the whole conversation (its tool runner does
    this on its own). Ignored, a later turn was answered without its history or tools."""
    if body.get("thread") is not None:
        raise ApiError(
            400,
            "message threads (the thread field) are not supported here: send the whole conversation each turn",
            details={"error_code": "thread_unsupported_request", "unsupported": ["thread"]},
        )


def _model(request: Request, body: dict[str, Any]) -> str:
    _no_thread(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model (required) must be a string: any name, the served model answers")
    state: ServerState = request.app.state.cake
    return state.model_name


def _routes(request: Request) -> Routes:
    state: ServerState = request.app.state.cake
    assert state.routes is not None  # create_app sets it
    return state.routes


async def messages(request: Request) -> Response:
    body = await json_body(request)
    model = _model(request, body)
    stream = flag(body, "stream", False)
    chat = await run_in_threadpool(partial(chat_request, body, stream=stream))  # a big chat is seconds of Python
    if not stream:
        # The client's own receive goes along: if it leaves, the chat route sees it and stops generating.
        status, answer = await _routes(request).post(
            "/v1/chat/completions", chat, request.receive, request_caller(request)
        )
        if status != 200:
            raise _translated(status, answer)
        return JSONResponse(message_of(answer, model, chat["max_tokens"]))
    # message_start carries the prompt's size, as Anthropic's does: counted as the chat route renders it (a bad
    # request fails there, with its own error).
    status, counted = await _routes(request).post("/tokenize", _prompt(chat))
    input_tokens = counted["count"] if status == 200 else 0
    status, error, chunks = await _routes(request).post_stream("/v1/chat/completions", chat, request_caller(request))
    if chunks is None:
        raise _translated(status, error)
    return _Relay(chunks, model, input_tokens, chat["max_tokens"])


async def count_tokens(request: Request) -> Response:
    body = await json_body(request)
    _model(request, body)
    chat = await run_in_threadpool(_messages, body)
    tokenize = {"messages": chat, **_tools(body), **_continuation(chat), **_thinking(body)}
    status, answer = await _routes(request).post("/tokenize", tokenize)
    if status != 200:
        raise _translated(status, answer)
    return JSONResponse({"input_tokens": answer["count"]})


class _Relay(KeepAliveResponse):
    """The translated stream, which closes the chat route's stream however it ends: even when the client leaves
    before the first event (the body's generator then never starts, so its own cleanup never runs). A silent stream
    (a long prefill) sends Anthropic's `ping` event."""

    keepalive = PING.encode()

    def __init__(self, chunks: AsyncGenerator[Any, None], model: str, input_tokens: int, max_tokens: int) -> None:
        events = message_events(chunks, model, input_tokens, max_tokens)
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.chunks.aclose()


def _translated(status: int, answer: Any) -> ApiError:
    """The chat route's error, answered in this route's shape (the message kept, its Retry-After too)."""
    message = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    if isinstance(message, str) and message.startswith(CHAT_FORMAT):  # the field the client sent, not ours
        message = "output_config.format" + message[len(CHAT_FORMAT) :]
    headers = retry_headers(status)
    return ApiError(status, str(message or f"the request failed ({status})"), headers=headers)


ROUTES = [
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
