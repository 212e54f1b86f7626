"""OpenAI's Responses API: POST /v1/responses, blocking or streamed as its semantic events (the responses it stores
and their routes are response_store.py).

A request becomes a chat (responses_input.py): `instructions` is its system message, `previous_response_id` puts the
stored conversation that response ended before the new input (its instructions are not carried over, as in
OpenAI's API), and it then runs as /v1/chat/completions runs one: the model's chat template, function tools, and
`text.format` as structured output. The answer's `output` is a message (`output_text`) and/or `function_call`
items. A stream is `response.created`, `response.in_progress`, each item's `output_item.added`, its deltas and
`.done` events, then `response.completed` (or `response.incomplete` at `max_output_tokens`, or `response.failed`);
every event carries `type` and `sequence_number`, and there is no `[DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from itertools import count
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cake_py.api import response_store
from cake_py.api.background import LiveResponse, sse_event, start_in_background, without_logprobs
from cake_py.api.errors import ApiError
from cake_py.api.forced_calls import CallDelta
from cake_py.api.openai import chat_logprobs
from cake_py.api.reasoning import ReasoningStream, is_reasoning_template, opens_thinking, split_reasoning
from cake_py.api.response_store import StoredResponse
from cake_py.api.responses_input import chat_format, chat_history, chat_tools, input_items, new_id
from cake_py.api.schemas import chat_template_options, flag, json_body, number, openai_sampling
from cake_py.api.state import ServerState
from cake_py.api.streaming import (
    SSE_HEADERS,
    EventStream,
    GenerationResponse,
    collect_all,
    event_error,
    open_streams,
)
from cake_py.api.structured import compiled_grammar, structured_grammar
from cake_py.api.tool_stream import ToolStream
from cake_py.api.tools import ToolRequest, calls_grammar, parse_answer, prompt_messages, tool_request
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.tokenizer import Tokenizer

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# Sampling fields passed on as the chat completion reads them (vLLM's extras included); the rest are Responses'.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "top_logprobs")


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


def _usage(event: GenerationEvent) -> dict[str, Any]:
    return {
        "input_tokens": event.prompt_tokens,
        "input_tokens_details": {"cached_tokens": event.cached_tokens},
        "output_tokens": event.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def _message(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def _reasoning(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A reasoning model's thinking as a reasoning output item (its text as reasoning_text content)."""
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _call(call: dict[str, Any], status: str | None = None, arguments: str | None = None) -> dict[str, Any]:
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


def _status(event: GenerationEvent) -> tuple[str, dict[str, Any] | None]:
    if event.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def _finish(
    state: ServerState,
    draft: Draft,
    message: dict[str, Any] | None,
    calls: list[dict[str, Any]],
    last: GenerationEvent,
    reasoning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The finished response object; stored (with its conversation) unless the request said `store: false`. The
    stored conversation leaves the thinking out, as reasoning models' templates leave it out of past turns."""
    status, incomplete = _status(last)
    output = [item for item in (reasoning, message) if item is not None] + [_call(call) for call in calls]
    response = draft.body(status, output, _usage(last), incomplete=incomplete)
    if draft.store:
        answer: dict[str, Any] = {"role": "assistant", "content": message["content"][0]["text"] if message else ""}
        if calls:
            answer["tool_calls"] = [
                {"id": call["id"], "type": "function", "function": call["function"]} for call in calls
            ]
        state.responses.put(StoredResponse(without_logprobs(response), draft.items, [*draft.history, answer]))
    return response


def _with_item_ids(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**call, "item_id": new_id("fc")} for call in calls]


async def create_response(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    engine, source = state.ready()
    tokenizer = source.tokenizer
    body = await json_body(request)
    for field in ("conversation", "prompt"):
        if body.get(field) not in (None, False):
            raise ApiError(400, f"{field} is not supported by this server; send the request without it")
    truncation = body.get("truncation")
    if truncation not in (None, "disabled"):
        raise ApiError(400, f"truncation {truncation!r} is not supported: only disabled (an over-long input is a 400)")
    include = body.get("include") or []
    if not isinstance(include, list) or not all(isinstance(item, str) for item in include):
        raise ApiError(400, f"include must be a list of strings, got {include!r}"[:300])
    want_logprobs = LOGPROBS_INCLUDE in include  # the others name outputs this server never makes (reasoning, tools' …)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, f"instructions must be a string, got {instructions!r}"[:300])
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()) and len(metadata) <= 16
    ):
        raise ApiError(400, "metadata must be an object of at most 16 string values")
    items = input_items(body.get("input"))
    previous_id = body.get("previous_response_id")
    history: list[dict[str, Any]] = []
    if previous_id is not None:
        previous = state.responses.get(previous_id) if isinstance(previous_id, str) else None
        if previous is None and isinstance(previous_id, str) and state.responses.live(previous_id) is not None:
            raise ApiError(400, f"previous_response_id: response {previous_id!r} is still being answered"[:300])
        if previous is None:
            raise ApiError(400, f"previous_response_id: no stored response has the id {previous_id!r}"[:300])
        history = list(previous.conversation)
    history += chat_history(items)
    tools = tool_request(chat_tools(body), tokenizer.tool_call_id_length)
    max_output = body.get("max_output_tokens")
    if max_output is not None:
        number(body, "max_output_tokens", 0, integer=True)  # a 400 naming it when it is not an integer
        if max_output < 1:
            raise ApiError(400, f"max_output_tokens must be at least 1, got {max_output}")
    sampling = {key: body[key] for key in _SAMPLING_FIELDS if key in body}
    params = openai_sampling(
        {**sampling, "max_tokens": max_output, "logprobs": want_logprobs}, vocab_size=engine.vocab_size
    )
    grammar = await structured_grammar(chat_format(body), tokenizer)
    if tools.forced and grammar is not None:
        raise ApiError(400, f"tool_choice {tools.choice!r} writes calls, so it cannot be combined with text.format")
    if tools.active:
        tool_grammar = await compiled_grammar(lambda: calls_grammar(tools), tokenizer, "tools")
        grammar = tool_grammar if tools.forced else grammar
    params = replace(params, grammar=grammar)
    stream = flag(body, "stream", False)
    store = flag(body, "store", True)
    background = flag(body, "background", False)
    if background and not store:
        raise ApiError(400, "background: true needs store: true (a background response is read back from the store)")
    system = [{"role": "system", "content": instructions}] if instructions else []
    messages, tool_variables = prompt_messages(system + history, tools, tokenizer.reads_tools)
    if not messages:
        raise ApiError(400, "input holds no message to answer")
    kwargs = chat_template_options(body, messages).kwargs  # vLLM's chat_template_kwargs (e.g. enable_thinking)
    prompt_text, prompt_ids = await run_in_threadpool(
        tokenizer.chat_prompt, messages, template_kwargs={**kwargs, **tool_variables}
    )
    params = engine.check_prompt(len(prompt_ids), params)
    thinking = opens_thinking(prompt_text) if is_reasoning_template(tokenizer.chat_template) and not grammar else None
    draft = Draft(
        id=new_id("resp"),
        created_at=int(time.time()),
        model=state.model_name,
        echo={
            "instructions": instructions,
            "max_output_tokens": max_output,
            "parallel_tool_calls": tools.parallel,
            "previous_response_id": previous_id,
            "reasoning": {"effort": None, "summary": None},
            "store": store,
            "temperature": params.temperature,
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [],
            "top_p": params.top_p,
            "truncation": "disabled",
            "user": body.get("user"),
            "metadata": metadata or {},
            "background": background,
        },
        store=store,
        history=history,
        items=items,
        tokenizer=tokenizer,
        logprobs=want_logprobs,
        thinking=thinking,
        background=background,
    )
    streams = open_streams(state, engine, [prompt_ids], [params])
    live = LiveResponse(draft.body("queued" if background else "in_progress", [], None), items, background=background)
    events = _events(request.url.path, state, streams[0], draft, tools)
    if background:
        return _start_background(state, live, events, draft, streams, stream)
    if store:  # GET /v1/responses/{id} finds it in_progress until it is stored
        state.responses.start_live(live)
    if stream:
        lines = (sse_event(event) async for event in _tracked(live, events))
        return GenerationResponse(lines, streams, "text/event-stream", on_close=lambda: state.responses.end_live(live))
    try:
        result = (await collect_all(request, streams))[0]
    finally:
        state.responses.end_live(live)
    thought, text = split_reasoning(result.text, thinking) if thinking is not None else (None, result.text)
    parsed = parse_answer(text or "", tools)
    status, _ = _status(result.last)
    calls = [{**call, "status": status} for call in _with_item_ids(parsed.tool_calls)]
    logprobs = chat_logprobs(result.tokens, tokenizer) if draft.logprobs else []
    # The thinking is over (completed) once an answer follows it; else it ends as the response does.
    reasoning = _reasoning(new_id("rs"), thought, status if text is None else "completed") if thought else None
    message = None
    if (text and parsed.content) or not (calls or reasoning):
        message = _message(new_id("msg"), parsed.content or "", status, logprobs)
    return JSONResponse(_finish(state, draft, message, calls, result.last, reasoning))


def _start_background(
    state: ServerState,
    live: LiveResponse,
    events: AsyncIterator[dict[str, Any]],
    draft: Draft,
    streams: list[EventStream],
    stream: bool,
) -> Response:
    """Answer in a task of the server's own; the request returns the queued response, or follows its events."""
    stand_in = StoredResponse(live.response, draft.items, draft.history)
    start_in_background(live, events, state.responses, stand_in, streams)
    if stream:
        return StreamingResponse(live.follow(-1), media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse(live.response)


async def _tracked(live: LiveResponse, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    async for event in events:
        live.record(event)
        yield event


async def _events(
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
    streamed: dict[int, dict[str, Any]] = {}  # forced calls as they are written, by their index in the answer
    thought = ReasoningStream(draft.thinking) if draft.thinking is not None else None
    thinking: dict[str, Any] = {}  # the reasoning item while it is open: id, output_index, text pieces
    reasoning: dict[str, Any] | None = None  # and once it is done

    def open_message() -> list[dict[str, Any]]:
        nonlocal message_id, outputs
        message_id = new_id("msg")
        where["output_index"], outputs = outputs, outputs + 1
        # content: [] here; the part comes with content_part.added, which a client appends to this item
        opening = {**_message(message_id, "", "in_progress", []), "content": []}
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
            opening = _reasoning(thinking["id"], "", "in_progress")
            out.append(event("response.output_item.added", output_index=thinking["output_index"], item=opening))
        thinking["text"].append(piece)
        ids = {"item_id": thinking["id"], "output_index": thinking["output_index"], "content_index": 0}
        out.append(event("response.reasoning_text.delta", **ids, delta=piece))
        return out

    def close_reasoning(status: str) -> list[dict[str, Any]]:
        nonlocal reasoning
        if not thinking or reasoning is not None:
            return []
        reasoning = _reasoning(thinking["id"], "".join(thinking["text"]).strip(), status)
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
                item = _call(opened, "in_progress")
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
                lines += close_reasoning(_status(generated)[0] if generated.finished and not said else "completed")
            for line in lines:
                yield line
        piece = answer.feed(said)
        for line in [*(delta(piece) if piece else []), *call_pieces(answer.deltas)]:
            yield line
        if not generated.finished:
            continue
        done = answer.finish()
        if done.content:
            for line in delta(done.content):
                yield line
        status, _ = _status(generated)
        message = None
        if message_id is not None or not (done.calls or streamed or reasoning):  # text came, or nothing else did
            for line in [] if message_id is not None else open_message():
                yield line
            assert message_id is not None
            message = _message(message_id, "".join(text), status, logprobs)
            part = message["content"][0]
            yield event("response.output_text.done", item_id=message_id, **where, text=part["text"], logprobs=logprobs)
            yield event("response.content_part.done", item_id=message_id, **where, part=part)
            yield event("response.output_item.done", output_index=where["output_index"], item=message)
        calls = []
        for call in streamed.values():  # the last one partial when max_output_tokens cut the answer
            call["status"] = status
            calls.append(call)
        for call in _with_item_ids(done.unsent):  # whole calls, read at the end (tool_choice auto)
            call["output_index"], outputs = outputs, outputs + 1
            call["status"] = status
            ids = {"item_id": call["item_id"], "output_index": call["output_index"]}
            yield event(
                "response.output_item.added", output_index=call["output_index"], item=_call(call, "in_progress", "")
            )
            yield event("response.function_call_arguments.delta", **ids, delta=call["function"]["arguments"])
            calls.append(call)
        for call in calls:
            ids = {"item_id": call["item_id"], "output_index": call["output_index"]}
            yield event("response.function_call_arguments.done", **ids, arguments=call["function"]["arguments"])
            yield event("response.output_item.done", output_index=call["output_index"], item=_call(call))
        final = _finish(state, draft, message, calls, generated, reasoning)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield event(kind, response=final)
        return


ROUTES = [Route("/v1/responses", create_response, methods=["POST"]), *response_store.ROUTES]
