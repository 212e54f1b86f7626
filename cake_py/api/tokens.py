"""POST /tokenize and /detokenize, in vLLM's and llama.cpp server's shapes (both serve these paths), and llama.cpp's
POST /apply-template (a chat's prompt text, as /v1/chat/completions renders it: `{"prompt": …}`).

/tokenize takes vLLM's `prompt` (text) or `messages` (a chat, rendered as /v1/chat/completions would render it, tools
included: the count is what that request's prompt costs), or llama.cpp's `content` (text, or token ids and strings
mixed, as its /completion's prompt). The answer is vLLM's `count`,
`max_model_len` and `tokens`; with llama.cpp's `with_pieces`, `tokens` holds `{id, piece}` objects as llama.cpp
sends them. /detokenize answers the text under both servers' names, `prompt` (vLLM) and `content` (llama.cpp).
The tokenizer runs off the event loop; no engine is needed, so a cluster with a stage down still answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.errors import ApiError
from cake_py.api.json_body import json_body
from cake_py.api.llama_completion import encode_mixed
from cake_py.api.schemas import chat_messages, chat_template_options, flag
from cake_py.api.state import NO_TEXT_MODEL, ServerState, chat_tokenizer, context_length
from cake_py.api.token_lists import ids_among, ids_and_strings, only_ids, outside_vocabulary
from cake_py.api.tools import prompt_messages, tool_request
from cake_py.models.hub import ModelSource
from cake_py.models.tokenizer import Tokenizer

TEXT_FIELDS = ("prompt", "messages", "content")


def _source(state: ServerState) -> ModelSource:
    if state.switching is not None:
        raise ApiError(503, f"the server is {state.switching}; retry shortly", headers={"Retry-After": "5"})
    if state.source is None:
        raise ApiError(404, NO_TEXT_MODEL)
    return state.source


def _context_length(state: ServerState, source: ModelSource) -> int:
    engine = state.engine
    return engine.context_length if engine is not None else context_length(source, state.settings)


def _piece(tokenizer: Tokenizer, token_id: int) -> str | list[int]:
    """llama.cpp's piece: the token's text, or its bytes when they are not whole UTF-8 characters."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


async def tokenize(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    source = _source(state)
    tokenizer = source.tokenizer
    body = await json_body(request)
    given = [name for name in TEXT_FIELDS if body.get(name) is not None]
    if len(given) != 1:
        raise ApiError(
            400,
            "send exactly one of prompt (text), messages (a chat) or content (llama.cpp's text)"
            + (f"; got {', '.join(given)}" if given else ""),
        )
    field = given[0]
    with_pieces = flag(body, "with_pieces", False)
    token_strs = flag(body, "return_token_strs", False)
    if not flag(body, "parse_special", True):
        raise ApiError(400, "parse_special: false is not supported: special tokens in the text are always parsed")
    if field == "messages":
        render = await run_in_threadpool(_chat_renderer, body, await chat_tokenizer(state.settings, tokenizer, body))
        add_special = flag(body, "add_special_tokens", False)  # the template writes its own (vLLM's default)

        def encode() -> list[int]:
            return tokenizer.encode(render(), add_special_tokens=add_special)

    elif field == "content":  # llama.cpp's: a string, or token ids and strings mixed (its tokenize_mixed)
        content = body[field]
        if not isinstance(content, str) and not ids_and_strings(content):
            raise ApiError(400, f"content must be a string, or token ids and strings, got {content!r}"[:300])
        bad = None if isinstance(content, str) else outside_vocabulary(ids_among(content), tokenizer.vocab_size)
        if bad is not None:
            raise ApiError(400, f"content token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})")
        add_special = flag(body, "add_special", False)  # llama.cpp adds no BOS by default (vLLM does)

        def encode() -> list[int]:
            return encode_mixed(tokenizer, content, add_special)

    else:
        text = body[field]
        if not isinstance(text, str):
            raise ApiError(400, f"{field} must be a string, got {text!r}"[:300])
        add_special = flag(body, "add_special_tokens", True)

        def encode() -> list[int]:
            return tokenizer.encode(text, add_special_tokens=add_special)

    ids = await run_in_threadpool(encode)
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": _context_length(state, source)}
    answer["tokens"] = [{"id": i, "piece": _piece(tokenizer, i)} for i in ids] if with_pieces else ids
    if token_strs:
        answer["token_strs"] = [tokenizer.backend.id_to_token(i) for i in ids]
    return JSONResponse(answer)


def _chat_renderer(body: dict[str, Any], tokenizer: Tokenizer) -> Callable[[], str]:
    """The prompt text /v1/chat/completions renders for the body's `messages` (tools and template options included):
    checked now (a 400 naming the bad value), rendered when called. Both in a thread: a chat of 100,000 messages is
    a second of Python, which on the event loop stalled every other client."""
    messages = chat_messages(body)
    template = chat_template_options(body, messages)
    tools = tool_request(body, tokenizer.tool_call_id_length)
    messages, tool_variables = prompt_messages(messages, tools, tokenizer.reads_tools)

    def render() -> str:
        return tokenizer.render_chat(
            messages,
            add_generation_prompt=template.add_generation_prompt,
            continue_final_message=template.continue_final_message,
            template_kwargs={**template.kwargs, **tool_variables},
        )

    return render


async def apply_template(request: Request) -> Response:
    """llama.cpp's /apply-template: the prompt a chat renders to, to edit and send to /completion."""
    state: ServerState = request.app.state.cake
    tokenizer = _source(state).tokenizer
    body = await json_body(request)
    if body.get("messages") is None:
        raise ApiError(400, "messages is required: chat turns as /v1/chat/completions takes them")
    render = await run_in_threadpool(_chat_renderer, body, await chat_tokenizer(state.settings, tokenizer, body))
    return JSONResponse({"prompt": await run_in_threadpool(render)})


async def detokenize(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    tokenizer = _source(state).tokenizer
    body = await json_body(request)
    ids = body.get("tokens")
    if not only_ids(ids):
        raise ApiError(400, f"tokens must be a list of token ids, got {ids!r}"[:300])
    bad = outside_vocabulary(ids, tokenizer.vocab_size)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the model's vocabulary (0-{tokenizer.vocab_size - 1})")
    text = await run_in_threadpool(tokenizer.decode, ids, skip_special_tokens=False)
    return JSONResponse({"prompt": text, "content": text})


ROUTES = [
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/apply-template", apply_template, methods=["POST"]),
]
