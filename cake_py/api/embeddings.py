"""OpenAI's POST /v1/embeddings: each input's final hidden states pooled into one vector by the engine.

Inputs join the engine's batches like any prompt (through every worker of a cluster); nothing is generated. The
pooling (`last` token or `mean`) is the server's (`--pooling`, else the model folder's sentence-transformers config,
else `last`); vectors are unit length unless the request sends vLLM's `normalize: false`. `encoding_format: base64`
is the vector's little-endian float32 bytes, as OpenAI's and what its Python client asks for by default.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, cast

import torch
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.errors import ApiError
from cake_py.api.middleware import request_key_name
from cake_py.api.schemas import flag, number
from cake_py.api.state import ServerState, generation_request
from cake_py.api.streaming import collect_all, open_streams
from cake_py.api.token_lists import only_ids, outside_vocabulary
from cake_py.engine.engine import Engine
from cake_py.errors import RequestError
from cake_py.models.hub import ModelSource
from cake_py.models.pooling import Pooling
from cake_py.models.sampling import SamplingParams

MAX_INPUTS = 2048  # OpenAI's limit per request (--max-queue may allow fewer)
ENCODINGS = ("float", "base64")


def embedding_inputs(body: dict[str, Any], field: str = "input") -> list[str | list[int]]:
    """`input` as OpenAI takes it: a string, a list of strings, a list of token ids, or a list of those lists."""
    value = body.get(field)
    if isinstance(value, str) or (only_ids(value) and value):
        inputs: list[Any] = [value]
    elif isinstance(value, list) and value:
        inputs = value
    else:
        raise ApiError(400, f"{field} must be a string, a list of strings or a list of token ids, got {value!r}"[:300])
    for index, item in enumerate(inputs):
        if not (isinstance(item, str) or only_ids(item)) or not item:
            raise ApiError(400, f"{field}[{index}] must be a non-empty string or list of token ids, got {item!r}"[:300])
    if len(inputs) > MAX_INPUTS:
        raise ApiError(400, f"{field} holds {len(inputs)} items; at most {MAX_INPUTS} are allowed per request")
    return inputs


def _truncation(body: dict[str, Any], context_length: int) -> int | None:
    """vLLM's truncate_prompt_tokens: keep each input's last k tokens (-1: as many as the context holds)."""
    value = body.get("truncate_prompt_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 1):
        raise ApiError(400, f"truncate_prompt_tokens must be -1 or a positive integer, got {value!r}"[:300])
    if value > context_length:
        raise ApiError(400, f"truncate_prompt_tokens ({value}) is larger than the context ({context_length} tokens)")
    return context_length if value == -1 else value


def _vector(data: bytes, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    return list(struct.unpack(f"<{len(data) // 4}f", data))


async def embeddings(request: Request) -> Response:
    state, engine, source, body = await generation_request(request)
    inputs = embedding_inputs(body)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise ApiError(400, f"encoding_format must be one of {', '.join(ENCODINGS)}, got {encoding!r}"[:300])
    size = source.config.hidden_size
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or dimensions != size):
        raise ApiError(
            400, f"dimensions ({dimensions!r}): this model's embeddings have {size} dimensions and cannot be shortened"
        )
    pooling = Pooling(state.pooling, normalize=flag(body, "normalize", True))
    vectors, n_tokens = await pooled(request, (state, engine, source, body), inputs, pooling)
    model = state.model_name

    def answer() -> Response:  # thousands of vectors take a while to write out: off the event loop
        data = [
            {"object": "embedding", "index": index, "embedding": _vector(vector, encoding)}
            for index, vector in enumerate(vectors)
        ]
        return JSONResponse(
            {
                "id": f"embd-{uuid.uuid4().hex[:24]}",
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": data,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            }
        )

    return await run_in_threadpool(answer)


async def pooled(
    request: Request,
    served: tuple[ServerState, Engine, ModelSource, dict[str, Any]],
    inputs: list[Any],
    pooling: Pooling,
) -> tuple[list[bytes], int]:
    """Each input's pooled vector (float32 bytes) and the prompt tokens read; the request's errors as 4xx."""
    state, engine, source, body = served
    tokenizer = source.tokenizer
    add_special_tokens = flag(body, "add_special_tokens", True)
    keep = _truncation(body, engine.context_length)

    def encode_all() -> list[list[int]]:
        return [
            # Truncating: a text of any length is cut to the context below, so it is not refused for its length.
            tokenizer.encode(item, add_special_tokens=add_special_tokens, check=keep is None)
            if isinstance(item, str)
            else list(item)
            for item in inputs
        ]

    prompts = await run_in_threadpool(encode_all)
    try:
        params = SamplingParams(max_tokens=0, pooling=pooling, priority=int(number(body, "priority", 0, integer=True)))
    except RequestError as error:
        raise ApiError(400, str(error)) from error
    vocab_size = tokenizer.vocab_size
    for index, ids in enumerate(prompts):
        if keep is not None:
            prompts[index] = ids = ids[-keep:]
        bad = outside_vocabulary(ids, vocab_size)
        if bad is not None:
            raise ApiError(400, f"input[{index}]: token id {bad} is outside the vocabulary [0, {vocab_size})")
        if not ids:
            raise ApiError(400, f"input[{index}] is empty once tokenized")
        engine.check_prompt(len(ids), params)  # ContextLengthError: a 400 with code context_length_exceeded
    streams = open_streams(state, engine, prompts, [params] * len(prompts), request_key_name(request))
    results = await collect_all(request, streams)
    vectors = [result.last.embedding for result in results]
    assert all(vector is not None for vector in vectors)
    return cast(list[bytes], vectors), sum(len(ids) for ids in prompts)


def _llama_normalized(data: bytes, kind: int) -> list[float]:
    """llama.cpp's `embd_normalize`: -1 none, 0 scaled so the largest magnitude is 32760 (int16's range), 1 taxicab,
    2 Euclidean, p > 2 the p-norm; a zero vector stays zero."""
    vector = torch.frombuffer(bytearray(data), dtype=torch.float32).double()
    if kind == -1:
        return vector.tolist()
    if kind == 0:
        norm = float(vector.abs().max()) / 32760.0
    else:
        norm = float(vector.abs().pow(kind).sum() ** (1.0 / kind))
    return (vector / norm if norm > 0 else vector * 0).tolist()


async def llama_embedding(request: Request) -> Response:
    """llama.cpp's POST /embedding (not OpenAI's shape): `content` (or `input`): a string, token ids, or a list of
    those; `embd_normalize` (2: Euclidean, the default). The answer is `[{"index": i, "embedding": [[…]]}]`: one row
    per input, pooled by --pooling (llama.cpp's shape for a server started with a pooling; its per-token rows, with
    pooling none, are not served)."""
    state, engine, source, body = await generation_request(request)
    field = "input" if "input" in body else "content"
    if field not in body:
        raise ApiError(400, '"input" or "content" must be provided')
    inputs = embedding_inputs(body, field)
    kind = body.get("embd_normalize", 2)
    if isinstance(kind, bool) or not isinstance(kind, int) or kind < -1:
        raise ApiError(
            400, f"embd_normalize must be -1 (none), 0 (max absolute), 1, 2 (Euclidean) or p > 2, got {kind!r}"[:300]
        )
    vectors, _ = await pooled(request, (state, engine, source, body), inputs, Pooling(state.pooling, normalize=False))

    def answer() -> Response:
        rows = [{"index": index, "embedding": [_llama_normalized(v, kind)]} for index, v in enumerate(vectors)]
        return JSONResponse(rows)

    return await run_in_threadpool(answer)


ROUTES = [
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/embedding", llama_embedding, methods=["POST"]),  # llama.cpp's own shape
    Route("/embeddings", llama_embedding, methods=["POST"]),  # llama.cpp's name for it too (not OpenAI's shape)
]
