"""The Starlette app factory: routes of every surface, the middleware stack, exception handlers, and the engine's
lifetime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import BaseRoute

from cake_py.api import (
    anthropic,
    batches,
    chat_store,
    completions,
    conversations,
    embeddings,
    files,
    health,
    infill,
    llama_completion,
    management,
    media,
    metrics,
    native,
    openai,
    openapi,
    responses,
    scores,
    system,
    tokens,
    topology,
    web,
)
from cake_py.api.batch_runner import BatchRunner
from cake_py.api.errors import EXCEPTION_HANDLERS, InternalErrorMiddleware
from cake_py.api.failover import Failover
from cake_py.api.inprocess import Routes
from cake_py.api.metrics import ApiMetrics, MetricsMiddleware
from cake_py.api.middleware import AuthMiddleware, BodyLimitMiddleware, RateLimitMiddleware
from cake_py.api.state import ServerState
from cake_py.config import ServeSettings


def _cors(settings: ServeSettings) -> list[Middleware]:
    """Browser pages from these origins may call the API (CORS). By default any origin may when an API key guards the
    server (as vLLM and llama.cpp's server allow), none when nothing does: any site a user visits could read an open
    server on their machine. No credentials: a key is a header the page sets, never a cookie the browser adds."""
    origins = settings.allowed_origins
    if origins is None:
        origins = ("*",) if settings.api_keys else ()
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    ]


def create_app(state: ServerState) -> Starlette:
    """The app serving `state`: every surface, the middleware stack and the JSON error handlers."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if state.engine is not None:
            state.engine.start()
        assert state.batches is not None
        await state.batches.start()  # batches a stopped server had not finished go on
        if state.failover is not None:
            state.failover.start()
        try:
            yield
        finally:
            if state.restore_task is not None:  # a previous model being brought back: not any more
                state.restore_task.cancel()
            if state.failover is not None:
                await state.failover.stop()  # before anything stops: a stage it sees down would start a placement
            await state.batches.stop()  # before the engine stops: a request it ends would count as failed
            await state.responses.stop_background()  # each run stores itself cancelled and leaves the engine
            if state.engine is not None:  # the engine serving now: a /models/load may have replaced the first one
                await run_in_threadpool(state.engine.close)  # joins the engine thread: never on the event loop

    routes: list[BaseRoute] = [
        *health.ROUTES,
        *openai.ROUTES,
        *anthropic.ROUTES,
        *chat_store.ROUTES,
        *completions.ROUTES,
        *responses.ROUTES,
        *conversations.ROUTES,
        *embeddings.ROUTES,
        *scores.ROUTES,
        *files.ROUTES,
        *batches.ROUTES,
        *infill.ROUTES,
        *llama_completion.ROUTES,
        *tokens.ROUTES,
        *media.ROUTES,
        *topology.ROUTES,
        *native.ROUTES,
        *management.ROUTES,
        *system.ROUTES,
        *metrics.ROUTES,
        *openapi.ROUTES,
        *web.ROUTES,
    ]
    settings = state.settings
    state.metrics = ApiMetrics(state)
    # Outermost first: every request is counted, then authenticated, then rate limited, then size-checked.
    upload_limit = settings.max_file_bytes and settings.max_file_bytes + files.FORM_OVERHEAD_BYTES  # 0: none
    middleware = [
        # Outside the key check: a browser's preflight carries no key, and a 401 must still reach the page.
        *_cors(settings),
        Middleware(InternalErrorMiddleware),  # inside CORS (a page may read the 500), outside the rest (counted)
        Middleware(MetricsMiddleware, state=state, routes=routes),
        Middleware(
            AuthMiddleware,
            api_keys=settings.api_keys,
            ui_auth=settings.ui_auth,
            key_names=settings.api_key_names,
            admin_key=settings.admin_key,
        ),
        Middleware(RateLimitMiddleware, per_minute=settings.rate_limit, burst=settings.rate_burst),
        Middleware(
            BodyLimitMiddleware,
            max_bytes=settings.max_body_bytes,
            overrides={files.UPLOAD_PATH: upload_limit},
        ),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        lifespan=lifespan,
    )
    # A path with a stray trailing slash is a JSON 404 naming it: Starlette's redirect was an empty 307 to an absolute
    # URL (a body-less error, and one a client behind a proxy follows to the wrong host). No route here needs it.
    app.router.redirect_slashes = False
    app.state.cake = state
    # A batch's requests go to the routes and their error handlers, not through the middleware (auth, rate limit).
    state.routes = Routes(app, ExceptionMiddleware(app.router, handlers=EXCEPTION_HANDLERS))  # type: ignore[arg-type]
    concurrency = settings.batch_concurrency or max(1, settings.max_running // 2)
    if settings.failover_after > 0 and settings.workers:
        state.failover = Failover(state, settings.failover_after)
    state.batches = BatchRunner(settings.files_dir, state.files, state.routes, concurrency, settings.max_body_bytes)
    return app
