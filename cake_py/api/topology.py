"""GET /api/v1/topology: answered from the event loop without touching torch, so it works mid-generation."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.errors import ApiError
from cake_py.api.failover import left_out
from cake_py.api.state import NO_TEXT_MODEL, ServerState
from cake_py.cluster.hostinfo import host_facts
from cake_py.cluster.topology import build_topology
from cake_py.engine.faults import ENGINE_DEAD


def live_figures(state: ServerState) -> dict[str, object]:
    engine, retired = state.counted  # together: see ServerState.counted
    if engine is None:
        return {}
    stats = engine.stats
    # Read fresh from the engine: stats.running/waiting and the rate are only updated by steps, so they go stale
    # (and would show a busy cluster) as soon as the engine goes idle.
    in_flight = engine.in_flight
    return {
        "tokens_per_second": round(engine.tokens_per_second(), 2),
        "requests_in_flight": in_flight,
        "queue_depth": engine.queue_depth,
        # For the process, like /metrics' counters: what the engines this one replaced counted too.
        "requests_total": retired.requests + stats.requests_total,
        "tokens_generated": retired.generated_tokens + stats.tokens_generated,
        "last_step_ms": round(stats.last_step_ms, 3),
    }


def topology_document(state: ServerState) -> dict[str, Any]:
    """The topology of the served model now; run off the event loop (host facts may ask the accelerator). 503 while
    /models/load or /models/unload runs (like /health's "loading"), 404 when no model is loaded."""
    if state.switching is not None:
        raise ApiError(503, f"the server is {state.switching}; retry shortly", headers={"Retry-After": "5"})
    engine, source = state.engine, state.source  # read once: a switch may replace them while this runs
    if engine is None or source is None:
        raise ApiError(404, NO_TEXT_MODEL)
    document = build_topology(
        source,
        state.model_name,
        state.dtype,
        engine.pipeline,
        host_facts(state.device, state.tflops),
        live_figures(state),
        master_error=ENGINE_DEAD if engine.died else None,
    )
    if state.failover is not None:  # workers a failover placement goes without: not stages of the pipeline
        document["left_out"] = left_out(state)
    return document


async def topology(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(topology_document, request.app.state.cake))


ROUTES = [Route("/api/v1/topology", topology, methods=["GET"])]
