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
import time
import uuid
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.embeddings import MAX_INPUTS
from cake_py.api.errors import ApiError, retry_headers
from cake_py.api.json_body import json_body
from cake_py.api.middleware import request_caller
from cake_py.api.schemas import flag
from cake_py.api.state import ServerState
from cake_py.errors import ContextLengthError

# Passed on to /v1/embeddings as they are (the embedding's options the scores depend on, and scheduling).
PASSED = ("truncate_prompt_tokens", "priority", "add_special_tokens")


def _texts(value: Any, name: str) -> list[str]:
    """A string or a list of strings (rerank's documents may be `{"text": …}` objects), none empty, at most
    MAX_INPUTS (each is a pair to score)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ApiError(400, f"{name} must be a string or a non-empty list of strings, got {value!r}"[:300])
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"{name} holds {len(items)} texts; at most {MAX_INPUTS} are allowed per request")
    texts = []
    for index, item in enumerate(items):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text:
            raise ApiError(400, f"{name}[{index}] must be a non-empty string, got {item!r}"[:300])
        texts.append(text)
    return texts


async def _embedded(
    request: Request, body: dict[str, Any], fields: dict[str, list[str]]
) -> tuple[dict[str, torch.Tensor], int]:
    """Each distinct text's embedding (of `fields`: the request's text fields by name), and the prompt tokens they
    took."""
    distinct = list(dict.fromkeys(text for texts in fields.values() for text in texts))
    state: ServerState = request.app.state.cake
    assert state.routes is not None  # create_app sets it
    vectors: dict[str, torch.Tensor] = {}
    tokens = 0
    # In requests of at most MAX_INPUTS (the embeddings route's limit): each field may hold that many on its own.
    for start in range(0, len(distinct), MAX_INPUTS):
        chunk = distinct[start : start + MAX_INPUTS]
        ask = {"input": chunk, "encoding_format": "base64", **{key: body[key] for key in PASSED if key in body}}
        status, answer = await state.routes.post("/v1/embeddings", ask, request.receive, request_caller(request))
        if status != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            code = answer.get("code") if isinstance(answer, dict) else None
            if code == "context_length_exceeded":
                raise ApiError(400, await _too_long(state, fields, str(error)), code=code)
            message = str(error or f"the embeddings failed ({status})")
            raise ApiError(status, message, code=code, headers=retry_headers(status))

        def decode(answer: dict[str, Any] = answer, chunk: list[str] = chunk) -> dict[str, torch.Tensor]:
            vectors = {}
            for item in answer["data"]:
                raw = base64.b64decode(item["embedding"])
                vectors[chunk[item["index"]]] = torch.frombuffer(bytearray(raw), dtype=torch.float32)
            return vectors

        vectors.update(await run_in_threadpool(decode))
        tokens += int(answer["usage"]["prompt_tokens"])
    return vectors, tokens


async def _too_long(state: ServerState, fields: dict[str, list[str]], error: str) -> str:
    """The embeddings' context error, naming the text it is about (the route only saw a list of inputs)."""
    source, engine = state.source, state.engine
    if source is None or engine is None:
        return error

    def too_long(text: str) -> bool:
        try:
            return len(source.tokenizer.encode(text)) > engine.context_length
        except ContextLengthError:  # too long to be worth tokenizing
            return True

    def first_too_long() -> str | None:
        for name, texts in fields.items():
            for index, text in enumerate(texts):
                if too_long(text):
                    return name if name == "query" else f"{name}[{index}]"
        return None

    where = await run_in_threadpool(first_too_long)
    return f"{where}: {error}" if where else error


def cosines(vectors: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> list[float]:
    """Each pair's cosine similarity, in one batched computation; a 500 if an embedding is not finite."""
    first = torch.stack([vectors[a] for a, _ in pairs])
    second = torch.stack([vectors[b] for _, b in pairs])
    scores = torch.nn.functional.cosine_similarity(first.double(), second.double(), dim=1)
    if not bool(torch.isfinite(scores).all()):
        raise ApiError(500, "the model's embeddings hold values that are not finite numbers")
    return [float(score) for score in scores.clamp(-1.0, 1.0)]  # rounding put a text against itself past 1


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
    vectors, tokens = await _embedded(request, body, {"text_1": first, "text_2": second})
    state: ServerState = request.app.state.cake
    model = state.model_name

    def answer() -> Response:  # off the event loop: thousands of pairs take a while to score and write out
        data = [
            {"index": index, "object": "score", "score": value} for index, value in enumerate(cosines(vectors, pairs))
        ]
        return JSONResponse(
            {
                "id": f"score-{uuid.uuid4().hex[:24]}",
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return await run_in_threadpool(answer)


async def rerank(request: Request) -> Response:
    body = await json_body(request)
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise ApiError(400, f"query must be a non-empty string, got {query!r}"[:300])
    documents = _texts(body.get("documents"), "documents")
    top_n = body.get("top_n")  # absent, null (LangChain's JinaRerank sends it) or 0: every document
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise ApiError(400, f"top_n must be a non-negative integer (0: every document), got {top_n!r}"[:300])
    with_documents = flag(body, "return_documents", True)
    vectors, tokens = await _embedded(request, body, {"query": [query], "documents": documents})
    state: ServerState = request.app.state.cake
    model = state.model_name

    def answer() -> Response:  # off the event loop, as score's
        scores = cosines(vectors, [(query, text) for text in documents])
        ranked = sorted(range(len(documents)), key=lambda index: -scores[index])[: top_n or None]
        results = []
        for index in ranked:
            result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
            if with_documents:
                result["document"] = {"text": documents[index]}
            results.append(result)
        return JSONResponse(
            {
                "id": f"rerank-{uuid.uuid4().hex[:24]}",
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "results": results,
            }
        )

    return await run_in_threadpool(answer)


ROUTES = [
    Route("/v1/score", score, methods=["POST"]),
    Route("/score", score, methods=["POST"]),
    Route("/v1/rerank", rerank, methods=["POST"]),
    Route("/rerank", rerank, methods=["POST"]),
    Route("/v2/rerank", rerank, methods=["POST"]),
    Route("/reranking", rerank, methods=["POST"]),  # llama.cpp's names
    Route("/v1/reranking", rerank, methods=["POST"]),
]
