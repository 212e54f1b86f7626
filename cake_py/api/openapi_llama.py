"""The OpenAPI document's part for llama.cpp's routes (`llama_completion`, `infill`): their paths and schemas,
merged into `openapi.PATHS` and `openapi_schemas.SCHEMAS`."""

from __future__ import annotations

from typing import Any

from cake_py.api.openapi_schemas import BOOL, INT, LLAMA_SAMPLERS, NUM, STR, obj, ref

SAMPLING = {
    "n_predict": {**INT, "default": -1, "description": "-1: until the end token or the context is full; 0: read only"},
    "temperature": {**NUM, "default": 0.8},
    "top_k": {**INT, "default": 40},
    "top_p": {**NUM, "default": 0.95},
    "min_p": {**NUM, "default": 0.05},
    "repeat_penalty": {**NUM, "default": 1.0},
    "presence_penalty": {**NUM, "default": 0.0},
    "frequency_penalty": {**NUM, "default": 0.0},
    **LLAMA_SAMPLERS,
    "seed": {**INT, "default": -1},
    "stop": {"type": "array", "items": STR},
    "ignore_eos": BOOL,
    "n_probs": {**INT, "minimum": 0, "maximum": 20, "default": 0},
    "logit_bias": {
        "oneOf": [{"type": "array", "items": {"type": "array"}}, {"type": "object"}],
        "description": "[[token id or string, bias or false], …] or {token: bias}",
    },
    "n_indent": {**INT, "default": 0},
    "t_max_predict_ms": {**NUM, "default": 0},
    "stream": BOOL,
    "grammar": {**STR, "description": "GBNF (or llguidance's Lark) the output must match"},
    "json_schema": {"type": "object"},
    "return_tokens": BOOL,
    "timings_per_token": {**BOOL, "description": "each streamed piece carries the timings so far"},
    "response_fields": {
        "type": "array",
        "items": STR,
        "description": "the answer's fields to send, `a/b` a nested one (sent under its whole path)",
    },
}
TOKEN_PROBABILITY = obj({"id": INT, "token": STR, "logprob": NUM, "bytes": {"type": "array", "items": INT}})
COMPLETION = {
    "index": INT,
    "content": STR,
    "stop": BOOL,
    "model": STR,
    "tokens_predicted": INT,
    "tokens_evaluated": INT,
    "tokens_cached": INT,
    "stop_type": {"enum": ["eos", "limit", "word"]},
    "stopping_word": STR,
    "truncated": BOOL,
    "generation_settings": {"type": "object"},
    "timings": {"type": "object"},
}

SCHEMAS: dict[str, Any] = {
    "Slot": obj(
        {
            "id": INT,
            "id_task": {**INT, "description": "the sequence's id; -1 when the slot is free"},
            "n_ctx": INT,
            "speculative": BOOL,
            "is_processing": BOOL,
            "prompt": {**STR, "description": "always empty: prompts are not shown"},
            "params": {"type": "object"},
            "n_prompt_tokens": INT,
            "n_prompt_tokens_processed": INT,
            "next_token": obj({"has_next_token": BOOL, "n_remain": INT, "n_decoded": INT}),
        }
    ),
    "InfillRequest": obj(
        {
            "input_prefix": STR,
            "input_suffix": STR,
            "prompt": {**STR, "description": "the start of the middle, already typed"},
            "input_extra": {"type": "array", "items": obj({"filename": STR, "text": STR})},
            **SAMPLING,
        }
    ),
    "Infill": obj(COMPLETION),
    "LlamaCompletionRequest": obj(
        {
            "prompt": {
                "oneOf": [STR, {"type": "array", "items": {"oneOf": [INT, STR, {"type": "array"}]}}],
                "description": "a string, token ids (strings among them), or a list of those (several prompts)",
            },
            **SAMPLING,
            "n_cmpl": {**INT, "minimum": 1, "default": 1, "description": "answers per prompt (alias n)"},
            "cache_prompt": {**BOOL, "description": "accepted; the prefix cache is always on"},
        },
        ("prompt",),
    ),
    "LlamaCompletion": obj(
        {
            **COMPLETION,
            "prompt": STR,
            "tokens": {"type": "array", "items": INT},
            "completion_probabilities": {
                "type": "array",
                "items": obj(
                    {**TOKEN_PROBABILITY["properties"], "top_logprobs": {"type": "array", "items": TOKEN_PROBABILITY}}
                ),
            },
        }
    ),
    "LlamaEmbeddingRequest": obj(
        {
            "content": {"oneOf": [STR, {"type": "array"}], "description": "a string, token ids, or a list of those"},
            "input": {"oneOf": [STR, {"type": "array"}], "description": "read instead of content when sent"},
            "embd_normalize": {
                **INT,
                "default": 2,
                "description": "-1 none, 0 max absolute, 1 taxicab, 2 L2, >2 p-norm",
            },
            "add_special_tokens": BOOL,
        }
    ),
    "LlamaEmbedding": obj({"index": INT, "embedding": {"type": "array", "items": {"type": "array", "items": NUM}}}),
    "Props": obj(
        {
            "default_generation_settings": {"type": "object"},
            "total_slots": INT,
            "model_alias": STR,
            "model_path": STR,
            "chat_template": STR,
            "build_info": STR,
        }
    ),
}


def paths(op: Any, json: Any, sse: dict[str, Any], generation_errors: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """The routes, described with `openapi._op` and `openapi._json` (passed in: that module imports this one)."""
    completion = op(
        "llama.cpp's completion: one prompt or several (a list of answers), its sampling names, grammar, json_schema",
        {**json({"oneOf": [ref("LlamaCompletion"), {"type": "array", "items": ref("LlamaCompletion")}]}), **sse},
        body=json(ref("LlamaCompletionRequest")),
        errors=generation_errors,
    )
    embedding = op(
        "llama.cpp's embedding (not OpenAI's shape): content or input, one pooled row each, embd_normalize",
        json({"type": "array", "items": ref("LlamaEmbedding")}),
        body=json(ref("LlamaEmbeddingRequest")),
        errors=generation_errors,
    )
    return {
        "/completion": {"post": completion},
        "/completions": {"post": completion},
        "/infill": {
            "post": op(
                "llama.cpp's fill in the middle (input_prefix, input_suffix, prompt, input_extra; its sampling fields)",
                {**json(ref("Infill")), **sse},
                body=json(ref("InfillRequest")),
                errors=generation_errors,
            )
        },
        "/embedding": {"post": embedding},
        "/embeddings": {"post": embedding},
        "/slots": {
            "get": op(
                "llama.cpp's slots: one per sequence run at once, busy ones with their progress (no prompt text)",
                json({"type": "array", "items": ref("Slot")}),
                errors=(401, 404, 503),
            )
        },
        "/props": {
            "get": op(
                "llama.cpp's server properties: /completion's defaults, slots, model",
                json(ref("Props")),
                errors=(401, 404, 503),
            )
        },
    }
