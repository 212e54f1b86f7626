"""GET /openapi.json: a hand-written OpenAPI 3.1 document of every route, its request and its answers.

Hand-written (not generated from docstrings) so it says what the wire carries, errors included; a test checks
that every mounted route is described here.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py import __version__
from cake_py.api import openapi_conversations, openapi_files, openapi_llama, openapi_native, openapi_scores
from cake_py.api.openapi_schemas import BOOL, INT, SCHEMAS, STR, obj, ref

STATUS_TEXT = {
    400: "malformed or invalid request",
    401: "bad or missing API key / UI credentials",
    404: "model type not loaded, or unknown model",
    413: "body or input too long",
    429: "rate limit exceeded (Retry-After)",
    500: "internal error",
    503: "cluster not ready or model being switched",
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _op(
    summary: str,
    answer: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    errors: tuple[int, ...] = (),
    detail: bool = False,
    security: list[dict[str, list[str]]] | None = None,
) -> dict[str, Any]:
    error_schema = ref("Detail" if detail else "Error")
    responses: dict[str, Any] = {"200": {"description": "success", "content": answer}}
    for status in errors:
        responses[str(status)] = {"description": STATUS_TEXT[status], "content": _json(error_schema)}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": body}
    if security is not None:
        operation["security"] = security
    return operation


GEN = (400, 401, 404, 413, 429, 500, 503)
STORED = [{"name": "completion_id", "in": "path", "required": True, "schema": STR}]
SSE = {"text/event-stream": {"schema": STR}}


def _chat_op() -> dict[str, Any]:
    return _op(
        "OpenAI chat completion (SSE when stream)",
        {**_json(ref("ChatCompletion")), **SSE},
        body=_json(ref("ChatCompletionRequest")),
        errors=GEN,
    )


def _media_op(summary: str) -> dict[str, Any]:
    return _op(summary, {"image/png": {"schema": STR}}, body=_json({"type": "object"}), errors=(401, 404, 429))


PUBLIC: list[dict[str, list[str]]] = []
UI: list[dict[str, list[str]]] = [{"basic": []}]

PATHS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "post": _chat_op(),
        "get": {
            **_op(
                "Chat completions stored with store: true (model, metadata[key]=value, order (asc), limit, after)",
                _json({"type": "object"}),
                errors=(400, 401),
            ),
            "parameters": [
                {"name": "model", "in": "query", "schema": STR},
                {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                {"name": "limit", "in": "query", "schema": INT},
                {"name": "after", "in": "query", "schema": STR},
            ],
        },
    },
    "/v1/chat/completions/{completion_id}": {
        "get": {
            **_op("A stored chat completion", _json(ref("ChatCompletion")), errors=(401, 404)),
            "parameters": STORED,
        },
        "post": {
            **_op(
                "Replace a stored chat completion's metadata",
                _json(ref("ChatCompletion")),
                body=_json(obj({"metadata": {"type": ["object", "null"]}}, ("metadata",))),
                errors=(400, 401, 404),
            ),
            "parameters": STORED,
        },
        "delete": {
            **_op("Delete a stored chat completion", _json({"type": "object"}), errors=(401, 404)),
            "parameters": STORED,
        },
    },
    "/v1/chat/completions/{completion_id}/messages": {
        "get": {
            **_op(
                "A stored chat completion's request messages (order, limit, after)",
                _json({"type": "object"}),
                errors=(400, 401, 404),
            ),
            "parameters": STORED,
        }
    },
    "/api/v1/chat/completions": {"post": _chat_op()},
    "/v1/completions": {
        "post": _op(
            "OpenAI text completion (SSE when stream)",
            {**_json(ref("Completion")), **SSE},
            body=_json(ref("CompletionRequest")),
            errors=GEN,
        )
    },
    "/v1/embeddings": {
        "post": _op(
            "OpenAI embeddings: each input's final hidden states pooled (--pooling: last token or mean)",
            _json(ref("EmbeddingList")),
            body=_json(ref("EmbeddingRequest")),
            errors=GEN,
        )
    },
    "/v1/responses": {
        "post": _op(
            "OpenAI Responses API (SSE semantic events when stream)",
            {**_json(ref("Response")), **SSE},
            body=_json(ref("ResponseRequest")),
            errors=GEN,
        )
    },
    "/v1/responses/{response_id}": {
        "get": {
            **_op(
                "A response as far as it has come; with stream, a background response's events after starting_after",
                {**_json(ref("Response")), **SSE},
                errors=(400, 401, 404),
            ),
            "parameters": [
                {"name": "response_id", "in": "path", "required": True, "schema": STR},
                {"name": "stream", "in": "query", "schema": BOOL},
                {"name": "starting_after", "in": "query", "schema": INT},
                {
                    "name": "include",
                    "in": "query",
                    "schema": {"type": "array", "items": STR},
                    "description": "message.output_text.logprobs keeps a response's logprobs while it is answered "
                    "(none are stored); any other value is accepted and changes nothing",
                },
            ],
        },
        "delete": {
            **_op(
                "Delete a stored response (a running background one is cancelled)",
                _json({"type": "object"}),
                errors=(400, 401, 404),
            ),
            "parameters": [{"name": "response_id", "in": "path", "required": True, "schema": STR}],
        },
    },
    "/v1/responses/{response_id}/cancel": {
        "post": {
            **_op("Cancel a background response", _json(ref("Response")), errors=(400, 401, 404)),
            "parameters": [{"name": "response_id", "in": "path", "required": True, "schema": STR}],
        },
    },
    "/v1/responses/{response_id}/input_items": {
        "get": {
            **_op(
                "A stored response's input items (order, limit, after)",
                _json({"type": "object"}),
                errors=(400, 401, 404),
            ),
            "parameters": [
                {"name": "response_id", "in": "path", "required": True, "schema": STR},
                {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                {"name": "limit", "in": "query", "schema": INT},
                {"name": "after", "in": "query", "schema": STR},
            ],
        }
    },
    "/tokenize": {
        "post": _op(
            "Text or a chat → token ids (vLLM's and llama.cpp's shapes)",
            _json(ref("Tokenized")),
            body=_json(ref("TokenizeRequest")),
            errors=(400, 401, 404, 503),
        )
    },
    "/apply-template": {
        "post": _op(
            "A chat → the prompt text it is answered from (llama.cpp's), to edit and send to /completion",
            _json(ref("AppliedTemplate")),
            body=_json(ref("ApplyTemplateRequest")),
            errors=(400, 401, 404, 503),
        )
    },
    "/detokenize": {
        "post": _op(
            "Token ids → text (vLLM's prompt and llama.cpp's content)",
            _json(ref("Detokenized")),
            body=_json(ref("DetokenizeRequest")),
            errors=(400, 401, 404, 503),
        )
    },
    "/v1/models": {"get": _op("The served model", _json(ref("ModelList")), errors=(401,))},
    "/v1/models/{model_id}": {
        "get": {
            **_op("One served model by id (ids may hold '/'); 404 for another", _json(ref("Model")), errors=(401, 404)),
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": STR}],
        }
    },
    "/v1/images/generations": {"post": _media_op("Image generation: 404 until an image model is loaded")},
    "/api/v1/image": {"post": _media_op("Image generation (Cake legacy): 404 until an image model is loaded")},
    "/v1/audio/speech": {"post": _media_op("Text to speech: 404 until an audio model is loaded")},
    "/api/v1/topology": {
        "get": _op("Cluster topology and live figures", _json(ref("Topology")), errors=(401,), security=UI)
    },
    "/": {
        "get": _op(
            "Web UI: chat and live topology dashboard", {"text/html": {"schema": STR}}, errors=(401,), security=UI
        )
    },
    "/static/{name}": {
        "get": {
            **_op(
                "A file of the web UI (script or style)",
                {"text/javascript": {"schema": STR}},
                errors=(401, 404),
                security=UI,
            ),
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": STR}],
        }
    },
    "/generate": {
        "post": _op(
            "Native generation: JSON (seed 001, SSE when stream) or multipart form (seed 000, NDJSON when streaming)",
            {
                **_json({"oneOf": [ref("GenerateResponse"), ref("GenerateFormResponse")]}),
                "text/event-stream": {"schema": ref("NativeStreamEvent")},
                "application/x-ndjson": {"schema": ref("GenerateFormEvent")},
            },
            body={**_json(ref("GenerateRequest")), "multipart/form-data": {"schema": ref("GenerateForm")}},
            errors=GEN,
            detail=True,
        )
    },
    "/chat": {
        "post": _op(
            "Native chat (SSE when stream)",
            {**_json(ref("ChatResponse")), **SSE},
            body=_json(ref("ChatRequest")),
            errors=GEN,
            detail=True,
        )
    },
    "/generate/batch": {
        "post": _op(
            "Several prompts, generated concurrently",
            _json(ref("BatchResponse")),
            body=_json(ref("BatchRequest")),
            errors=GEN,
            detail=True,
        )
    },
    "/models/load": {
        "post": _op(
            "Switch the served model across the cluster",
            _json(ref("CurrentModel")),
            body=_json(ref("LoadRequest")),
            errors=(400, 401, 404, 500, 503),
            detail=True,
        )
    },
    "/models/current": {"get": _op("The served model", _json(ref("CurrentModel")), errors=(401,), detail=True)},
    "/models/available": {
        "get": _op(
            "Embedded, configured and HF-cached models", _json(ref("AvailableModels")), errors=(401,), detail=True
        )
    },
    "/models/unload": {
        "post": _op(
            "Unload the served model",
            _json(obj({"status": STR, "model_id": STR})),
            errors=(401, 404, 503),
            detail=True,
        )
    },
    "/system/info": {
        "get": _op(
            "Master and workers: CPU, RAM, accelerator, versions", _json(ref("SystemInfo")), errors=(401,), detail=True
        )
    },
    "/health": {"get": _op("200 while every stage is up, 503 otherwise", _json(ref("Health")), security=PUBLIC)},
    "/v1/health": {"get": _op("llama.cpp's name for /health", _json(ref("Health")), security=PUBLIC)},
    "/ping": {
        method: _op("vLLM's name for /health", _json(ref("Health")), security=PUBLIC) for method in ("get", "post")
    },
    "/version": {"get": _op("vLLM's: the server's version", _json(obj({"version": STR})), security=PUBLIC)},
    "/metrics": {"get": _op("Prometheus metrics", {"text/plain": {"schema": STR}}, errors=(401,))},
    "/openapi.json": {"get": _op("This document", _json({"type": "object"}), errors=(401,))},
    "/v1/messages": {
        "post": _op(
            "Anthropic's Messages API (SSE events when stream), answered by the chat route",
            {**_json({"type": "object", "description": "Anthropic's Message"}), **SSE},
            body=_json(
                obj(
                    {
                        "model": STR,
                        "max_tokens": INT,
                        "messages": {"type": "array", "items": {"type": "object"}},
                        "system": {"oneOf": [STR, {"type": "array", "items": {"type": "object"}}]},
                        "stop_sequences": {"type": "array", "items": STR},
                        "stream": BOOL,
                        "tools": {"type": "array", "items": {"type": "object"}},
                        "tool_choice": {"type": "object"},
                        "output_config": {"type": "object"},
                    },
                    ("model", "max_tokens", "messages"),
                )
            ),
            errors=GEN,
        )
    },
    "/v1/messages/count_tokens": {
        "post": _op(
            "Anthropic's token count of a Messages request (system, messages, tools)",
            _json(obj({"input_tokens": INT})),
            body=_json({"type": "object"}),
            errors=(400, 401, 404, 503),
        )
    },
    **openapi_files.paths(_op, _json),
    **openapi_conversations.paths(_op, _json),
    **openapi_llama.paths(_op, _json, SSE, GEN),
    **openapi_scores.paths(_op, _json, GEN),
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cake_py",
            "version": __version__,
            "description": "Distributed LLM inference: OpenAI-compatible, Cake and native APIs.",
        },
        "paths": PATHS,
        "components": {
            "schemas": {
                **SCHEMAS,
                **openapi_native.SCHEMAS,
                **openapi_files.SCHEMAS,
                **openapi_conversations.SCHEMAS,
                **openapi_llama.SCHEMAS,
                **openapi_scores.SCHEMAS,
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
            },
        },
        "security": [{"bearer": []}],
    }


async def openapi(request: Request) -> Response:
    return JSONResponse(document())


ROUTES = [Route("/openapi.json", openapi, methods=["GET"])]
