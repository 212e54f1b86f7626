"""Turning ServeSettings into a running master: load the model, build the pipeline and engine, run uvicorn."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Collection, Iterator
from itertools import count
from types import FrameType

import uvicorn

from cake_py.api.app import create_app
from cake_py.api.file_store import claim
from cake_py.api.http_protocol import HeadTimeoutProtocol
from cake_py.api.state import ServerState, context_length
from cake_py.cluster.hostinfo import measure_tflops
from cake_py.cluster.pipeline import Pipeline, local_pipeline
from cake_py.config import ServeSettings
from cake_py.config_checks import check_can_listen
from cake_py.engine.engine import Engine
from cake_py.errors import ConfigError, Stopped
from cake_py.models import graphs, kv_pool
from cake_py.models.device import pin_cpus, release_openmp_threads, resolve_device, set_threads, torch_dtype
from cake_py.models.hub import ModelSource, resolve_model

log = logging.getLogger(__name__)


def build_pipeline(settings: ServeSettings, source: ModelSource, device: str, placed: Collection[int] = ()) -> Pipeline:
    dtype = torch_dtype(settings.dtype)
    if settings.workers:
        from cake_py.cluster.master import connect_pipeline

        return connect_pipeline(settings, source, dtype, device, placed)
    return local_pipeline(source, dtype, device)


# One numbering for the sequences of every engine the server makes: a sequence handed over to the engine that
# replaces its own (failover) keeps its id, and no other sequence there has it.
SEQ_IDS = count(1)
FAILOVER_HOLD_MARGIN_S = 30.0  # past --failover-after: time for the failover's check to start the new placement


def make_engine(pipeline: Pipeline, source: ModelSource, settings: ServeSettings) -> Engine:
    engine = Engine(
        pipeline,
        source.tokenizer,
        max_running=settings.max_running,
        max_queued=settings.max_queued,
        max_batch_tokens=settings.max_batch_tokens,
        prefix_cache_tokens=settings.prefix_cache_tokens,
        speculative_tokens=settings.speculative_tokens,
        seq_ids=SEQ_IDS,
        context_length=context_length(source, settings),
    )
    if settings.failover_after > 0 and settings.workers:
        # Requests a dead worker interrupts wait for the failover (api/failover.py) instead of failing.
        engine.hold_s = settings.failover_after + FAILOVER_HOLD_MARGIN_S
    source.tokenizer.max_tokens = engine.context_length  # a text no context could hold is refused unread
    return engine


def warn_of_a_broken_template(source: ModelSource) -> None:
    """A model whose own chat template does not compile still serves completions; its chats fail (a 500), each with
    the reason: say it once at load too, with the way out."""
    if (problem := source.tokenizer.template_error()) is not None:
        log.warning("%s: chat requests fail until `--chat-template FILE` gives one that compiles", problem)


def build_state(settings: ServeSettings) -> ServerState:
    set_threads(settings.threads)
    device = resolve_device(settings.device)
    source = resolve_model(settings.model)
    if settings.max_model_len and settings.max_model_len > source.config.max_position_embeddings:
        raise ConfigError(
            f"--max-model-len {settings.max_model_len} is longer than the context of {source.model_id} "
            f"({source.config.max_position_embeddings} tokens)"
        )
    if settings.chat_template is not None:
        source.tokenizer.set_chat_template(settings.chat_template)
    warn_of_a_broken_template(source)
    if not settings.workers:  # every layer here: a model larger than this memory is an error, not the OOM killer
        from cake_py.cluster.master import check_master_holds_all

        check_master_holds_all(source, torch_dtype(settings.dtype), device)
    pipeline = build_pipeline(settings, source, device)
    engine: Engine | None = None
    try:
        engine = make_engine(pipeline, source, settings)
        tflops = measure_tflops(device)
        release_openmp_threads()  # the engine thread must own the only OpenMP pool
    except BaseException:  # a failure, or a stop (SIGTERM, Ctrl-C): the workers drop the layers just placed
        (engine.close if engine is not None else pipeline.close)()
        raise
    state = ServerState(
        engine=engine,
        source=source,
        settings=settings,
        dtype=settings.dtype,
        device=device,
        tflops=tflops,
    )
    if settings.workers:
        from cake_py.cluster.master import assignments_of

        state.placed |= assignments_of(pipeline)
    return state


def serve(settings: ServeSettings) -> None:
    check_can_listen(settings.host, settings.port)  # before minutes of loading and placing the model
    files_lock = claim(settings.files_dir)  # held until this process ends
    pin_cpus(settings.cpus)
    graphs.set_enabled(settings.cuda_graphs)
    kv_pool.set_keep_free(settings.keep_free_bytes)
    state = build_state(settings)
    warn_of_an_open_api(settings)
    if len(settings.api_keys) > 1:  # a comma in a single key's value would have split it: say what was read
        named = ", ".join(sorted(set(settings.api_key_names.values()))) or "none named"
        log.info(
            "%d API keys (%s): each key's stored answers, files and batches are its own", len(settings.api_keys), named
        )
    config = uvicorn.Config(
        create_app(state),
        host=settings.host.strip("[]"),  # uvicorn takes an IPv6 address bare ("::"), not "[::]"
        port=settings.port,
        log_level=settings.log_level,
        # uvicorn's own loggers (startup, access lines) go through cake's handler: stderr, timestamped, one format.
        # Its default config wrote them to stdout without a time, and failed at startup when stdout was closed.
        log_config=None,
        timeout_graceful_shutdown=5,
        http=HeadTimeoutProtocol,  # a request's head must arrive in time (uvicorn has no such timeout)
    )
    server = _Server(config, state)
    server.run()
    files_lock.close()
    if server.stopped_by is not None:
        raise Stopped(server.stopped_by)


def warn_of_an_open_api(settings: ServeSettings) -> None:
    """--ui-auth alone reads like a guarded server; it guards the page, not the API."""
    if settings.ui_auth is not None and not settings.api_keys:
        log.warning(
            "--ui-auth guards the web page and the topology only: the API (generation, files%s) is open to anyone "
            "who reaches %s; add --api-key to guard it",
            "" if settings.admin_key else ", model loading",
            settings.host,
        )


def begin_shutdown(state: ServerState) -> None:
    """What a shutdown signal starts, without waiting (it runs in the signal handler): background responses are
    cancelled (they end `cancelled`, not failed by the engine's stop, which reaches them after), and the engine
    stops, so every open stream ends with an error event."""
    if state.failover is not None:  # a stage the shutdown takes down must not start a placement
        state.failover.stop_soon()
    if state.batches is not None:  # first: a batch request the engine's stop ends would be stored as failed
        state.batches.stop_soon()
    state.responses.stop_background_soon()
    if state.engine is not None:
        state.engine.request_stop()


class _Server(uvicorn.Server):
    """uvicorn's server, which also stops the engine as soon as a shutdown signal arrives: every open stream then
    ends with an error event and [DONE] within the grace period, instead of being cut when it runs out."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.stopped_by: int | None = None  # the first SIGINT or SIGTERM

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without raising the signal again once the server has stopped (it did, since 0.29): SIGINT then
        reached the CLI as a KeyboardInterrupt (exit 130, as an interrupted start), and SIGTERM killed the process
        unlike the worker's clean exit. serve() raises Stopped instead, as run_worker does."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        original = {signum: signal.signal(signum, self.handle_exit) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in original.items():
                signal.signal(signum, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        bound = [sock.getsockname() for server in getattr(self, "servers", []) for sock in server.sockets]
        if bound and not self.should_exit:  # the port bound, not the one asked: --port 0 lets the OS pick
            host, port = self.config.host, bound[0][1]
            shown = f"[{host}]" if ":" in host else host
            log.info("serving %s on http://%s:%d", self.state.model_name, shown, port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        begin_shutdown(self.state)
        super().handle_exit(sig, frame)
