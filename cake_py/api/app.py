"""The Starlette app factory: routes of every surface, exception handlers, and the engine's lifetime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from cake_py.api import health, openai, topology
from cake_py.api.errors import EXCEPTION_HANDLERS
from cake_py.api.state import ServerState


def create_app(state: ServerState) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if state.engine is not None:
            state.engine.start()
        try:
            yield
        finally:
            if state.engine is not None:
                state.engine.stop()
                state.engine.pipeline.close()

    routes: list[BaseRoute] = [*health.ROUTES, *openai.ROUTES, *topology.ROUTES]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)  # type: ignore[arg-type]
    app.state.cake = state
    return app
