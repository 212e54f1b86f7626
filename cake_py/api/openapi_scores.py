"""The OpenAPI document's part for vLLM's scoring routes (`scores`): their paths and schemas, merged into
`openapi.PATHS` and `openapi_schemas.SCHEMAS`."""

from __future__ import annotations

from typing import Any

from cake_py.api.openapi_schemas import BOOL, INT, NUM, STR, obj, ref

TEXTS = {"oneOf": [STR, {"type": "array", "items": STR}]}
USAGE = obj({"prompt_tokens": INT, "total_tokens": INT})
EMBEDDING_OPTIONS = {"truncate_prompt_tokens": INT, "priority": INT, "add_special_tokens": BOOL}

SCHEMAS: dict[str, Any] = {
    "ScoreRequest": obj(
        {"model": STR, "text_1": TEXTS, "text_2": TEXTS, **EMBEDDING_OPTIONS},
        ("text_1", "text_2"),
    ),
    "Scores": obj(
        {
            "id": STR,
            "object": {"const": "list"},
            "created": INT,
            "model": STR,
            "data": {"type": "array", "items": obj({"index": INT, "object": {"const": "score"}, "score": NUM})},
            "usage": USAGE,
        }
    ),
    "RerankRequest": obj(
        {
            "model": STR,
            "query": STR,
            "documents": {"type": "array", "items": {"oneOf": [STR, obj({"text": STR})]}},
            "top_n": {**INT, "description": "the best n documents; 0 or absent: all"},
            "return_documents": {**BOOL, "default": True},
            **EMBEDDING_OPTIONS,
        },
        ("query", "documents"),
    ),
    "Reranked": obj(
        {
            "id": STR,
            "model": STR,
            "usage": USAGE,
            "results": {
                "type": "array",
                "items": obj({"index": INT, "relevance_score": NUM, "document": obj({"text": STR})}),
            },
        }
    ),
}


def paths(op: Any, json: Any, generation_errors: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """The routes, described with `openapi._op` and `openapi._json` (passed in: that module imports this one)."""
    score = op(
        "vLLM's score: the cosine similarity of text pairs' embeddings (one to one, one to many, or pairwise)",
        json(ref("Scores")),
        body=json(ref("ScoreRequest")),
        errors=generation_errors,
    )
    rerank = op(
        "Rerank (vLLM's, Jina's and Cohere's shape): documents by their embedding's cosine similarity to the query",
        json(ref("Reranked")),
        body=json(ref("RerankRequest")),
        errors=generation_errors,
    )
    return {
        "/v1/score": {"post": score},
        "/score": {"post": score},
        "/v1/rerank": {"post": rerank},
        "/rerank": {"post": rerank},
        "/v2/rerank": {"post": rerank},
        "/reranking": {"post": rerank},
        "/v1/reranking": {"post": rerank},
    }
