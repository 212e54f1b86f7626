"""Turning ServeSettings into a running master: load the model, build the pipeline and engine, run uvicorn."""

from __future__ import annotations

import logging

from cake_py.api.app import create_app
from cake_py.api.state import ServerState
from cake_py.cluster.hostinfo import measure_tflops
from cake_py.cluster.pipeline import Pipeline, local_pipeline
from cake_py.config import ServeSettings
from cake_py.engine.engine import Engine
from cake_py.models.device import pin_cpus, release_openmp_threads, resolve_device, set_threads, torch_dtype
from cake_py.models.hub import ModelSource, resolve_model

log = logging.getLogger(__name__)


def build_pipeline(settings: ServeSettings, source: ModelSource, device: str) -> Pipeline:
    dtype = torch_dtype(settings.dtype)
    if settings.workers:
        from cake_py.cluster.master import connect_pipeline

        return connect_pipeline(settings, source, dtype, device)
    return local_pipeline(source, dtype, device)


def build_state(settings: ServeSettings) -> ServerState:
    set_threads(settings.threads)
    device = resolve_device(settings.device)
    source = resolve_model(settings.model)
    pipeline = build_pipeline(settings, source, device)
    engine = Engine(pipeline, source.tokenizer, max_running=settings.max_running)
    tflops = measure_tflops(device)
    release_openmp_threads()  # the engine thread must own the only OpenMP pool
    return ServerState(
        engine=engine,
        source=source,
        settings=settings,
        dtype=settings.dtype,
        device=device,
        tflops=tflops,
    )


def serve(settings: ServeSettings) -> None:
    import uvicorn

    pin_cpus(settings.cpus)
    state = build_state(settings)
    log.info("serving %s on http://%s:%d", state.model_name, settings.host, settings.port)
    uvicorn.run(
        create_app(state),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
