"""Anthropic's Messages API stream (anthropic.py): the chat route's chunks translated into Anthropic's events as they
come, `message_start`, for each content block `content_block_start`, its deltas (`text_delta`, `thinking_delta`,
`input_json_delta`) and `content_block_stop`, then `message_delta` (stop_reason, usage) and `message_stop`; an `error`
event when the chat route reports an error or breaks off."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from cake_py.api.errors import ANTHROPIC_ERRORS
from cake_py.api.inprocess import StreamBroken
from cake_py.api.streaming import sse

log = logging.getLogger(__name__)

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}  # chat's finish_reason → Anthropic's stop_reason


def usage_of(usage: dict[str, Any] | None) -> dict[str, int]:
    """A chat usage as Anthropic's: prompt tokens the prefix cache gave are `cache_read_input_tokens`."""
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": int(usage.get("prompt_tokens", 0)) - cached,
        "output_tokens": int(usage.get("completion_tokens", 0)),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def stop_of(finish: str | None, stop_reason: Any, output_tokens: int, max_tokens: int) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a chat choice's finish_reason and vLLM's stop_reason. A length
    stop short of `max_tokens` is the context filling up: `max_tokens` would tell a client to ask for more."""
    if finish == "stop" and isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    if finish == "length" and output_tokens < max_tokens:
        return "model_context_window_exceeded", None
    return STOP_REASONS.get(finish or "", "end_turn"), None


def _event(kind: str, data: dict[str, Any]) -> str:
    """An event as its SSE lines, its JSON on one line whatever the text holds (streaming.sse)."""
    return f"event: {kind}\n" + sse({"type": kind, **data})


PING = _event("ping", {})  # what a silent stream sends (cake_py.api.keepalive); the SDKs skip it


async def message_events(
    chunks: AsyncGenerator[Any, None], model: str, input_tokens: int, max_tokens: int
) -> AsyncIterator[str]:
    """The chat route's chunks as Anthropic's stream: message_start, each content block's start, deltas and stop
    (text, thinking, tool_use with its input as JSON pieces), message_delta (stop_reason, usage), message_stop. A
    client that leaves closes `chunks` at once, which stops the chat route (its sequence leaves the engine)."""
    try:
        async for event in _translate(chunks, model, input_tokens, max_tokens):
            yield event
    finally:
        await chunks.aclose()


async def _translate(chunks: AsyncIterator[Any], model: str, input_tokens: int, max_tokens: int) -> AsyncIterator[str]:
    start: dict[str, Any] = {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        # The prompt's size; the final figures (with what the prefix cache gave) come in message_delta.
        "usage": {**usage_of(None), "input_tokens": input_tokens},
    }
    yield _event("message_start", {"message": start})
    blocks = _Blocks()
    finish: tuple[str, Any] | None = None  # the chat choice's finish_reason and stop_reason
    usage: dict[str, int] = usage_of(None)
    try:
        async for chunk in chunks:
            if "error" in chunk:
                yield _error_event(chunk["error"])
                return
            if chunk.get("usage"):
                usage = usage_of(chunk["usage"])
            for choice in chunk.get("choices", []):
                for event in blocks.feed(choice.get("delta", {})):
                    yield event
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"], choice.get("stop_reason")
    except StreamBroken as error:  # the chat route failed mid-answer: said, not passed off as the answer's end
        log.error("/v1/messages: %s", error)
        yield _error_event({"message": str(error), "code": 500})
        return
    if finish is None:
        yield _error_event({"message": "the answer ended without a stop reason", "code": 500})
        return
    for event in blocks.close():
        yield event
    stop_reason, stop_sequence = stop_of(*finish, usage["output_tokens"], max_tokens)
    yield _event(
        "message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": usage}
    )
    yield _event("message_stop", {})


def _error_event(error: Any) -> str:
    """A chat stream's error as Anthropic's `error` event, its type from the status the chat route gave."""
    message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    code = error.get("code") if isinstance(error, dict) else None
    kind = ANTHROPIC_ERRORS.get(code, "api_error") if isinstance(code, int) else "api_error"
    return _event("error", {"error": {"type": kind, "message": message}})


def tool_use_id(call_id: str) -> str:
    """A chat tool call's id as a tool_use block's: Anthropic's prefix, `toolu_`, where OpenAI's is `call_` (clients
    and tests that tell ids apart by their prefix). A later turn sends it back as it is: the chat route takes any id."""
    return f"toolu_{call_id.removeprefix('call_')}"


class _Blocks:
    """The content blocks of a streamed answer: chat deltas in, Anthropic's block events out. Tool calls are keyed
    on their index: a call re-sent whole (as forced calls may be at the end) opens no second block."""

    def __init__(self) -> None:
        self.kind: str | None = None  # the kind of the block open now
        self.index = -1
        self.call: int | None = None  # the tool call index of the open tool_use block
        self.calls_done: set[int] = set()

    def _open(self, kind: str, content_block: dict[str, Any]) -> list[str]:
        events = self.close()
        self.kind, self.index = kind, self.index + 1
        return [*events, _event("content_block_start", {"index": self.index, "content_block": content_block})]

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        if self.call is not None:
            self.calls_done.add(self.call)
        self.kind, self.call = None, None
        return [_event("content_block_stop", {"index": self.index})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return _event("content_block_delta", {"index": self.index, "delta": delta})

    def feed(self, delta: dict[str, Any]) -> list[str]:
        events: list[str] = []
        if delta.get("reasoning_content"):
            if self.kind != "thinking":
                events += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
        if delta.get("content"):
            if self.kind != "text":
                events += self._open("text", {"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            position = call.get("index", 0)
            if position in self.calls_done:
                continue
            function = call.get("function") or {}
            if self.call != position:
                call_id = tool_use_id(call.get("id") or "")
                started: dict[str, Any] = {"type": "tool_use", "id": call_id, "name": function.get("name"), "input": {}}
                events += self._open("tool_use", started)
                self.call = position
            if function.get("arguments"):
                events.append(self._delta({"type": "input_json_delta", "partial_json": function["arguments"]}))
        return events
