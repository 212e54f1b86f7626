"""llama.cpp server's native completion routes, for the tools written against it (SillyTavern, scripts, its own
`completion.js` clients): POST /completion (alias /completions) and GET /props.

`/completion` takes `prompt` as llama.cpp does: a string, token ids, ids and strings mixed (one prompt; a string
first gets the tokenizer's BOS), or a list of those (several prompts: a list of answers, or their events tagged by
`index`). `n_cmpl` (alias `n`) answers each prompt that many times (prompt 0's answers first). llama.cpp's sampling
names and defaults (`llama_cpp.llama_sampling`), `n_probs`, `logit_bias` pairs, `grammar` (GBNF or Lark) and
`json_schema`, `n_indent` and `t_max_predict_ms`, `return_tokens`, `response_fields`, and llama.cpp's other samplers
with `samplers` choosing their order (`llama_sampler_fields`); `cache_prompt` and `id_slot` are accepted and change
nothing (the prefix cache is always on, the scheduler picks slots). `/props` is llama.cpp's description of the
server: the defaults of `/completion`, the slots (`--max-running`), the model and its chat template.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py import __version__
from cake_py.api import schemas
from cake_py.api.errors import ApiError
from cake_py.api.llama_cpp import (
    Completion,
    EditorLimits,
    completion_events,
    llama_sampling,
    one_event,
    requested_repeat_last_n,
    response_fields,
)
from cake_py.api.llama_sampler_fields import sampler_settings, with_dry_breakers
from cake_py.api.middleware import request_key_name
from cake_py.api.schemas import flag
from cake_py.api.state import ServerState, generation_request
from cake_py.api.streaming import GenerationResponse, collect_all, open_streams
from cake_py.api.structured import compiled_grammar
from cake_py.api.token_lists import first_not_of, has_bad, holds_an_id, ids_and_strings, outside_vocabulary
from cake_py.models.grammar import CompiledGrammar, json_grammar, lark_grammar
from cake_py.models.tokenizer import Tokenizer

MAX_PROMPTS = 16

Prompt = str | list[int | str]


def _one_prompt(item: Any) -> bool:
    """A string, or token ids with strings among them (non-empty)."""
    return isinstance(item, str) or (bool(item) and ids_and_strings(item))


def _prompts(body: dict[str, Any]) -> list[Prompt]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and holds_an_id(prompt):
        # ids, with strings among them or not: one prompt; what else is in it is named, not its first id
        bad = first_not_of(prompt, (int, str))
        if has_bad(bad):
            raise ApiError(
                400,
                f"prompt must be a non-empty string, token ids (strings among them), or a list of those; {bad!r} is "
                "among its token ids"[:300],
            )
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt  # strings, or lists: one prompt each
    else:
        prompts = [prompt]
    for item in prompts:
        if not _one_prompt(item) or item == "":
            raise ApiError(
                400,
                f"prompt must be a non-empty string, token ids (strings among them), or a list of those, got {item!r}"[
                    :300
                ],
            )
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} are allowed")
    # llama.cpp's n_cmpl (its alias `n`, OpenAI's name): each prompt's answers, one after the other.
    key = "n_cmpl" if body.get("n_cmpl") is not None else "n"
    n_cmpl = int(schemas.number(body, key, 1, integer=True))
    if not 1 <= n_cmpl <= MAX_PROMPTS:
        raise ApiError(400, f"{key} must be between 1 and {MAX_PROMPTS}, got {n_cmpl}")
    if len(prompts) * n_cmpl > MAX_PROMPTS:
        raise ApiError(
            400, f"prompt holds {len(prompts)} prompts × {key} {n_cmpl}; at most {MAX_PROMPTS} answers are allowed"
        )
    return [prompt for prompt in prompts for _ in range(n_cmpl)]


def encode_mixed(tokenizer: Tokenizer, prompt: Prompt, add_special: bool = True) -> list[int]:
    """As llama.cpp tokenizes a prompt (its tokenize_mixed): a first string gets the tokenizer's BOS (when it adds
    one and `add_special`), later strings none; token ids go in as they are."""
    parts = [prompt] if isinstance(prompt, str) else prompt
    ids: list[int] = []
    for position, part in enumerate(parts):
        if isinstance(part, str):
            ids += tokenizer.encode(part, add_special_tokens=add_special and position == 0)
        else:
            ids.append(part)
    return ids


async def llama_grammar(body: dict[str, Any], tokenizer: Tokenizer) -> CompiledGrammar | None:
    """llama.cpp's `grammar` (GBNF, or llguidance's Lark) or `json_schema`: the output must match it. As llama.cpp
    reads them, an empty grammar is none (clients such as SillyTavern always send one), and a grammar wins over a
    json_schema sent with it."""
    grammar, schema = body.get("grammar"), body.get("json_schema")
    if grammar is not None and not isinstance(grammar, str):
        raise ApiError(400, f"grammar must be a string (GBNF), got {grammar!r}"[:300])
    if grammar:
        return await compiled_grammar(lambda: lark_grammar(grammar), tokenizer, "grammar")
    if schema is not None:
        if not isinstance(schema, dict | bool):
            raise ApiError(400, f"json_schema must be a JSON schema object, got {schema!r}"[:300])
        return await compiled_grammar(lambda: json_grammar(schema), tokenizer, "json_schema")
    return None


async def completion(request: Request) -> Response:
    state, engine, source, body = await generation_request(request)
    tokenizer = source.tokenizer
    prompts = _prompts(body)
    params, n_predict = llama_sampling(body, engine.context_length, tokenizer, engine.vocab_size)
    params = replace(params, grammar=await llama_grammar(body, tokenizer))
    params = await with_dry_breakers(params, tokenizer)
    return_tokens = flag(body, "return_tokens", False)
    stream = flag(body, "stream", False)
    fields = response_fields(body)
    timings_per_token = flag(body, "timings_per_token", False)

    def encode_all() -> list[list[int]]:
        return [encode_mixed(tokenizer, prompt) for prompt in prompts]

    prompt_ids = await run_in_threadpool(encode_all)
    per_prompt = []
    vocab_size = tokenizer.vocab_size
    for ids in prompt_ids:
        bad = outside_vocabulary(ids, vocab_size)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
        per_prompt.append(engine.check_prompt(len(ids), params))  # n_predict -1: each prompt's own room
    limits = [EditorLimits.of(body) for _ in prompts]  # one each: they keep the text they have seen
    streams = open_streams(state, engine, prompt_ids, per_prompt, request_key_name(request))
    answers = []
    for index, (prompt, ids, sampling, stream_) in enumerate(
        zip(prompts, prompt_ids, per_prompt, streams, strict=True)
    ):
        stream_.limit = limits[index]
        shown = prompt if isinstance(prompt, str) else tokenizer.decode(ids, skip_special_tokens=False)
        answers.append(
            Completion(
                state.model_name,
                tokenizer,
                len(ids),
                sampling,
                n_predict,
                engine.context_length,
                index=index,
                prompt=shown,
                return_tokens=return_tokens,
                stream=stream,
                repeat_last_n=requested_repeat_last_n(body),
                fields=fields,
                timings_per_token=timings_per_token,
            )
        )
    if stream and n_predict:
        return GenerationResponse(completion_events(request, streams, answers), streams, "text/event-stream")
    results = await collect_all(request, streams)

    def built() -> list[dict[str, Any]]:
        return [
            answer.final(result.text, result.last, stream_, result.tokens)
            for answer, result, stream_ in zip(answers, results, streams, strict=True)
        ]

    # In a thread: n_probs alternatives of thousands of tokens are a second of Python on the event loop
    finals = await run_in_threadpool(built)
    if stream:  # n_predict 0, streamed: each prompt's one event
        return GenerationResponse(one_event(*finals), [], "text/event-stream")
    return JSONResponse(finals[0] if len(finals) == 1 else finals)


async def props(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    engine, source = state.loaded()  # a status route: it answers while a stage is down
    params, n_predict = llama_sampling({}, engine.context_length, source.tokenizer, engine.vocab_size)
    defaults = Completion(state.model_name, source.tokenizer, 0, params, n_predict, engine.context_length).settings()
    return JSONResponse(
        {
            "default_generation_settings": {"n_ctx": engine.context_length, "params": defaults, **defaults},
            "total_slots": engine.max_running,
            "model_alias": state.model_name,
            "model_path": source.model_id,
            "chat_template": source.tokenizer.chat_template or "",
            "bos_token": source.tokenizer.bos_token or "",
            "eos_token": source.tokenizer.eos_token or "",
            "modalities": {"vision": False, "audio": False},
            "build_info": f"cake_py {__version__}",
        }
    )


async def slots(request: Request) -> Response:
    """llama.cpp's GET /slots: a slot per sequence the engine runs at once (--max-running), busy ones first, with
    their progress; the prompts' text is left out (several API keys may be several people). `fail_on_no_slot=1`:
    a 503 when none is free."""
    state: ServerState = request.app.state.cake
    engine, source = state.loaded()  # a status route: it answers while a stage is down
    running = engine.running()
    defaults, _ = llama_sampling({}, engine.context_length, source.tokenizer, engine.vocab_size)
    if request.query_params.get("fail_on_no_slot") in ("1", "true") and len(running) >= engine.max_running:
        raise ApiError(503, "no slot available", headers={"Retry-After": "1"})
    speculative = engine.speculative_tokens > 0
    listed = []
    for number in range(max(engine.max_running, len(running))):
        seq = running[number] if number < len(running) else None
        slot: dict[str, Any] = {
            "id": number,
            "id_task": seq.seq_id if seq is not None else -1,
            "n_ctx": engine.context_length,
            "speculative": speculative,
            "is_processing": seq is not None,
            "prompt": "",
        }
        params = seq.params if seq is not None else defaults  # a free slot shows /completion's defaults
        slot["params"] = {
            "n_predict": params.max_tokens if seq is not None else -1,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "min_p": params.min_p,
            "seed": params.seed if params.seed is not None else -1,
            **sampler_settings(params, engine.context_length),
        }
        decoded = len(seq.output_ids) if seq is not None else 0
        if seq is not None:
            slot["n_prompt_tokens"] = len(seq.prompt_ids)
            slot["n_prompt_tokens_processed"] = min(seq.n_cached, len(seq.prompt_ids))
        slot["next_token"] = {
            "has_next_token": True,
            "has_new_line": False,
            "n_remain": params.max_tokens - decoded if seq is not None else -1,
            "n_decoded": decoded,
            "stopping_word": "",
        }
        listed.append(slot)
    return JSONResponse(listed)


ROUTES = [
    Route("/completion", completion, methods=["POST"]),
    Route("/slots", slots, methods=["GET"]),
    Route("/completions", completion, methods=["POST"]),
    Route("/props", props, methods=["GET"]),
]
