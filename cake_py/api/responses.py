"""OpenAI's Responses API: POST /v1/responses, blocking or streamed as its semantic events (the responses it stores
and their routes are response_store.py).

A request becomes a chat (responses_input.py, response_prompt.py): `instructions` is its system message,
`previous_response_id` puts the stored conversation that response ended before the new input (its instructions are
not carried over, as in OpenAI's API), or `conversation` a stored conversation's items (conversations.py; the
answer's input and output items are added to it once it has ended with an answer), and it then runs as
/v1/chat/completions runs one: the model's chat template, function tools, and `text.format` as structured output.
The answer's `output` is a message (`output_text`) and/or `function_call` items (response_objects.py). A stream is
its semantic events (response_events.py), each as `event:` and `data:` lines, with no `[DONE]`; a background
response is answered by a task of the server's own (background.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api import response_prompt, response_store
from cake_py.api.background import (
    TERMINAL,
    LiveResponse,
    cancelled,
    keeping_output,
    sse_event,
    start_in_background,
)
from cake_py.api.conversations import ConversationHold
from cake_py.api.errors import ApiError
from cake_py.api.include import LOGPROBS_INCLUDE, without_logprobs
from cake_py.api.keepalive import KeepAliveResponse
from cake_py.api.llama_sampler_fields import PENALTY_FIELDS, SAMPLER_FIELDS, openai_llama_sampling
from cake_py.api.middleware import request_key_name, request_owner
from cake_py.api.openai import chat_logprobs
from cake_py.api.reasoning import is_reasoning_template, opens_thinking, split_reasoning
from cake_py.api.response_events import response_events
from cake_py.api.response_objects import (
    Draft,
    finish_response,
    message_item,
    reasoning_item,
    status_of,
    with_item_ids,
)
from cake_py.api.response_prompt import ResponseInput, checked_items, response_input
from cake_py.api.response_store import StoredResponse
from cake_py.api.responses_input import chat_format, new_id
from cake_py.api.schemas import flag, metadata_field, number, openai_sampling
from cake_py.api.state import ServerState, generation_request
from cake_py.api.streaming import (
    SSE_HEADERS,
    EventStream,
    GenerationResponse,
    collect_all,
    open_streams,
)
from cake_py.api.structured import compiled_grammar, structured_grammar
from cake_py.api.tools import calls_grammar, parse_answer
from cake_py.engine.engine import Engine
from cake_py.models.tokenizer import Tokenizer

# Sampling fields passed on as the chat completion reads them (vLLM's extras and llama.cpp's samplers included);
# the rest are Responses'.
_SAMPLING_FIELDS = (
    *("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "top_logprobs", "priority"),
    *("ignore_eos", *SAMPLER_FIELDS, *PENALTY_FIELDS),
)


async def create_response(request: Request) -> Response:
    state, engine, source, body = await generation_request(request)
    tokenizer = source.tokenizer
    if body.get("prompt") not in (None, False):
        raise ApiError(400, "prompt is not supported by this server; send the request without it")
    truncation = body.get("truncation")
    if truncation not in (None, "disabled"):
        raise ApiError(400, f"truncation {truncation!r} is not supported: only disabled (an over-long input is a 400)")
    include = body.get("include") or []
    if not isinstance(include, list) or not all(isinstance(item, str) for item in include):
        raise ApiError(400, f"include must be a list of strings, got {include!r}"[:300])
    want_logprobs = LOGPROBS_INCLUDE in include  # the others name outputs this server never makes (reasoning, tools' …)
    metadata = metadata_field(body.get("metadata"))
    checked = await checked_items(body)
    found = response_input(state, request, body, tokenizer, checked)  # no await from here on: see the hold below
    # Held from reading its items (just now, with no await between) until this answer's own are added to it.
    hold = ConversationHold(state, found.conversation)
    try:
        return await _answer(request, state, engine, tokenizer, body, found, hold, want_logprobs, metadata)
    except BaseException:
        hold.release()  # refused or failed before an answer began: nothing is added
        raise


async def _answer(
    request: Request,
    state: ServerState,
    engine: Engine,
    tokenizer: Tokenizer,
    body: dict[str, Any],
    found: ResponseInput,
    hold: ConversationHold,
    want_logprobs: bool,
    metadata: dict[str, str] | None,
) -> Response:
    """The answer to a checked request: blocking, streamed, or in the background. `hold` is let go once the answer's
    items are added to its conversation (finish_response) or it failed; else when the stream or the run ends."""
    tools = found.tools
    max_output = body.get("max_output_tokens")
    if max_output is not None:
        number(body, "max_output_tokens", 0, integer=True)  # a 400 naming it when it is not an integer
        if max_output < 1:
            raise ApiError(400, f"max_output_tokens must be at least 1, got {max_output}")
    sampling = {key: body[key] for key in _SAMPLING_FIELDS if key in body}
    params = openai_sampling(
        {**sampling, "max_tokens": max_output, "logprobs": want_logprobs}, vocab_size=engine.vocab_size
    )
    params = await openai_llama_sampling(params, sampling, tokenizer)
    grammar = await structured_grammar(chat_format(body), tokenizer, {"response_format": "text.format"})
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
    prompt_text, prompt_ids = await response_prompt.response_prompt(found, body, tokenizer)
    params = engine.check_prompt(len(prompt_ids), params)
    thinking = opens_thinking(prompt_text) if is_reasoning_template(tokenizer.chat_template) and not grammar else None
    draft = Draft(
        id=new_id("resp"),
        created_at=int(time.time()),
        model=state.model_name,
        echo={
            "instructions": found.instructions,
            "max_output_tokens": max_output,
            "parallel_tool_calls": tools.parallel,
            "previous_response_id": found.previous_id,
            "conversation": {"id": found.conversation.id} if found.conversation is not None else None,
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
        history=found.history,
        items=found.items,
        tokenizer=tokenizer,
        logprobs=want_logprobs,
        thinking=thinking,
        background=background,
        owner=request_owner(request),
        conversation=found.conversation.id if found.conversation is not None else None,
        let_go=hold.release,
    )
    streams = open_streams(state, engine, [prompt_ids], [params], request_key_name(request))
    opening = draft.body("queued" if background else "in_progress", [], None)
    live = LiveResponse(opening, found.items, background=background, owner=draft.owner)
    events = response_events(request.url.path, state, streams[0], draft, tools)
    if background:
        return _start_background(state, live, events, draft, streams, stream, hold)
    if store:  # GET /v1/responses/{id} finds it in_progress until it is stored
        state.responses.start_live(live)
    if stream:
        lines = (sse_event(event) async for event in _tracked(live, events))

        def closed() -> None:
            hold.release()  # a client that left, or an error: nothing was added (an answer let it go already)
            state.responses.end_live(live)
            # The client left mid-answer, or the answer failed: the response it was given the id of ends cancelled
            # (or failed) with what it had, as a background run does, rather than turning from in_progress to not
            # found. One that completed stored itself, with its answer.
            if store and state.responses.get(live.id, draft.owner) is None:
                ended = live.response if live.response["status"] in TERMINAL else cancelled(live.response)
                kept = StoredResponse(without_logprobs(ended), draft.items, draft.history, owner=draft.owner)
                state.responses.put(kept)

        return GenerationResponse(lines, streams, "text/event-stream", on_close=closed)
    try:
        result = (await collect_all(request, streams))[0]
    finally:
        state.responses.end_live(live)
    thought, text = split_reasoning(result.text, thinking) if thinking is not None else (None, result.text)
    parsed = parse_answer(text or "", tools)
    status, _ = status_of(result.last)
    calls = [{**call, "status": status} for call in with_item_ids(parsed.tool_calls)]
    logprobs = chat_logprobs(result.tokens, tokenizer) if draft.logprobs else []
    # The thinking is over (completed) once an answer follows it; else it ends as the response does.
    reasoning = reasoning_item(new_id("rs"), thought, status if text is None else "completed") if thought else None
    message = None
    if (text and parsed.content) or not (calls or reasoning):
        message = message_item(new_id("msg"), parsed.content or "", status, logprobs)
    return JSONResponse(finish_response(state, draft, message, calls, result.last, reasoning))


def _start_background(
    state: ServerState,
    live: LiveResponse,
    events: AsyncIterator[dict[str, Any]],
    draft: Draft,
    streams: list[EventStream],
    stream: bool,
    hold: ConversationHold,
) -> Response:
    """Answer in a task of the server's own; the request returns the queued response, or follows its events."""
    stand_in = StoredResponse(live.response, draft.items, draft.history, owner=draft.owner)
    start_in_background(live, events, state.responses, stand_in, streams, on_end=hold.release)
    if stream:
        return KeepAliveResponse(live.follow(-1), media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse(live.response)


async def _tracked(live: LiveResponse, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    async for event in events:
        event = keeping_output(live, event)
        live.record(event)
        yield event


ROUTES = [
    Route("/v1/responses", create_response, methods=["POST"]),
    *response_prompt.ROUTES,  # before /v1/responses/{response_id}: input_tokens is no response's id
    *response_store.ROUTES,
]
