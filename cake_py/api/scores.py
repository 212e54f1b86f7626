"""vLLM's scoring routes for an embedding model: POST /v1/score (and /score) and the Jina/Cohere-style rerank,
POST /v1/rerank (and /rerank, /v2/rerank).

As vLLM scores with an embedding model, a pair's score is the cosine similarity of the two texts' embeddings; the
embeddings come from this server's own /v1/embeddings route, called in process (the same pooling, batching through
every worker, context checks and errors), each distinct text embedded once.

- /v1/score: `text_1` and `text_2`, each a string or a list of strings: one against one, one against each of a list,
  or two lists of the same length pair by pair. `data` holds a score per pair, in order.
- /v1/rerank: a `query` and `documents` (strings, or `{"text": …}` objects); `results` are the documents by
  `relevance_score`, highest first, the best `top_n` (0 or absent: all), each with its `index` and, unless
  `return_documents` is false, its `document`.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.embeddings import MAX_INPUTS
from cake_py.api.errors import ApiError
from cake_py.api.middleware import request_caller
from cake_py.api.schemas import flag, json_body
from cake_py.api.state import ServerState

# Passed on to /v1/embeddings as they are (the embedding's options the scores depend on, and scheduling).
PASSED = ("truncate_prompt_tokens", "priority", "add_special_tokens")


def _texts(value: Any, name: str) -> list[str]:
    """A string or a list of strings (rerank's documents may be `{"text": …}` objects), none empty."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ApiError(400, f"{name} must be a string or a non-empty list of strings, got {value!r}"[:300])
    texts = []
    for index, item in enumerate(items):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text:
            raise ApiError(400, f"{name}[{index}] must be a non-empty string, got {item!r}"[:300])
        texts.append(text)
    return texts


async def _embedded(request: Request, body: dict[str, Any], texts: list[str]) -> tuple[dict[str, list[float]], int]:
    """Each distinct text's unit vector, and the prompt tokens they took."""
    distinct = list(dict.fromkeys(texts))
    if len(distinct) > MAX_INPUTS:
        raise ApiError(400, f"the request holds {len(distinct)} distinct texts; at most {MAX_INPUTS} are allowed")
    state: ServerState = request.app.state.cake
    assert state.routes is not None  # create_app sets it
    ask = {"input": distinct, "encoding_format": "base64", **{key: body[key] for key in PASSED if key in body}}
    status, answer = await state.routes.post("/v1/embeddings", ask, request.receive, request_caller(request))
    if status != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        raise ApiError(status, str(error or f"the embeddings failed ({status})"), headers=_retry(status))

    def decode() -> dict[str, list[float]]:
        vectors = {}
        for item in answer["data"]:
            raw = base64.b64decode(item["embedding"])
            vectors[distinct[item["index"]]] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        return vectors

    return await run_in_threadpool(decode), int(answer["usage"]["prompt_tokens"])


def _retry(status: int) -> dict[str, str] | None:
    return {"Retry-After": "5"} if status in (429, 503) else None


def cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norms = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    return dot / norms if norms else 0.0


async def score(request: Request) -> Response:
    body = await json_body(request)
    first, second = _texts(body.get("text_1"), "text_1"), _texts(body.get("text_2"), "text_2")
    if len(first) == 1:
        pairs = [(first[0], text) for text in second]
    elif len(first) == len(second):
        pairs = list(zip(first, second, strict=True))
    else:
        raise ApiError(
            400, f"text_1 holds {len(first)} texts and text_2 {len(second)}: give one text_1, or as many as text_2"
        )
    vectors, tokens = await _embedded(request, body, [*first, *second])
    scores = await run_in_threadpool(lambda: [cosine(vectors[a], vectors[b]) for a, b in pairs])
    state: ServerState = request.app.state.cake
    return JSONResponse(
        {
            "id": f"score-{uuid.uuid4().hex[:24]}",
            "object": "list",
            "created": int(time.time()),
            "model": state.model_name,
            "data": [{"index": index, "object": "score", "score": value} for index, value in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def rerank(request: Request) -> Response:
    body = await json_body(request)
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise ApiError(400, f"query must be a non-empty string, got {query!r}"[:300])
    documents = _texts(body.get("documents"), "documents")
    top_n = body.get("top_n", 0)
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise ApiError(400, f"top_n must be a non-negative integer (0: every document), got {top_n!r}"[:300])
    with_documents = flag(body, "return_documents", True)
    vectors, tokens = await _embedded(request, body, [query, *documents])
    scores = await run_in_threadpool(lambda: [cosine(vectors[query], vectors[text]) for text in documents])
    ranked = sorted(range(len(documents)), key=lambda index: -scores[index])[: top_n or None]
    results = []
    for index in ranked:
        result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
        if with_documents:
            result["document"] = {"text": documents[index]}
        results.append(result)
    state: ServerState = request.app.state.cake
    return JSONResponse(
        {
            "id": f"rerank-{uuid.uuid4().hex[:24]}",
            "model": state.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": results,
        }
    )


ROUTES = [
    Route("/v1/score", score, methods=["POST"]),
    Route("/score", score, methods=["POST"]),
    Route("/v1/rerank", rerank, methods=["POST"]),
    Route("/rerank", rerank, methods=["POST"]),
    Route("/v2/rerank", rerank, methods=["POST"]),
]
