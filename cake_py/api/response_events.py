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
    message_id: str | None = None  # the message item open now (text after a call opens another one)
    outputs = 0  # output items opened so far: the next one's output_index
    text: list[str] = []  # the open message's text pieces
    message_texts: list[str] = []  # every message's text, for the stored conversation
    message_logprobs: list[dict[str, Any]] = []  # the open message's tokens' logprobs, for its done events
    pending: list[dict[str, Any]] = []  # logprobs not yet sent with a delta
    where = {"output_index": 0, "content_index": 0}
    streamed: dict[int, dict[str, Any]] = {}  # calls as they are written, by their index in the answer
    open_calls: list[int] = []  # those whose item is still open
    finished: list[tuple[int, dict[str, Any]]] = []  # (output_index, item) of every item done, for the output
    calls: list[dict[str, Any]] = []  # every call, in order, for the stored conversation
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

    def close_message(status: str) -> list[dict[str, Any]]:
        """The open message is done (a call follows it, or the answer ended)."""
        nonlocal message_id
        if message_id is None:
            return []
        message = message_item(message_id, "".join(text), status, message_logprobs[:])
        part = message["content"][0]
        lines = [
            event(
                "response.output_text.done", item_id=message_id, **where, text=part["text"], logprobs=part["logprobs"]
            ),
            event("response.content_part.done", item_id=message_id, **where, part=part),
            event("response.output_item.done", output_index=where["output_index"], item=message),
        ]
        finished.append((where["output_index"], message))
        message_texts.append("".join(text))
        message_id = None
        text.clear()
        message_logprobs.clear()
        return lines

    def close_calls(status: str) -> list[dict[str, Any]]:
        """The streamed calls still open are done (text follows them, another call opens, or the answer ended)."""
        lines = []
        for index in open_calls:
            call = {**streamed[index], "status": status}
            ids = {"item_id": call["item_id"], "output_index": call["output_index"]}
            lines.append(event("response.function_call_arguments.done", **ids, arguments=call["function"]["arguments"]))
            lines.append(event("response.output_item.done", output_index=call["output_index"], item=call_item(call)))
            finished.append((call["output_index"], call_item(call)))
            calls.append(call)
        open_calls.clear()
        return lines

    def delta(piece: str) -> list[dict[str, Any]]:
        out = [*close_calls("completed"), *open_message()] if message_id is None else []
        text.append(piece)
        message_logprobs.extend(pending)
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
            if piece.id is not None:  # a new call: its item opens, once the item before it is done
                out += [*close_message("completed"), *close_calls("completed")]
                function = {"name": piece.name, "arguments": ""}
                opened: dict[str, Any] = {"id": piece.id, "function": function, "item_id": new_id("fc")}
                opened["output_index"], outputs = outputs, outputs + 1
                streamed[piece.index] = opened
                open_calls.append(piece.index)
                item = call_item(opened, "in_progress")
                out.append(event("response.output_item.added", output_index=opened["output_index"], item=item))
            call = streamed[piece.index]
            if piece.arguments:
                call["function"]["arguments"] += piece.arguments
                ids = {"item_id": call["item_id"], "output_index": call["output_index"]}
                out.append(event("response.function_call_arguments.delta", **ids, delta=piece.arguments))
        return out

    async for generated in stream:
        if not started and not generated.error:  # a run that fails before it starts goes from queued to failed
            started = True
            yield event("response.in_progress", response=draft.body("in_progress", [], None))
        if generated.error:
            error = event_error(generated, path)
            code = "server_error" if error.status >= 500 else "invalid_prompt"  # codes of OpenAI's ResponseError
            failed = draft.body("failed", [], None, error={"code": code, "message": error.message})
            if draft.let_go is not None:  # it adds nothing: the conversation is free before the client reads this
                draft.let_go()
            yield event("response.failed", response=failed)
            return
        if draft.logprobs and generated.tokens:
            pending.extend(chat_logprobs(generated.tokens, draft.tokenizer))
        said = generated.text
        if thought is not None:
            thought_piece, said = thought.feed(said, last=generated.finished)
            lines = reasoning_piece(thought_piece) if thought_piece else []
            if said or generated.finished:  # the thinking is over
                lines += close_reasoning(status_of(generated)[0] if generated.finished and not said else "completed")
            for line in lines:
                yield line
        answer.feed(said)
        for piece in answer.pieces:  # text and calls as they are written, in their order
            for line in delta(piece) if isinstance(piece, str) else call_pieces([piece]):
                yield line
        if not generated.finished:
            continue
        done = answer.finish()
        for line in [*call_pieces(done.deltas), *(delta(done.content) if done.content else [])]:
            yield line
        status, _ = status_of(generated)
        if message_id is None and not (finished or streamed or done.unsent or reasoning):  # nothing came: an empty one
            for line in open_message():
                yield line
        message_logprobs.extend(pending)  # the last tokens' (a stop token's, say) go with the last message
        for line in [*close_message(status), *close_calls(status)]:  # the last call partial if max_output_tokens cut it
            yield line
        for call in with_item_ids(done.unsent):  # whole calls, read at the end
            call["output_index"], outputs = outputs, outputs + 1
            call["status"] = status
            ids = {"item_id": call["item_id"], "output_index": call["output_index"]}
            yield event(
                "response.output_item.added", output_index=call["output_index"], item=call_item(call, "in_progress", "")
            )
            yield event("response.function_call_arguments.delta", **ids, delta=call["function"]["arguments"])
            yield event("response.function_call_arguments.done", **ids, arguments=call["function"]["arguments"])
            yield event("response.output_item.done", output_index=call["output_index"], item=call_item(call))
            finished.append((call["output_index"], call_item(call)))
            calls.append(call)
        if reasoning is not None:
            finished.append((thinking["output_index"], reasoning))
        output = [item for _, item in sorted(finished, key=lambda entry: entry[0])]
        final = finish_response(
            state, draft, None, calls, generated, reasoning, output=output, text="".join(message_texts)
        )
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield event(kind, response=final)
        return
