"""The OpenAPI document's part for the native routes (seeds 000 and 001: `/generate` JSON and multipart, `/chat`,
`/generate/batch`, model management, `/system/info`, `/health`) and Cake's `/api/v1/topology`: their schemas, merged
into `openapi_schemas.SCHEMAS`."""

from __future__ import annotations

from typing import Any

from cake_py.api.openapi_schemas import BOOL, FINISH, INT, MESSAGE, NULL_STR, NUM, STOP, STR, obj, ref

NATIVE_SAMPLING = {
    "model_id": NULL_STR,
    "max_length": {"type": ["integer", "null"], "default": 8192, "description": "clipped to the model's context"},
    "temperature": {**NUM, "default": 0.7},
    "top_p": {**NUM, "default": 0.9},
    "top_k": {**INT, "default": 80},
    "repetition_penalty": {**NUM, "default": 1.15},
    "do_sample": {**BOOL, "default": True},
    "seed": INT,
    "stop": STOP,
}

SCHEMAS: dict[str, Any] = {
    "GenerateRequest": obj({**NATIVE_SAMPLING, "prompt": STR, "stream": BOOL}, ("prompt",)),
    "GenerateResponse": obj({"response": STR, "finish_reason": FINISH, "usage": ref("Usage")}),
    "NativeStreamEvent": obj({"text": STR, "finish_reason": FINISH, "usage": ref("Usage"), "detail": STR}),
    "GenerateForm": obj(
        {
            "text": STR,
            "files": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": "media: refused with 400 naming the modality (the served models are text-only)",
            },
            "input_modalities": {**STR, "default": "auto"},
            "output_modalities": {**STR, "default": "text"},
            "streaming": {**BOOL, "default": True, "description": "NDJSON events; false answers one JSON document"},
            "model_kwargs": {
                **STR,
                "description": "JSON object: temperature, top_p, top_k, repetition_penalty, "
                "seed, stop, max_output_tokens, do_sample, chat_template, system",
            },
            "request_id": {**STR, "maxLength": 256},
        },
        ("text",),
    ),
    "GenerateFormResponse": obj(
        {
            "request_id": STR,
            "outputs": obj(
                {
                    "text": {
                        "type": "array",
                        "items": obj({"data": {**STR, "contentEncoding": "base64"}, "metadata": {"type": "object"}}),
                    }
                }
            ),
        }
    ),
    "GenerateFormEvent": obj(
        {
            "request_id": STR,
            "modality": {"const": "text"},
            "data": {**STR, "contentEncoding": "base64"},
            "metadata": {"type": "object"},
            "done": BOOL,
            "error": STR,
        }
    ),
    "ChatRequest": obj(
        {**NATIVE_SAMPLING, "messages": {"type": "array", "items": MESSAGE}, "stream": BOOL}, ("messages",)
    ),
    "ChatResponse": obj(
        {
            "choices": {"type": "array", "items": obj({"message": MESSAGE, "finish_reason": FINISH})},
            "usage": ref("Usage"),
        }
    ),
    "BatchRequest": obj(
        {**NATIVE_SAMPLING, "prompts": {"type": "array", "items": STR, "minItems": 1, "maxItems": 64}}, ("prompts",)
    ),
    "BatchResponse": obj(
        {
            "responses": {"type": "array", "items": STR},
            "finish_reasons": {"type": "array", "items": FINISH},
            "usage": ref("Usage"),
        }
    ),
    "LoadRequest": obj(
        {"model_id": {**NULL_STR, "description": "Hub id, local folder, .gguf; null = embedded"}}, ("model_id",)
    ),
    "CurrentModel": obj(
        {
            "loaded": BOOL,
            "model_id": NULL_STR,
            "name": NULL_STR,
            "architecture": STR,
            "n_layers": INT,
            "context_length": INT,
            "dtype": STR,
            "device": STR,
            "stages": {"type": "array", "items": {"type": "object"}},
        }
    ),
    "AvailableModels": obj(
        {
            "current": NULL_STR,
            "models": {
                "type": "array",
                "items": obj(
                    {"model_id": STR, "load_as": NULL_STR, "loaded": BOOL, "sources": {"type": "array", "items": STR}}
                ),
            },
        }
    ),
    "SystemInfo": obj(
        {
            "master": {"type": "object"},
            "workers": {"type": "array", "items": {"type": "object"}},
            "stages": {"type": "array", "items": {"type": "object"}},
            "model": ref("CurrentModel"),
        }
    ),
    "Health": obj(
        {
            "status": {"enum": ["healthy", "unhealthy", "loading"]},
            "running": BOOL,
            "model": NULL_STR,
            "stages": {"type": "array", "items": {"type": "object"}},
            "error": STR,
        }
    ),
    "Topology": obj(
        {
            "state": {"type": "string", "enum": ["serving", "switching", "no_model"]},
            "reason": NULL_STR,
            "model": NULL_STR,
            "model_id": NULL_STR,
            "dtype": STR,
            "num_layers": {"type": ["integer", "null"]},
            "memory_bytes": {"type": ["integer", "null"]},
            "master": {"type": "object"},
            "workers": {"type": "array", "items": {"type": "object"}},
            "layer_details": {"type": "object"},
        }
    ),
}
