"""OpenAI's Batch API: POST /v1/batches (a JSONL file of requests, uploaded with purpose `batch`, run against one of
`batch_objects.ENDPOINTS`), GET /v1/batches (`limit` up to 100, `after`), GET /v1/batches/{id},
POST /v1/batches/{id}/cancel. `batch_runner.BatchRunner` runs them."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.batch_objects import ENDPOINTS, TERMINAL, Batch
from cake_py.api.batch_runner import BatchRunner
from cake_py.api.errors import ApiError
from cake_py.api.listing import list_page
from cake_py.api.schemas import json_body
from cake_py.api.state import ServerState

MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's bounds


def _runner(request: Request) -> BatchRunner:
    state: ServerState = request.app.state.cake
    assert state.batches is not None  # create_app sets it
    return state.batches


def _batch(request: Request) -> Batch:
    batch_id = request.path_params["batch_id"]
    batch = _runner(request).get(batch_id)
    if batch is None:
        raise ApiError(404, f"no batch with id {batch_id!r}"[:300])
    return batch


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS:
        raise ApiError(400, f"metadata must be an object of at most {MAX_METADATA_KEYS} string values")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY or not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            raise ApiError(
                400,
                f"metadata[{key[:80]!r}]: keys are at most {MAX_METADATA_KEY} characters, values strings of at most "
                f"{MAX_METADATA_VALUE}",
            )
    return dict(value)


async def create_batch(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    body = await json_body(request)
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise ApiError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}"[:300])
    if body.get("completion_window") != "24h":
        raise ApiError(400, f"completion_window must be '24h', got {body.get('completion_window')!r}"[:300])
    metadata = _metadata(body.get("metadata"))
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str):
        raise ApiError(400, "input_file_id (the id of a file uploaded with purpose batch) is missing")
    try:
        stored = await run_in_threadpool(state.files.get, input_file_id)
    except KeyError:
        raise ApiError(400, f"input_file_id: no file with id {input_file_id!r}"[:300]) from None
    if stored.purpose != "batch":
        raise ApiError(400, f"input file {input_file_id!r} was uploaded with purpose {stored.purpose!r}, not 'batch'")
    batch = await _runner(request).create(endpoint, input_file_id, metadata, state.model_name)
    return JSONResponse(batch.to_json())


async def list_batches(request: Request) -> Response:
    batches = [batch.to_json() for batch in _runner(request).all()]
    return JSONResponse(list_page(request.query_params, batches, what="batch", ordered=False))


async def retrieve_batch(request: Request) -> Response:
    return JSONResponse(_batch(request).to_json())


async def cancel_batch(request: Request) -> Response:
    batch = _batch(request)
    if batch.status in TERMINAL and batch.status != "cancelled":
        raise ApiError(400, f"batch {batch.id!r} cannot be cancelled: its status is {batch.status}")
    await _runner(request).cancel(batch)
    return JSONResponse(batch.to_json())


ROUTES = [
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", retrieve_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
]
