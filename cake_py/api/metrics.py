"""GET /metrics in Prometheus text format, from a registry owned by the app (several apps can live in a process).

HTTP figures (requests by route and status, durations, time to first token) are recorded as requests happen; the
engine's and the stages' figures (tokens, tokens/s, queue depth, per-stage forward and per-hop round-trip ms) are
read at scrape time by a custom collector, so they are never stale and cost nothing between scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cake_py.api.middleware import is_admin, request_key_name
from cake_py.api.state import ServerState, StageKey
from cake_py.cluster.stage import StageStats
from cake_py.engine.sequence import GenerationEvent
from cake_py.engine.stats import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# The methods a request is labelled with; any other is "other": a label per method a client makes up (the metrics
# middleware counts even refused, unauthenticated requests) would let anyone grow the registry without bound.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def stage_labels(key: StageKey) -> list[str]:
    """A stage's series labels: its name and its layers, inclusive like cluster.yaml's ("0-4")."""
    name, start, end = key
    return [name, f"{start}-{end - 1}"]


class EngineCollector(Collector):
    """Engine and stage figures, read from the live objects at each scrape."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        state = self.state
        engine, retired = state.counted  # together: see ServerState.counted
        loaded = GaugeMetricFamily("cake_model_loaded", "1 while a text model is served", labels=["model"])
        if state.source is not None:
            loaded.add_metric([state.model_name], 1.0)
        yield loaded
        # Counters are the process's: what the engines replaced since start counted, plus the one serving now.
        stats = engine.stats if engine is not None else EngineStats()
        yield CounterMetricFamily(
            "cake_engine_requests", "Sequences submitted to the engine", value=retired.requests + stats.requests_total
        )
        yield CounterMetricFamily(
            "cake_generated_tokens", "Tokens generated", value=retired.generated_tokens + stats.tokens_generated
        )
        yield CounterMetricFamily(
            "cake_prompt_tokens", "Prompt tokens prefilled", value=retired.prompt_tokens + stats.prompt_tokens
        )
        yield CounterMetricFamily("cake_engine_steps", "Scheduler steps run", value=retired.steps + stats.steps)
        yield CounterMetricFamily(
            "cake_prefix_cached_tokens",
            "Prompt tokens copied from kept caches instead of prefilled (prefix caching)",
            value=retired.prefix_cached_tokens + stats.prefix_cached_tokens,
        )
        yield CounterMetricFamily(
            "cake_draft_tokens",
            "Tokens drafted by prompt lookup decoding (--speculative-tokens) or from requests' predicted outputs",
            value=retired.draft_tokens + stats.draft_tokens,
        )
        yield CounterMetricFamily(
            "cake_accepted_draft_tokens",
            "Drafted tokens the samples confirmed (each one a step saved)",
            value=retired.accepted_draft_tokens + stats.accepted_draft_tokens,
        )
        yield CounterMetricFamily(
            "cake_preemptions",
            "Sequences that let their KV caches go to wait for memory, then were computed again",
            value=retired.preemptions + stats.preemptions,
        )
        yield GaugeMetricFamily(
            "cake_prefix_cache_kept_tokens",
            "Tokens whose caches are kept for prompts that start the same way",
            value=engine.prefix_cache.tokens if engine is not None else 0,
        )
        yield GaugeMetricFamily(
            "cake_prefix_cache_kept_sequences",
            "Finished sequences whose caches are kept on every stage (a worker's live sequences include them)",
            value=len(engine.prefix_cache) if engine is not None else 0,
        )
        # A stage's name alone is not unique: the master keeps every run of layers no worker holds, each a stage
        # called "master" (layers 0-4 and 20-29 around a worker's 5-19). Its layers tell the series apart.
        labels = ["stage", "layers"]
        calls = CounterMetricFamily("cake_stage_calls", "Forward calls per stage", labels=labels)
        sent = CounterMetricFamily("cake_stage_sent_bytes", "Bytes sent to a stage", labels=labels)
        received = CounterMetricFamily("cake_stage_received_bytes", "Bytes received from a stage", labels=labels)
        stages = engine.pipeline.stages if engine is not None else []
        current = {(stage.name, stage.start, stage.end): stage.stats for stage in stages}
        for key in [*current, *(key for key in retired.stage_calls if key not in current)]:
            figures = current.get(key, StageStats())
            calls.add_metric(stage_labels(key), retired.stage_calls.get(key, 0) + figures.calls)
            sent.add_metric(stage_labels(key), retired.stage_sent_bytes.get(key, 0) + figures.bytes_sent)
            received.add_metric(stage_labels(key), retired.stage_received_bytes.get(key, 0) + figures.bytes_received)
        yield from (calls, sent, received)
        if engine is None:
            return
        yield GaugeMetricFamily(
            "cake_tokens_per_second", "Generated tokens/s over the last 5 s", engine.tokens_per_second()
        )
        yield GaugeMetricFamily("cake_queue_depth", "Sequences waiting to start", value=engine.queue_depth)
        yield GaugeMetricFamily("cake_sequences_in_flight", "Sequences running or waiting", value=engine.in_flight)
        yield GaugeMetricFamily("cake_engine_step_ms", "Duration of the last scheduler step", value=stats.last_step_ms)
        forward = GaugeMetricFamily("cake_stage_forward_ms", "Moving average of a stage's compute", labels=labels)
        hop = GaugeMetricFamily("cake_stage_round_trip_ms", "Moving average of a hop to a stage", labels=labels)
        for key, figures in current.items():
            forward.add_metric(stage_labels(key), figures.forward_ms)
            hop.add_metric(stage_labels(key), figures.round_trip_ms)
        yield from (forward, hop)


class ServiceCollector(Collector):
    """Batches by status, failover and the stores, read from the live objects at each scrape."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self.state
        statuses = GaugeMetricFamily("cake_batches", "Batch API batches by status", labels=["status"])
        pending = 0
        by_status: dict[str, int] = {}
        for batch in state.batches.all() if state.batches is not None else []:
            by_status[batch.status] = by_status.get(batch.status, 0) + 1
            if batch.status in ("validating", "in_progress"):
                pending += max(0, batch.total - batch.completed - batch.failed)
        for status, count in sorted(by_status.items()):
            statuses.add_metric([status], count)
        yield statuses
        yield GaugeMetricFamily("cake_batch_requests_pending", "Batch requests not answered yet", value=pending)
        if state.failover is not None:
            yield GaugeMetricFamily(
                "cake_failover_left_out_workers",
                "Configured workers the served placement goes without (--failover-after)",
                value=len(state.failover.left_out),
            )
            engine = state.engine
            yield GaugeMetricFamily(
                "cake_failover_held_sequences",
                "Sequences in flight waiting for a stage that is down to come back, or for the failover's placement",
                value=(engine.held if engine is not None else 0) + len(state.failover.handed),
            )
        yield GaugeMetricFamily(
            "cake_stored_chat_completions", "Chat completions kept (store: true)", value=len(state.chat_completions)
        )
        yield GaugeMetricFamily("cake_stored_responses", "Responses API responses kept", value=len(state.responses))


class ApiMetrics:
    def __init__(self, state: ServerState) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cake_http_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "cake_http_request_duration_seconds",
            "Time to the whole answer",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "cake_http_requests_in_progress", "HTTP requests being answered", registry=self.registry
        )
        self.first_token = Histogram(
            "cake_time_to_first_token_seconds",
            "From submit to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # With several API keys (--api-key A,B or --api-key-file), what each key asked for, by its name; in a
        # registry of their own: a key sees its own series, the admin every key's (`render`).
        self.key_registry = CollectorRegistry()
        self.key_requests = Counter(
            "cake_api_key_requests", "Generation requests by API key", ["key"], registry=self.key_registry
        )
        self.key_prompt_tokens = Counter(
            "cake_api_key_prompt_tokens", "Prompt tokens by API key", ["key"], registry=self.key_registry
        )
        self.key_completion_tokens = Counter(
            "cake_api_key_completion_tokens", "Generated tokens by API key", ["key"], registry=self.key_registry
        )
        self.registry.register(EngineCollector(state))
        self.registry.register(ServiceCollector(state))

    def observe_first_token(self, seconds: float) -> None:
        self.first_token.observe(seconds)

    def key_usage(self, key: str, prompts: list[list[int]]) -> Callable[[GenerationEvent], None]:
        """Count a request and its prompts under `key` (each prompt as its usage counts it: once for n choices, as
        often as the request gives it); the callback counts each sequence's generated tokens when it ends."""
        self.key_requests.labels(key).inc()
        self.key_prompt_tokens.labels(key).inc(sum(len(prompt) for prompt in prompts))
        generated = self.key_completion_tokens.labels(key)

        def on_last(event: GenerationEvent) -> None:
            generated.inc(event.completion_tokens)

        return on_last

    def render(self, viewer: str | None = None) -> bytes:
        """The scrape; the per-key series all (`viewer` None: the admin, or a server with one key or none) or only
        those of the key named `viewer` (another tenant's name and usage are not every key's to read)."""
        keys = _OnlyKey(self.key_registry, viewer) if viewer is not None else self.key_registry
        return generate_latest(self.registry) + generate_latest(keys)  # type: ignore[arg-type]


class _OnlyKey:
    """A registry's families with only the samples of one key (generate_latest reads no more than `collect`)."""

    def __init__(self, registry: CollectorRegistry, key: str) -> None:
        self.registry, self.key = registry, key

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            shown = Metric(family.name, family.documentation, family.type, family.unit)
            shown.samples = [sample for sample in family.samples if sample.labels.get("key") == self.key]
            yield shown


class MetricsMiddleware:
    """Pure ASGI (streams pass through untouched): counts each request by its route template and final status."""

    def __init__(self, app: ASGIApp, state: ServerState, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.state = state
        # Known routes: a request refused before routing (401, 413, 429) is still labelled by its route, a path
        # with parameters (/v1/files/{file_id}) by its template (it was "unmatched").
        self.paths = frozenset(route.path for route in routes if isinstance(route, Route))
        self.templates = [
            (route.path_regex, route.path) for route in routes if isinstance(route, Route) and "{" in route.path
        ]

    def _label(self, path: str) -> str:
        if path in self.paths:
            return path
        return next((template for regex, template in self.templates if regex.match(path)), "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.state.metrics
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        status = 500
        began = time.perf_counter()

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_progress.inc()
        try:
            await self.app(scope, receive, record_status)
        finally:
            metrics.in_progress.dec()
            path = scope["path"]
            label = getattr(scope.get("route"), "path", None) or self._label(path)
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            metrics.requests.labels(label, method, str(status)).inc()
            metrics.duration.labels(label).observe(time.perf_counter() - began)


async def metrics_endpoint(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    assert state.metrics is not None
    name = request_key_name(request)  # "" with one key or none: nothing to tell apart
    viewer = None if is_admin(request) or not name else name
    body = await run_in_threadpool(state.metrics.render, viewer)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


ROUTES = [Route("/metrics", metrics_endpoint, methods=["GET"])]
