"""The Responses API's semantic events for one answer: `response.created`, `response.in_progress` (for a background
response `response.queued` first, and `in_progress` at its first token), each output item's `output_item.added`, its
deltas and `.done` events, then `response.completed`, `response.incomplete` or `response.failed`. Each event is a
dict with `type` and `sequence_number`; responses.py sends them as SSE (background.py records them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from itertools import count
from typing import Any

from cake_py.api.forced_calls import CallDelta
from cake_py.api.openai import chat_logprobs
from cake_py.api.reasoning import ReasoningStream
from cake_py.api.response_objects import (
    Draft,
    call_item,
    finish_response,
    message_item,
    reasoning_item,
    status_of,
    with_item_ids,
)
from cake_py.api.responses_input import new_id
from cake_py.api.state import ServerState
from cake_py.api.streaming import EventStream, event_error
from cake_py.api.tool_stream import ToolStream
from cake_py.api.tools import ToolRequest


async def response_events(
    path: str, state: ServerState, stream: EventStream, draft: Draft, tools: ToolRequest
) -> AsyncIterator[dict[str, Any]]:
    numbers = count()

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(numbers), **fields}

    if draft.background:  # queued until the engine's first answer (after the prompt's prefill)
        yield event("response.created", response=draft.body("queued", [], None))
        yield event("response.queued", response=draft.body("queued", [], None))
    else:
        yield event("response.created", response=draft.body("in_progress", [], None))
        yield event("response.in_progress", response=draft.body("in_progress", [], None))
    started = not draft.background
    answer = ToolStream(tools)
    message_id: str | None = None
    outputs = 0  # output items opened so far: the next one's output_index
    text: list[str] = []
    logprobs: list[dict[str, Any]] = []  # every token's, for the message's done events
    pending: list[dict[str, Any]] = []  # those not yet sent with a delta
    where = {"output_index": 0, "content_index": 0}
    streamed: dict[int, dict[str, Any]] = {}  # calls as they are written, by their index in the answer
    thought = ReasoningStream(draft.thinking) if draft.thinking is not None else None
    thinking: dict[str, Any] = {}  # the reasoning item while it is open: id, output_index, text pieces
    reasoning: dict[str, Any] | None = None  # and once it is done

    def open_message() -> list[dict[str, Any]]:
        nonlocal message_id, outputs
        message_id = new_id("msg")
        where["output_index"], outputs = outputs, outputs + 1
        # content: [] here; the part comes with content_part.added, which a client appends to this item
        opening = {**message_item(message_id, "", "in_progress", []), "content": []}
        return [
            event("response.output_item.added", output_index=where["output_index"], item=opening),
            event(
                "response.content_part.added",
                item_id=message_id,
                **where,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            ),
        ]

    def delta(piece: str) -> list[dict[str, Any]]:
        out = open_message() if message_id is None else []
        text.append(piece)
        out.append(event("response.output_text.delta", item_id=message_id, **where, delta=piece, logprobs=pending[:]))
        pending.clear()
        return out

    def reasoning_piece(piece: str) -> list[dict[str, Any]]:
        nonlocal outputs
        out: list[dict[str, Any]] = []
        if not thinking:
            thinking.update(id=new_id("rs"), output_index=outputs, text=[])
            outputs += 1
            opening = reasoning_item(thinking["id"], "", "in_progress")
            out.append(event("response.output_item.added", output_index=thinking["output_index"], item=opening))
        thinking["text"].append(piece)
        ids = {"item_id": thinking["id"], "output_index": thinking["output_index"], "content_index": 0}
        out.append(event("response.reasoning_text.delta", **ids, delta=piece))
        return out

    def close_reasoning(status: str) -> list[dict[str, Any]]:
        nonlocal reasoning
        if not thinking or reasoning is not None:
            return []
        reasoning = reasoning_item(thinking["id"], "".join(thinking["text"]).strip(), status)
        ids = {"item_id": thinking["id"], "output_index": thinking["output_index"], "content_index": 0}
        text = reasoning["content"][0]["text"] if reasoning["content"] else ""
        return [
            event("response.reasoning_text.done", **ids, text=text),
            event("response.output_item.done", output_index=thinking["output_index"], item=reasoning),
        ]

    def call_pieces(deltas: list[CallDelta]) -> list[dict[str, Any]]:
        nonlocal outputs
        out: list[dict[str, Any]] = []
        for piece in deltas:
            if piece.id is not None:  # a new call: its item opens
                function = {"name": piece.name, "arguments": ""}
                opened: dict[str, Any] = {"id": piece.id, "function": function, "item_id": new_id("fc")}
                opened["output_index"], outputs = outputs, outputs + 1
                streamed[piece.index] = opened
                item = call_item(opened, "in_progress")
                out.append(event("response.output_item.added", output_index=opened["output_index"], item=item))
            call = streamed[piece.index]
            if piece.arguments:
                call["function"]["arguments"] += piece.arguments
                ids = {"item_id": call["item_id"], "output_index": call["output_index"]}
                out.append(event("response.function_call_arguments.delta", **ids, delta=piece.arguments))
        return out

    async for generated in stream:
        if not started:
            started = True
            yield event("response.in_progress", response=draft.body("in_progress", [], None))
        if generated.error:
            error = event_error(generated, path)
            code = "server_error" if error.status >= 500 else "invalid_prompt"  # codes of OpenAI's ResponseError
            failed = draft.body("failed", [], None, error={"code": code, "message": error.message})
            yield event("response.failed", response=failed)
            return
        if draft.logprobs and generated.tokens:
            new = chat_logprobs(generated.tokens, draft.tokenizer)
            logprobs.extend(new)
            pending.extend(new)
        said = generated.text
        if thought is not None:
            thought_piece, said = thought.feed(said, last=generated.finished)
            lines = reasoning_piece(thought_piece) if thought_piece else []
            if said or generated.finished:  # the thinking is over
                lines += close_reasoning(status_of(generated)[0] if generated.finished and not said else "completed")
            for line in lines:
                yield line
        piece = answer.feed(said)
        for line in [*(delta(piece) if piece else []), *call_pieces(answer.deltas)]:
            yield line
        if not generated.finished:
            continue
        done = answer.finish()
        for line in call_pieces(done.deltas):
            yield line
        if done.content:
            for line in delta(done.content):
                yield line
        status, _ = status_of(generated)
        message = None
        if message_id is not None or not (done.calls or streamed or reasoning):  # text came, or nothing else did
            for line in [] if message_id is not None else open_message():
                yield line
            assert message_id is not None
            message = message_item(message_id, "".join(text), status, logprobs)
            part = message["content"][0]
            yield event("response.output_text.done", item_id=message_id, **where, text=part["text"], logprobs=logprobs)
            yield event("response.content_part.done", item_id=message_id, **where, part=part)
            yield event("response.output_item.done", output_index=where["output_index"], item=message)
        calls = []
        for call in streamed.values():  # the last one partial when max_output_tokens cut the answer
            call["status"] = status
            calls.append(call)
        for call in with_item_ids(done.unsent):  # whole calls, read at the end
            call["output_index"], outputs = outputs, outputs + 1
            call["status"] = status
            ids = {"item_id": call["item_id"], "output_index": call["output_index"]}
            yield event(
                "response.output_item.added", output_index=call["output_index"], item=call_item(call, "in_progress", "")
            )
            yield event("response.function_call_arguments.delta", **ids, delta=call["function"]["arguments"])
            calls.append(call)
        for call in calls:
            ids = {"item_id": call["item_id"], "output_index": call["output_index"]}
            yield event("response.function_call_arguments.done", **ids, arguments=call["function"]["arguments"])
            yield event("response.output_item.done", output_index=call["output_index"], item=call_item(call))
        final = finish_response(state, draft, message, calls, generated, reasoning)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield event(kind, response=final)
        return
