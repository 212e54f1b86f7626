"""/health (seeds 000–002; llama.cpp's /v1/health too): 200 `{"status": "healthy", "running": true, …}` while
every stage of the served pipeline is up; 503 when a stage is down, the model is being switched, or no model is
loaded. Never behind the API key, nor are vLLM's /ping (the same probe) and /version."""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py import __version__
from cake_py.api.failover import left_out
from cake_py.api.state import ServerState
from cake_py.engine.faults import ENGINE_DEAD


def health_document(state: ServerState) -> tuple[dict[str, object], int]:
    engine = state.engine
    stages = engine.pipeline.stages if engine else []
    # Read once per stage, not by name: the master's stages all share the name "master".
    up = [stage.healthy() for stage in stages]
    down = [stage.name for stage, stage_up in zip(stages, up, strict=True) if not stage_up]
    switching = state.switching
    died = engine is not None and engine.died
    # No model (unloaded, or a load that failed to bring the previous one back): nothing can be served.
    empty = engine is None and not switching
    status = "loading" if switching else "unhealthy" if down or died or empty else "healthy"
    body: dict[str, object] = {
        "status": status,
        "running": engine is not None and not down and not switching and not died,
        "model": state.model_name if state.source else None,
        "version": __version__,
        "uptime_seconds": round(time.time() - state.started, 1),
        "stages": [
            {"name": stage.name, "layers": [stage.start, stage.end], "up": stage_up}
            for stage, stage_up in zip(stages, up, strict=True)
        ],
    }
    if state.failover is not None:  # --failover-after: configured workers the served placement goes without
        body["left_out"] = left_out(state)
    if died:
        body["error"] = ENGINE_DEAD
    elif down:
        assert engine is not None
        body["error"] = f"pipeline stage(s) down: {engine.pipeline.down_with_reasons(up)}"
    elif switching:
        body["error"] = f"the server is {switching}"
    elif empty:
        body["error"] = state.restore_error or "No text model loaded: load one with POST /models/load"
    return body, 503 if down or switching or died or empty else 200


async def health(request: Request) -> Response:
    # A remote stage's health may ask its worker, so it is read off the event loop.
    body, status = await run_in_threadpool(health_document, request.app.state.cake)
    return JSONResponse(body, status_code=status)


async def version(request: Request) -> Response:
    """vLLM's GET /version."""
    return JSONResponse({"version": __version__})


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/v1/health", health, methods=["GET"]),  # llama.cpp's other name for it
    Route("/ping", health, methods=["GET", "POST"]),  # vLLM's (SageMaker's) name for the same probe
    Route("/version", version, methods=["GET"]),
]
