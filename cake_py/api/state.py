"""What every route needs: the engine serving the current model, its source and name, the settings, and the
switch guard that keeps requests off an engine that is being replaced."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from cake_py.api.chat_store import ChatStore
from cake_py.api.conversation_store import ConversationStore
from cake_py.api.errors import ApiError
from cake_py.api.file_store import FileStore
from cake_py.api.json_body import json_body
from cake_py.api.response_store import ResponseStore
from cake_py.config import ServeSettings
from cake_py.engine.engine import Engine
from cake_py.engine.faults import ENGINE_DEAD
from cake_py.models.hub import ModelSource
from cake_py.models.pooling import DEFAULT_POOLING
from cake_py.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from cake_py.api.batch_runner import BatchRunner
    from cake_py.api.failover import Failover
    from cake_py.api.inprocess import Routes
    from cake_py.api.metrics import ApiMetrics

NO_TEXT_MODEL = "No text model loaded"


def context_length(source: ModelSource, settings: ServeSettings) -> int:
    """The most tokens a sequence of `source` may hold: --max-model-len, where the model's context is longer."""
    context = source.config.max_position_embeddings
    return min(settings.max_model_len, context) if settings.max_model_len else context


async def chat_tokenizer(settings: ServeSettings, tokenizer: Tokenizer, body: dict[str, Any]) -> Tokenizer:
    """The tokenizer that renders this chat request: the served model's, or one with the request's own
    `chat_template` (vLLM's field), which only a server started with --trust-request-chat-template takes."""
    template = body.get("chat_template")
    if template is None:
        return tokenizer
    if not isinstance(template, str) or not template.strip():
        raise ApiError(400, f"chat_template must be a Jinja template (a non-empty string), got {template!r}"[:300])
    if not settings.trust_request_chat_template:
        raise ApiError(
            400,
            "this server does not take a chat_template in requests (start it with --trust-request-chat-template "
            "to allow it); leave the field out to use the model's own",
        )
    return await run_in_threadpool(tokenizer.with_chat_template, template)  # compiling a big template takes ms


StageKey = tuple[str, int, int]  # a stage's name and layers [start, end): names alone repeat ("master")


@dataclass
class RetiredTotals:
    """What the engines that stopped serving counted, so that /metrics counters only ever grow in this process: an
    unload or a load replaces the engine, whose own counts start at 0."""

    requests: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    steps: int = 0
    stage_calls: dict[StageKey, int] = field(default_factory=dict)
    stage_sent_bytes: dict[StageKey, int] = field(default_factory=dict)
    stage_received_bytes: dict[StageKey, int] = field(default_factory=dict)
    prefix_cached_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    preemptions: int = 0

    def plus(self, engine: Engine) -> RetiredTotals:
        """These totals and `engine`'s, as a new object: a scrape reading this one meanwhile sees it unchanged."""
        stats = engine.stats
        totals = RetiredTotals(
            self.requests + stats.requests_total,
            self.generated_tokens + stats.tokens_generated,
            self.prompt_tokens + stats.prompt_tokens,
            self.steps + stats.steps,
            dict(self.stage_calls),
            dict(self.stage_sent_bytes),
            dict(self.stage_received_bytes),
            self.prefix_cached_tokens + stats.prefix_cached_tokens,
            self.draft_tokens + stats.draft_tokens,
            self.accepted_draft_tokens + stats.accepted_draft_tokens,
            self.preemptions + stats.preemptions,
        )
        for stage in engine.pipeline.stages:
            key = (stage.name, stage.start, stage.end)
            totals.stage_calls[key] = totals.stage_calls.get(key, 0) + stage.stats.calls
            totals.stage_sent_bytes[key] = totals.stage_sent_bytes.get(key, 0) + stage.stats.bytes_sent
            totals.stage_received_bytes[key] = totals.stage_received_bytes.get(key, 0) + stage.stats.bytes_received
        return totals

    def grown_by(self, later: RetiredTotals, earlier: RetiredTotals) -> RetiredTotals:
        """These totals plus what `later` counts beyond `earlier` (one engine's totals, read twice)."""
        values: dict[str, Any] = {}
        for item in fields(self):
            mine, after, before = getattr(self, item.name), getattr(later, item.name), getattr(earlier, item.name)
            if isinstance(mine, dict):  # per stage
                values[item.name] = {
                    key: mine.get(key, 0) + after.get(key, 0) - before.get(key, 0) for key in {*mine, *after}
                }
            else:
                values[item.name] = mine + after - before
        return RetiredTotals(**values)


PROBES_REUSED_S = 2.0  # how long one probe of the workers (no model served) answers every poll that asks


class RecentProbes:
    """The workers as last probed (no model served), reused for PROBES_REUSED_S: every dashboard tab polls the
    topology each second, and a probe of a worker that does not answer takes its whole timeout. One probe runs at
    a time; the polls that come meanwhile wait for it and take its answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: list[dict[str, Any]] | None = None
        self._at = 0.0

    def get(self, probe: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The last probe's nodes (copies: callers change them), or `probe()`'s if those are too old."""
        with self._lock:
            if self._nodes is None or time.monotonic() - self._at >= PROBES_REUSED_S:
                self._nodes, self._at = probe(), time.monotonic()
            return [dict(node) for node in self._nodes]


@dataclass
class ServerState:
    engine: Engine | None
    source: ModelSource | None
    settings: ServeSettings
    dtype: str = "bfloat16"
    device: str = "cpu"
    tflops: float = 0.0  # measured once at startup: measuring runs torch, which never runs on the event loop
    started: float = field(default_factory=time.time)
    switching: str | None = None  # what /models/load or /models/unload is doing, while it runs
    switch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # After a failed load that could not bring the previous model back either: why, and the task trying again.
    restore_error: str | None = None
    restore_task: asyncio.Task[None] | None = None
    metrics: ApiMetrics | None = None  # set by create_app: one registry per app
    # The model ids (paths or Hub ids) served since start, so /models/available still lists them after a switch.
    served_models: list[str] = field(default_factory=list)
    configured_model: str | None = field(init=False)  # the one the server started with (None: embedded)
    retired: RetiredTotals = field(default_factory=RetiredTotals)
    responses: ResponseStore = field(default_factory=ResponseStore)  # the Responses API's stored responses
    conversations: ConversationStore = field(default_factory=ConversationStore)  # the Conversations API's
    chat_completions: ChatStore = field(default_factory=ChatStore)  # chat completions created with store: true
    files: FileStore = field(init=False)  # the Files API's, under --files-dir
    batches: BatchRunner | None = None  # the Batch API's runs: set by create_app (they call the app's routes)
    failover: Failover | None = None  # with --failover-after and workers: set by create_app
    # The assignment numbers this server's pipelines got from their workers, retired ones included: a worker still
    # holding one holds layers this master placed (their drop failed while it was paused), not another master's.
    placed: set[int] = field(default_factory=set)
    worker_probes: RecentProbes = field(default_factory=RecentProbes)  # /api/v1/topology's and /system/info's
    routes: Routes | None = None  # the app's routes, to call from inside it: set by create_app
    # The engine serving now and what the engines before it counted, as one value: a scrape in another thread reads
    # both at once, so it never counts an engine twice (live and retired) or not at all.
    counted: tuple[Engine | None, RetiredTotals] = field(init=False, repr=False)

    def __setattr__(self, name: str, value: object) -> None:
        # Whoever replaces the engine (/models/load, /models/unload, a failed load's restore), its counts are kept:
        # taken at the moment it stops serving, so a scrape never sees them missing.
        if name == "engine":
            retired = self.__dict__.get("retired") or RetiredTotals()
            old = self.__dict__.get("engine")
            if old is not None and old is not value:
                retired = retired.plus(old)
                # What a step still running adds is counted once the engine stopped (`recount`).
                self.__dict__.setdefault("_replaced", {})[id(old)] = RetiredTotals().plus(old)
            super().__setattr__("retired", retired)
            super().__setattr__("counted", (value, retired))
        elif name == "retired":  # the dataclass's own initialisation
            super().__setattr__("counted", (self.__dict__.get("engine"), value))
        super().__setattr__(name, value)

    def recount(self, engine: Engine | None) -> None:
        """Once a replaced engine has stopped: add what it counted after it was replaced (a step that was running
        then), which the totals taken at that moment missed."""
        earlier = self.__dict__.get("_replaced", {}).pop(id(engine), None)
        if engine is not None and earlier is not None:
            self.retired = self.retired.grown_by(RetiredTotals().plus(engine), earlier)

    def __post_init__(self) -> None:
        self.configured_model = self.settings.model
        self.files = FileStore(self.settings.files_dir, self.settings.max_file_bytes, self.settings.files_max_bytes)
        self.remember(self.settings.model)

    def remember(self, model_id: str | None) -> None:
        if model_id and model_id not in self.served_models:
            self.served_models.append(model_id)

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        return self.source.model_id if self.source else "none"

    @property
    def pooling(self) -> str:
        """How /v1/embeddings pools: --pooling, else what the model folder says, else the last token."""
        return self.settings.pooling or (self.source.pooling if self.source else None) or DEFAULT_POOLING

    def loaded(self) -> tuple[Engine, ModelSource]:
        """The engine and model being served, to describe (status routes answer while a stage is down); 503 while
        the model is being switched, 404 when none is loaded."""
        if self.switching is not None:
            raise ApiError(503, f"the server is {self.switching}; retry shortly", headers={"Retry-After": "5"})
        if self.engine is None or self.source is None:
            raise ApiError(404, NO_TEXT_MODEL)
        return self.engine, self.source

    def ready(self) -> tuple[Engine, ModelSource]:
        """The engine and model to generate with: `loaded`'s, and a 503 while a stage of its pipeline is down
        (before a stream's 200 is sent, not as an error inside it)."""
        engine, source = self.loaded()
        if engine.died:
            raise ApiError(503, ENGINE_DEAD)
        down = engine.pipeline.down_with_reasons()  # read once: a stage back meanwhile must not leave "down: ;"
        if down:
            raise ApiError(
                503,
                f"pipeline stage(s) down: {down}; the master reconnects on its own (see GET /health)",
                headers={"Retry-After": "5"},
            )
        return engine, source

    def still_serving(self, engine: Engine) -> None:
        """Called right before submitting (on the event loop, after any await): the engine was not switched away."""
        if self.switching is not None or self.engine is not engine:
            raise ApiError(
                503, "the served model changed while the request was prepared; retry", headers={"Retry-After": "5"}
            )


async def generation_request(request: Request) -> tuple[ServerState, Engine, ModelSource, dict[str, Any]]:
    """What a generation route starts from: the state, the engine and model serving now (`ready`: a 503 or 404
    before the body is even read) and the request's JSON body."""
    state: ServerState = request.app.state.cake
    engine, source = state.ready()
    return state, engine, source, await json_body(request)
