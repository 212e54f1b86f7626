"""Seed 001's model management: /models/load, /models/current, /models/available, /models/unload.

A load resolves and checks the new model first (so a bad id, or a model that cannot fit where it would go when
the master serves alone, leaves the served model untouched), then stops the
old engine, closes its pipeline (freeing its layers on every stage), and builds the new pipeline across the same
cluster. The workers cannot hold both models, so when the new one fails to build (a broken weights file, a worker
gone), the old one is built again and served; the error says so. A load while a stage is down is refused before
anything is touched. Generation requests during the switch get 503; after an unload they get 404 "No text model
loaded".
Everything that touches torch or the disk runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.errors import ApiError, status_of
from cake_py.api.json_body import json_body
from cake_py.api.state import ServerState
from cake_py.cluster.master import assignments_of, check_master_holds_all, model_bytes
from cake_py.engine.engine import Engine
from cake_py.errors import CakeError, ClusterError, ModelError
from cake_py.models.device import release_device_memory, release_openmp_threads, torch_dtype
from cake_py.models.hf_cache import list_cached
from cake_py.models.hub import EMBEDDED_MODEL_ID, ModelSource, resolve_model

log = logging.getLogger(__name__)

RESTORE_FIRST_S = 5.0  # after a failed load that also lost the previous model: the first try to bring it back


def current_model(state: ServerState) -> dict[str, Any]:
    engine, source = state.engine, state.source
    if engine is None or source is None:
        return {"loaded": False, "model_id": None, "name": None}
    config = source.config
    return {
        "loaded": True,
        "model_id": source.model_id,
        # What /models/load takes to load it again: model_id is a local folder's name, not its path.
        "load_as": state.settings.model,
        "name": state.model_name,
        "architecture": config.architecture,
        "family": config.family,
        "n_layers": config.n_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "context_length": engine.context_length,
        "dtype": state.dtype,
        "device": state.device,
        "stages": [{"name": stage.name, "layers": [stage.start, stage.end]} for stage in engine.pipeline.stages],
    }


def retire(engine: Engine | None) -> None:
    """Stop an engine (its in-flight requests end with a 503) and free its layers and caches on every stage."""
    if engine is not None:
        engine.close()


def build_engine(state: ServerState, source: ModelSource, settings: Any) -> Engine:
    from cake_py.api.server import build_pipeline, make_engine

    pipeline = build_pipeline(settings, source, state.device, state.placed)
    state.placed |= assignments_of(pipeline)
    engine = make_engine(pipeline, source, settings)
    release_openmp_threads()  # this pool thread is done with torch; the engine thread must own the only pool
    engine.start()
    return engine


def _resolve(model_id: str | None) -> ModelSource:
    source = resolve_model(model_id)
    source.tokenizer  # noqa: B018 - read now, so a broken tokenizer fails the load before the old model is dropped
    from cake_py.api.server import warn_of_a_broken_template

    warn_of_a_broken_template(source)
    return source


def _check_fits_alone(state: ServerState, source: ModelSource) -> None:
    """Every layer loads here: refuse a model this process's memory cannot hold, counting what the current model
    frees, before that model is dropped (found later, it is the OOM killer ending the server)."""
    dtype = torch_dtype(state.settings.dtype)
    held = model_bytes(state.source, dtype, state.device) if state.source is not None else 0
    check_master_holds_all(source, dtype, state.device, held=held)


def _load_status(error: CakeError) -> int:
    """A model that cannot be read or built is the request's bad model: 400 (404 when there is none, 502 when the
    Hub fails to send it, 503 when the cluster cannot take it), not the server's 500."""
    status = status_of(error, detail_style=True)[0]
    return 400 if status == 500 and isinstance(error, ModelError) else status


def _busy(state: ServerState) -> ApiError:
    return ApiError(
        503,
        f"the server is already {state.switching or 'switching models'}; retry when it is done",
        headers={"Retry-After": "5"},  # as the generation routes answer during a switch
    )


async def load_model(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    body = await json_body(request)
    if "model_id" not in body:
        raise ApiError(400, "model_id is required: a Hub id, a local path, or null for the embedded default")
    model_id = body["model_id"]
    if model_id is not None and (not isinstance(model_id, str) or not model_id.strip()):
        raise ApiError(400, f"model_id must be a Hub id, a local path or null (the embedded default), got {model_id!r}")
    if state.switch_lock.locked():
        raise _busy(state)
    async with state.switch_lock:
        _stop_restoring(state)
        failover = state.failover  # with --failover-after, a load goes without the workers that do not answer
        # Every worker asked now: one that froze a moment ago still looks up, and switching would unload the model
        # that serves for one that cannot load.
        if (
            failover is None
            and state.engine is not None
            and (down := await run_in_threadpool(state.engine.pipeline.not_answering))
        ):
            raise ApiError(
                503,
                f"pipeline stage(s) down: {', '.join(down)}; {state.model_name!r} is still loaded. "
                "Load again once GET /health answers 200",
                headers={"Retry-After": "5"},
            )
        try:
            source = await run_in_threadpool(_resolve, model_id)
        except CakeError as error:
            raise ApiError(_load_status(error), str(error)) from error
        # --model-name and --chat-template are the startup model's; --max-model-len caps every model.
        settings = replace(state.settings, model=model_id, model_name=None, chat_template=None)
        left_out: set[str] = set()
        if failover is not None:
            settings, left_out = await run_in_threadpool(failover.load_settings, settings)
            if left_out:
                log.warning("loading %r without %s: not answering", source.model_id, failover.describe(left_out))
        if not settings.workers:
            try:
                await run_in_threadpool(_check_fits_alone, state, source)
            except ClusterError as error:
                kept = f"; {state.model_name!r} is still loaded" if state.source is not None else ""
                without = f"no worker answers ({failover.describe(left_out)}), and " if left_out and failover else ""
                raise ApiError(400, f"{without}{error}{kept}") from error
        state.switching = f"loading model {source.model_id!r}"
        try:
            old_engine, old_source, old_settings = state.engine, state.source, state.settings
            old_name = state.model_name
            state.engine, state.source = None, None
            await run_in_threadpool(retire, old_engine)
            state.recount(old_engine)  # what a step still running when it was replaced counted
            old_engine = None  # the new model must not load while this one still holds its memory
            await run_in_threadpool(release_device_memory, state.device)
            try:
                engine = await run_in_threadpool(build_engine, state, source, settings)
            except Exception as error:
                if old_source is None:
                    raise
                raise await _restore(state, old_source, old_settings, old_name, error) from error
            state.engine, state.source, state.settings = engine, source, settings
            state.remember(model_id)
            if failover is not None:
                failover.loaded(settings, left_out)
        finally:
            state.switching = None
    return JSONResponse({"status": "loaded", **current_model(state)})


async def _restore(state: ServerState, source: ModelSource, settings: Any, name: str, error: Exception) -> ApiError:
    """After a failed load, serve the previous model again; the ApiError to answer says what happened to it."""
    if isinstance(error, CakeError):
        status = _load_status(error)
    else:  # a bug: keep its traceback in the log
        log.error("loading a model failed", exc_info=error)
        status = 500
    await run_in_threadpool(release_device_memory, state.device)  # what the failed build placed
    try:
        engine = await run_in_threadpool(build_engine, state, source, settings)
    except Exception as restore_error:
        log.error("the previous model %r could not be loaded again: %s", name, restore_error)
        state.restore_error = f"the previous model {name!r} could not be loaded again ({restore_error}); retrying"
        state.restore_task = asyncio.get_running_loop().create_task(_keep_restoring(state, source, settings, name))
        return ApiError(
            status,
            f"{error}; the previous model {name!r} could not be loaded again ({restore_error}): none is loaded "
            "until it can be (tried again every few seconds, as when a worker comes back) or another is loaded",
        )
    state.engine, state.source, state.settings = engine, source, settings
    return ApiError(status, f"{error}; the previous model {name!r} is served again")


async def _keep_restoring(state: ServerState, source: ModelSource, settings: Any, name: str) -> None:
    """Bring the previous model back once it can be (a worker that died during the load is restarted): every
    RESTORE_FIRST_S, doubling to a minute, until it is served or a later load or unload decides otherwise."""
    delay = RESTORE_FIRST_S
    while True:
        await asyncio.sleep(delay)
        async with state.switch_lock:
            if state.restore_task is not asyncio.current_task() or state.engine is not None:
                return
            state.switching = f"loading model {name!r} again"
            try:
                await run_in_threadpool(release_device_memory, state.device)
                engine = await run_in_threadpool(build_engine, state, source, settings)
            except Exception as error:
                delay = min(delay * 2, 60.0)
                state.restore_error = f"the previous model {name!r} could not be loaded again ({error}); retrying"
                log.warning("the previous model %r still cannot be loaded: %s; next try in %.0f s", name, error, delay)
                continue
            finally:
                state.switching = None
            state.engine, state.source, state.settings = engine, source, settings
            state.restore_error, state.restore_task = None, None
            log.info("the previous model %r is served again", name)
            return


def _stop_restoring(state: ServerState) -> None:
    """A load or unload decides what is served: the previous model is no longer being brought back."""
    if state.restore_task is not None:
        state.restore_task.cancel()
    state.restore_error, state.restore_task = None, None


async def unload_model(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    if state.switch_lock.locked():
        raise _busy(state)
    async with state.switch_lock:
        _stop_restoring(state)
        if state.engine is None:
            raise ApiError(404, "No text model loaded")
        unloaded = state.model_name
        state.switching = f"unloading model {unloaded!r}"
        try:
            old, state.engine, state.source = state.engine, None, None
            await run_in_threadpool(retire, old)
            state.recount(old)
            del old
            await run_in_threadpool(release_device_memory, state.device)
        finally:
            state.switching = None
    return JSONResponse({"status": "unloaded", "model_id": unloaded})


async def get_current(request: Request) -> Response:
    return JSONResponse(current_model(request.app.state.cake))


def _available(state: ServerState) -> list[dict[str, Any]]:
    """Embedded default, the models served since start, and the HF cache; `load_as` is the `model_id` to send to
    /models/load."""
    models: dict[str, dict[str, Any]] = {}

    def add(model_id: str, origin: str, load_as: str | None, **extra: Any) -> None:
        entry = models.setdefault(model_id, {"model_id": model_id, "load_as": load_as, "sources": [], "loaded": False})
        entry["sources"].append(origin)
        entry["loaded"] = entry["loaded"] or (state.source is not None and load_as == state.settings.model)
        entry.update(extra)

    add(EMBEDDED_MODEL_ID, "embedded", None)
    for served in state.served_models:
        add(served, "configured" if served == state.configured_model else "loaded", served)
    for cached in list_cached():
        add(cached.model_id, "hf-cache", cached.model_id, size_bytes=cached.size_bytes, path=str(cached.path))
    return list(models.values())


async def get_available(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    models = await run_in_threadpool(_available, state)  # scanning the HF cache reads the disk
    # `current` is the served entry's model_id: the id or path it was loaded as, not its folder's name.
    current = (state.settings.model or EMBEDDED_MODEL_ID) if state.source else None
    return JSONResponse({"models": models, "current": current})


ROUTES = [
    Route("/models/load", load_model, methods=["POST"]),
    Route("/models/current", get_current, methods=["GET"]),
    Route("/models/available", get_available, methods=["GET"]),
    Route("/models/unload", unload_model, methods=["POST"]),
]
