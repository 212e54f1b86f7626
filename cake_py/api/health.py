"""/health: 200 while every stage of the served pipeline is up, 503 otherwise (seeds 000–002)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py import __version__
from cake_py.api.state import ServerState


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    engine = state.engine
    stages = engine.pipeline.stages if engine else []
    down = [stage.name for stage in stages if not stage.healthy()]
    body = {
        "status": "unhealthy" if down else "healthy",
        "running": engine is not None and not down,
        "model": state.model_name if state.source else None,
        "version": __version__,
        "uptime_seconds": round(time.time() - state.started, 1),
        "stages": [{"name": s.name, "layers": [s.start, s.end], "up": s.name not in down} for s in stages],
    }
    if down:
        body["error"] = f"pipeline stage(s) down: {', '.join(down)}"
    return JSONResponse(body, status_code=503 if down else 200)


ROUTES = [Route("/health", health, methods=["GET"])]
