"""OpenAI's Batch API: POST /v1/batches (a JSONL file of requests, uploaded with purpose `batch`, run against one of
`batch_objects.ENDPOINTS`), GET /v1/batches (`limit` up to 100, `after`), GET /v1/batches/{id},
POST /v1/batches/{id}/cancel. `batch_runner.BatchRunner` runs them."""

from __future__ import annotations

import secrets
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.batch_objects import ENDPOINTS, TERMINAL, Batch
from cake_py.api.batch_runner import COMPLETION_WINDOW_S, BatchRunner
from cake_py.api.errors import ApiError
from cake_py.api.file_store import MAX_TTL_S, MIN_TTL_S
from cake_py.api.json_body import json_body
from cake_py.api.listing import list_page
from cake_py.api.middleware import request_key_name, request_owner
from cake_py.api.schemas import metadata_field
from cake_py.api.state import ServerState


def _runner(request: Request) -> BatchRunner:
    state: ServerState = request.app.state.cake
    assert state.batches is not None  # create_app sets it
    return state.batches


def _batch(request: Request) -> Batch:
    batch_id = request.path_params["batch_id"]
    batch = _runner(request).get(batch_id)
    if batch is None or batch.owner != request_owner(request):  # another key's is not found
        raise ApiError(404, f"no batch with id {batch_id!r}"[:300])
    return batch


def _output_ttl(value: Any) -> int | None:
    """OpenAI's `output_expires_after` ({anchor: created_at, seconds}): how long the result files are kept."""
    if value is None:
        return None
    seconds = value.get("seconds") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise ApiError(400, f"output_expires_after must be {{anchor: 'created_at', seconds}}, got {value!r}"[:300])
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not MIN_TTL_S <= seconds <= MAX_TTL_S:
        raise ApiError(400, f"output_expires_after.seconds must be from {MIN_TTL_S} to {MAX_TTL_S}, got {seconds!r}")
    return seconds


async def create_batch(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    body = await json_body(request)
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise ApiError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}"[:300])
    if body.get("completion_window") != "24h":
        raise ApiError(400, f"completion_window must be '24h', got {body.get('completion_window')!r}"[:300])
    metadata = metadata_field(body.get("metadata"))
    output_ttl = _output_ttl(body.get("output_expires_after"))
    input_file_id = body.get("input_file_id")
    if input_file_id is None:
        raise ApiError(400, "input_file_id (the id of a file uploaded with purpose batch) is missing")
    if not isinstance(input_file_id, str):
        raise ApiError(400, f"input_file_id must be a file id (a string), got {input_file_id!r}"[:300])
    owner = request_owner(request)
    try:
        stored = await run_in_threadpool(state.files.get, input_file_id)
    except KeyError:
        stored = None
    if stored is None or stored.owner != owner:  # another key's file is not found
        raise ApiError(400, f"input_file_id: no file with id {input_file_id!r}"[:300])
    if stored.purpose != "batch":
        raise ApiError(400, f"input file {input_file_id!r} was uploaded with purpose {stored.purpose!r}, not 'batch'")
    created_ns = time.time_ns()
    now = created_ns // 1_000_000_000
    batch = Batch(
        id=f"batch_{secrets.token_hex(12)}",
        endpoint=endpoint,
        input_file_id=input_file_id,
        created_at=now,
        created_ns=created_ns,
        expires_at=now + COMPLETION_WINDOW_S,
        model=state.model_name,
        metadata=metadata,
        output_ttl_s=output_ttl,
        owner=owner,
        key_name=request_key_name(request),
    )
    await _runner(request).create(batch)
    return JSONResponse(batch.to_json())


async def list_batches(request: Request) -> Response:
    owner = request_owner(request)
    batches = [batch.to_json() for batch in _runner(request).all() if batch.owner == owner]
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
